"""``seqpipe-data``: raw JSON-lines text to Megatron .bin/.idx training data, with the flags of
Megatron-LM's tools/preprocess_data.py (which megatron-core does not ship), e.g.

    seqpipe-data --input corpus.jsonl --output-prefix data/corpus --tokenizer-type GPT2BPETokenizer \\
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod --workers 2

writes data/corpus_text_document.bin/.idx; train on it with --data-path data/corpus_text_document.
The work is seqpipe_ds.data.preprocess's; this parses, calls and prints.
"""
import argparse
import sys

from seqpipe_ds.data import TOKENIZER_TYPES, Progress, TokenizerSpec, preprocess
from seqpipe_ds.data.tokenizer import BYTE_LEVEL


def build_parser():
    parser = argparse.ArgumentParser(prog="seqpipe-data", allow_abbrev=False,
                                     description="Tokenize JSON lines into Megatron indexed datasets.")
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSON lines file: one document (a JSON object) per line")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract from each object; one dataset each (default: text)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=BYTE_LEVEL)
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2 vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2 merges.txt")
    group.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer: a local tokenizer.json")
    group.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes {prefix}_{key}_document.bin/.idx for each --json-keys key")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="encoding processes (one core each)")
    group.add_argument("--log-interval", type=int, default=1000, help="report progress every this many documents")
    return parser


def _report(done: Progress):
    print(f"processed {done.documents} documents ({done.documents_per_s:.0f} docs/s, "
          f"{done.mb_per_s:.2f} MB/s)", file=sys.stderr, flush=True)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = TokenizerSpec(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model)
    try:
        done = preprocess(args.input, args.output_prefix, spec, args.json_keys, append_eod=args.append_eod,
                          workers=args.workers, log_interval=args.log_interval, progress=_report)
    except ValueError as error:
        parser.exit(2, f"seqpipe-data: error: {error}\n")
    print(f"done: {done.documents} documents, {done.bytes / 1e6:.2f} MB in {done.seconds:.1f} s "
          f"({done.documents_per_s:.0f} docs/s, {done.mb_per_s:.2f} MB/s)", file=sys.stderr)
    if done.empty:
        print(f"left out {done.empty} empty document(s)", file=sys.stderr)
    for prefix in done.outputs:
        print(f"wrote {prefix}.bin and {prefix}.idx")


if __name__ == "__main__":
    main()
