"""seqpipe-data: raw JSON lines to Megatron .bin/.idx with GPT-2 BPE and HuggingFace tokenizers, the ids
equal to what the `tokenizers` package itself gives; bad input is one error and leaves nothing behind;
examples/pretrain_gpt.py trains on the result.

The tokenizers are trained here on the embedded corpus (a 1000-token byte-level BPE, well under a
second), so no file comes from the hub. The helpers are shared with test_tensorboard.py.
"""
import json
import math

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from seqpipe_ds import megatron_args
from seqpipe_ds.cli import data as cli
from seqpipe_ds.data import TokenizerSpec, build_tokenizer, corpus_documents, preprocess
from test_example import ONE_PROCESS, train

EOT, BOS = "<|endoftext|>", "<|begin_of_text|>"


def trained_tokenizer():
    """A GPT-2-style byte-level BPE (no prefix space, GPT-2's split regex) on the embedded corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=[EOT, BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus_documents(), trainer)
    return tokenizer


def write_tokenizer_files(directory):
    """(vocab.json, merges.txt, tokenizer.json) of the trained tokenizer; the tokenizer.json puts
    <|begin_of_text|> first, as Llama 3's does."""
    tokenizer = trained_tokenizer()
    vocab, merges = tokenizer.model.save(str(directory), "gpt2")
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                             special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    tokenizer_json = str(directory / "tokenizer.json")
    tokenizer.save(tokenizer_json)
    return vocab, merges, tokenizer_json


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    vocab, merges, tokenizer_json = write_tokenizer_files(directory)
    docs = corpus_documents()
    # Unicode, an in-text <|endoftext|> (a special token), an empty text, and a second key.
    texts = docs[:40] + ["naïve ünïcode 😀 and tabs\t", f"two {EOT} documents in one line", ""]
    corpus = write_jsonl(directory / "corpus.jsonl",
                         [{"text": t, "title": t[:30], "id": i} for i, t in enumerate(texts)])
    return {"vocab": vocab, "merges": merges, "tokenizer_json": tokenizer_json, "corpus": corpus, "texts": texts,
            "dir": directory}


def read_documents(prefix):
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.mark.timeout(120)
def test_gpt2_bpe_ids_equal_tokenizers_for_every_key_with_two_workers(files, tmp_path, capsys):
    prefix = str(tmp_path / "out" / "gpt2")
    cli.main(["--input", str(files["corpus"]), "--json-keys", "text", "title", "--output-prefix", prefix,
              "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", files["vocab"], "--merge-file", files["merges"],
              "--append-eod", "--workers", "2", "--log-interval", "10"])
    out = capsys.readouterr()
    assert f"wrote {prefix}_text_document.bin and {prefix}_text_document.idx" in out.out
    # progress every --log-interval documents, then the total
    assert [line.split(" (")[0] for line in out.err.splitlines()[:4]] == [
        f"processed {n} documents" for n in (10, 20, 30, 40)]
    assert " docs/s, " in out.err and " MB/s)" in out.err
    assert f"done: 43 documents, {files['corpus'].stat().st_size / 1e6:.2f} MB in " in out.err
    reference = trained_tokenizer()
    eot = reference.token_to_id(EOT)
    for key, texts in (("text", files["texts"]), ("title", [t[:30] for t in files["texts"]])):
        expected = [reference.encode(t).ids + [eot] for t in texts]
        assert read_documents(f"{prefix}_{key}_document") == expected, key
    # the in-text end-of-text marker is the special token, not its characters
    assert expected[-2].count(eot) == 2


@pytest.mark.timeout(120)
def test_huggingface_tokenizer_json_ids_equal_tokenizers_and_leave_out_empty_documents(files, tmp_path):
    prefix = str(tmp_path / "hf")
    done = preprocess(str(files["corpus"]), prefix, TokenizerSpec("HuggingFaceTokenizer",
                                                                  tokenizer_model=files["tokenizer_json"]))
    reference = Tokenizer.from_file(files["tokenizer_json"])
    expected = [reference.encode(t).ids for t in files["texts"]]
    assert expected[0][0] == reference.token_to_id(BOS)  # the post-processor's first token
    # without --append-eod; "" still gets <|begin_of_text|>, so nothing is empty here
    assert read_documents(f"{prefix}_text_document") == expected and done.empty == 0
    assert (done.documents, done.bytes) == (len(files["texts"]), files["corpus"].stat().st_size)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=files["tokenizer_json"])
    assert (tokenizer.eod, tokenizer.vocab_size) == (reference.token_to_id(EOT), 1000)
    # GPT-2 BPE without --append-eod: the empty text has no token and is left out
    done = preprocess(str(files["corpus"]), str(tmp_path / "g"), TokenizerSpec("GPT2BPETokenizer", files["vocab"],
                                                                               files["merges"]))
    assert done.empty == 1 and len(read_documents(str(tmp_path / "g_text_document"))) == len(files["texts"]) - 1


