"""seqpipe-data throughput (MB/s of JSON-lines input) with 1 and 2 workers, per tokenizer type.

The input is the embedded corpus's documents repeated to --mb megabytes, one JSON line each. The
BPE tokenizers are trained here on that corpus (byte-level BPE, GPT-2 pre-tokenization,
--vocab-size tokens) and written as GPT-2 vocab.json/merges.txt and as a HuggingFace
tokenizer.json, since the machine has no hub access. Each configuration runs the seqpipe-data
command itself, --repeats times; the best run counts (the machine may be shared). Prints a table
and writes it, with the machine's CPU model and load, to --out.

    .venv/bin/python benchmarks/bench_preprocess.py --out benchmarks/results/preprocess_cpu.txt
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from seqpipe_ds.data import corpus_documents

SEQPIPE_DATA = Path(sys.executable).parent / "seqpipe-data"
DONE = re.compile(r"done: (\d+) documents, ([\d.]+) MB in ([\d.]+) s \((\d+) docs/s, ([\d.]+) MB/s\)")


def cpu_model():
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))


def write_inputs(directory, megabytes, vocab_size):
    docs = corpus_documents()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab, merges = tokenizer.model.save(str(directory), "gpt2")
    tokenizer_json = str(directory / "tokenizer.json")
    tokenizer.save(tokenizer_json)
    corpus = directory / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        written = 0
        while written < megabytes * 1e6:
            for doc in docs:
                written += f.write(json.dumps({"text": doc}) + "\n")
    tokenizers = {
        "ByteLevelTokenizer": [],
        "GPT2BPETokenizer": ["--vocab-file", vocab, "--merge-file", merges],
        "HuggingFaceTokenizer": ["--tokenizer-model", tokenizer_json],
    }
    return corpus, tokenizer.get_vocab_size(), tokenizers


def measure(corpus, prefix, tokenizer_args, workers, repeats, timeout):
    best = None
    for _ in range(repeats):
        proc = subprocess.run([str(SEQPIPE_DATA), "--input", str(corpus), "--output-prefix", str(prefix),
                               "--append-eod", "--workers", str(workers), "--log-interval", "1000000",
                               *tokenizer_args], capture_output=True, text=True, timeout=timeout, check=True)
        match = DONE.search(proc.stderr)
        mb_per_s = float(match.group(5))
        if best is None or mb_per_s > best[0]:
            best = (mb_per_s, int(match.group(4)), float(match.group(3)))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="input size in MB")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per seqpipe-data run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, vocab, tokenizers = write_inputs(tmp, args.mb, args.vocab_size)
        size = corpus.stat().st_size / 1e6
        lines = [f"seqpipe-data on {size:.1f} MB of JSON lines (the embedded corpus repeated), --append-eod; "
                 f"BPE vocabulary {vocab} trained on the corpus; best of {args.repeats}",
                 f"machine: {cpu_model()}, {os.cpu_count()} cores; load average before: "
                 f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
                 f"{'tokenizer':<22} {'workers':>7} {'MB/s':>7} {'docs/s':>7} {'seconds':>8}"]
        print("\n".join(lines), flush=True)
        for name, tokenizer_args in tokenizers.items():
            for workers in args.workers:
                mb_per_s, docs_per_s, seconds = measure(corpus, tmp / "out", tokenizer_args, workers, args.repeats,
                                                        args.timeout)
                lines.append(f"{name:<22} {workers:>7} {mb_per_s:7.2f} {docs_per_s:7d} {seconds:8.1f}")
                print(lines[-1], flush=True)
        lines.append(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