@pytest.mark.timeout(60)
def test_eod_comes_from_tokenizer_config_json_beside_the_tokenizer(files, tmp_path):
    (tmp_path / "tokenizer.json").write_text(open(files["tokenizer_json"], encoding="utf-8").read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": BOS}}))
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json"))
    assert tokenizer.eod == Tokenizer.from_file(files["tokenizer_json"]).token_to_id(BOS)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</nope>"}))
    with pytest.raises(ValueError, match="names eos_token '</nope>'"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json"))


# content after GOOD_LINES good lines, the bad line's number within it, and the error's text
MALFORMED = {
    "not JSON": (b'{"text": "a"}\n{"text": "b"\n', 2, "not JSON (Expecting ',' delimiter at character 13)"),
    "not an object": (b'{"text": "a"}\n["text"]\n', 2, "a JSON list, not an object"),
    "missing key": (b'{"text": "a"}\n{"body": "b"}\n', 2, "no key 'text' (--json-keys text)"),
    "not a string": (b'{"text": 7}\n', 1, "'text' is a JSON int, not a string"),
    "blank line": (b'{"text": "a"}\n\n{"text": "b"}\n', 2, "not JSON (Expecting value at character 1)"),
    "not UTF-8": (b'{"text": "a"}\n{"text": "\xff"}\n', 2, "not UTF-8 (invalid start byte at byte 10)"),
}
# several chunks of good lines come first, so some output was written before the error
GOOD_LINES = 300


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_line_is_an_error_naming_it_and_leaves_nothing(case, tmp_path, capsys):
    content, number, message = MALFORMED[case]
    good = b"".join(b'{"text": "good line %d"}\n' % i for i in range(GOOD_LINES))
    (tmp_path / "in.jsonl").write_bytes(good + content)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out" / "x"),
                  "--workers", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"seqpipe-data: error: {tmp_path / 'in.jsonl'}: line {GOOD_LINES + number}: {message}\n"
    assert list((tmp_path / "out").iterdir()) == []


BAD_ARGUMENTS = {
    "HuggingFaceTokenizer without --tokenizer-model": (
        ["--tokenizer-type", "HuggingFaceTokenizer"],
        "--tokenizer-type HuggingFaceTokenizer needs existing files for --tokenizer-model"),
    "GPT2BPETokenizer without files": (
        ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "missing.json"],
        "--tokenizer-type GPT2BPETokenizer needs existing files for --vocab-file and --merge-file"),
    "no workers": (["--workers", "0"], "--workers must be at least 1, got 0"),
    "missing input": (["--input", "missing.jsonl"], "--input missing.jsonl is not a file"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_are_one_clear_error(case, files, tmp_path, capsys):
    extra, message = BAD_ARGUMENTS[case]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--input", str(files["corpus"]), "--output-prefix", str(tmp_path / "x"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"seqpipe-data: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(300)
def test_pretrain_gpt_trains_on_the_preprocessed_data(files, tmp_path):
    """The whole corpus through seqpipe-data with GPT-2 BPE, then 4 iterations on one process."""
    corpus = write_jsonl(tmp_path / "all.jsonl", [{"text": t} for t in corpus_documents()])
    prefix = str(tmp_path / "corpus")
    cli.main(["--input", str(corpus), "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer",
              "--vocab-file", files["vocab"], "--merge-file", files["merges"], "--append-eod"])
    curves, out = train(tmp_path, "bpe", layout=ONE_PROCESS, processes=1, extra=[
        "--data-path", f"{prefix}_text_document", "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", files["vocab"], "--merge-file", files["merges"]])
    losses = curves["loss"]
    assert sorted(losses) == [1, 2, 3, 4]
    # a fresh model predicts about uniformly over the padded vocabulary (1000 -> 1024)
    assert abs(losses[1] - math.log(1024)) < 0.5, losses
    assert losses[4] < losses[1]


@pytest.mark.timeout(60)
def test_pretrain_gpt_arguments_name_the_missing_tokenizer_file(files, capsys):
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "10"]
    with pytest.raises(SystemExit):
        megatron_args.parse_args([*base, "--tokenizer-type", "HuggingFaceTokenizer"], world_size=1)
    assert "error: --tokenizer-type HuggingFaceTokenizer needs existing files for --tokenizer-model" in \
        capsys.readouterr().err
    args = megatron_args.parse_args([*base, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                     files["tokenizer_json"]], world_size=1)
    assert args.tokenizer_model == files["tokenizer_json"] and args.tensorboard_dir is None
