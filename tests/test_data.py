"""Data path: tokenizers, the embedded corpus as .bin/.idx, GPTDatasets and pipeline micro-batches."""
import multiprocessing as mp
import os

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from seqpipe_ds.data import (ByteTokenizer, GPT2BPETokenizer, build_datasets, build_tokenizer, corpus_documents,
                             embedded_corpus_prefix, padded_vocab_size, pipeline_batches, write_indexed_dataset)

SEQ = 64
SPLIT = "969,30,1"  # Megatron's default; gives the 93-document corpus no test documents


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="module")
def prefix(cache):
    return embedded_corpus_prefix(ByteTokenizer(), cache)


def _datasets(prefix, cache, seed=1234, samples=(64, 8, 0)):
    return build_datasets(prefix, ByteTokenizer(), SEQ, SPLIT, samples, seed,
                          cache_dir=os.path.join(cache, f"indices-{seed}"))


def _flatten(batches):
    return [[t.clone() for t in (*inputs, *targets)] for inputs, targets in batches]


@pytest.mark.timeout(30)
def test_byte_tokenizer_round_trip_and_vocab():
    tok = build_tokenizer()
    text = "Pipelines over tokens — naïve ünïcode, tabs\tand trailing space "
    ids = tok.tokenize(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.detokenize(ids) == text
    assert tok.detokenize(ids + [tok.eod]) == text
    assert (tok.vocab_size, tok.eod) == (257, 256) and tok.pad not in range(tok.vocab_size)
    assert padded_vocab_size(257, 1) == 384
    assert padded_vocab_size(257, 2) == 512
    assert padded_vocab_size(50257, 1) == 50304
    assert padded_vocab_size(384, 3) == 384


@pytest.mark.timeout(30)
def test_gpt2_vocabulary_reads_size_and_eod(tmp_path):
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text('{"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}')
    merges.write_text("#version: 0.2\na b\n")
    tok = build_tokenizer("GPT2BPETokenizer", str(vocab), str(merges))
    assert isinstance(tok, GPT2BPETokenizer)
    assert (tok.vocab_size, tok.eod) == (4, 3)
    assert tok.tokenize("ab") == [2]  # the merge "a b" applied (seqpipe-data's encoder, tests/test_preprocess.py)
    with pytest.raises(ValueError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", str(vocab), str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="not supported"):
        build_tokenizer("SentencePieceTokenizer")


@pytest.mark.timeout(30)
def test_embedded_corpus_is_a_few_hundred_kb_of_documents():
    docs = corpus_documents()
    assert len(docs) >= 90 and all(docs)
    assert 300_000 < sum(map(len, docs)) < 1_000_000
    assert not any("<|endoftext|>" in doc for doc in docs)


@pytest.mark.timeout(60)
def test_indexed_dataset_round_trip(tmp_path):
    tok = ByteTokenizer()
    docs = ["first document", "", "zweites Dokument über Bytes"]
    prefix = str(tmp_path / "sub" / "docs")
    write_indexed_dataset(docs, tok, prefix)
    data = IndexedDataset(prefix)
    assert len(data) == len(docs)
    assert data.index.dtype == numpy.uint16
    for i, doc in enumerate(docs):
        assert data[i].tolist() == tok.tokenize(doc) + [tok.eod]
    assert sorted(os.listdir(tmp_path / "sub")) == ["docs.bin", "docs.idx"]


def _build_corpus(cache):
    return embedded_corpus_prefix(ByteTokenizer(), cache)


@pytest.mark.timeout(120)
def test_corpus_build_is_idempotent_and_safe_in_parallel(tmp_path):
    cache = str(tmp_path)
    with mp.get_context("fork").Pool(3) as pool:
        prefixes = pool.map(_build_corpus, [cache] * 3)
    assert len(set(prefixes)) == 1
    prefix = prefixes[0]
    assert not [name for name in os.listdir(cache) if name.endswith(".tmp.bin") or name.endswith(".tmp.idx")]
    data = IndexedDataset(prefix)
    docs = corpus_documents()
    assert len(data) == len(docs)
    assert data[len(docs) - 1].tolist() == ByteTokenizer().tokenize(docs[-1]) + [256]
    stamp = os.stat(prefix + ".idx").st_mtime_ns
    assert _build_corpus(cache) == prefix and os.stat(prefix + ".idx").st_mtime_ns == stamp


@pytest.mark.timeout(60)
def test_samples_are_shifted_windows(prefix, cache):
    train, valid, test = _datasets(prefix, cache)
    assert test is None and len(train) >= 64 and len(valid) >= 8
    sample = train[5]
    assert sample["tokens"].shape == sample["labels"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert torch.all(sample["loss_mask"] == 1.0)
    assert 256 in torch.cat([train[i]["tokens"] for i in range(len(train))]).tolist()


@pytest.mark.timeout(60)
def test_pipeline_batch_layout(prefix, cache):
    train, _, _ = _datasets(prefix, cache)
    (tokens, position_ids), (labels, loss_mask) = next(pipeline_batches(train, 4, 0, 1))
    for t in (tokens, position_ids, labels):
        assert t.shape == (4, SEQ) and t.dtype == torch.int64
    assert loss_mask.shape == (4, SEQ) and loss_mask.dtype == torch.float32
    assert torch.equal(tokens[:, 1:], labels[:, :-1])


@pytest.mark.timeout(60)
def test_split_without_documents_fails_fast(prefix, cache):
    with pytest.raises(ValueError, match="gives the test split no documents"):
        _datasets(prefix, cache, samples=(64, 8, 4))


@pytest.mark.timeout(30)
def test_missing_prefix_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing .*nothing\.bin and .*nothing\.idx"):
        build_datasets(str(tmp_path / "nothing"), ByteTokenizer(), SEQ, SPLIT, (8, 0, 0), 1)
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"missing .*half\.idx$"):
        build_datasets(["1", str(tmp_path / "half")], ByteTokenizer(), SEQ, SPLIT, (8, 0, 0), 1)


@pytest.mark.timeout(90)
def test_order_is_deterministic_from_the_seed(prefix, cache):
    first = _flatten(pipeline_batches(_datasets(prefix, cache)[0], 2, 0, 1))
    # A fresh cache directory rebuilds the shuffle from the seed instead of reading it back.
    again = _flatten(pipeline_batches(_datasets(prefix, os.path.join(cache, "again"))[0], 2, 0, 1))
    other = _flatten(pipeline_batches(_datasets(prefix, cache, seed=4321)[0], 2, 0, 1))
    assert all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(first, other))


@pytest.mark.timeout(60)
def test_data_parallel_ranks_share_each_global_batch(prefix, cache):
    train, _, _ = _datasets(prefix, cache)
    mbs, dp = 2, 2
    ranks = [list(pipeline_batches(train, mbs, r, dp)) for r in range(dp)]
    whole = list(pipeline_batches(train, mbs * dp, 0, 1))
    assert len(ranks[0]) == len(ranks[1]) == len(whole) == len(train) // (mbs * dp)
    for step, batch in enumerate(whole):
        joined = torch.cat([ranks[r][step][0][0] for r in range(dp)])
        assert torch.equal(joined, batch[0][0])
    resumed = next(pipeline_batches(train, mbs, 1, dp, consumed_samples=3 * mbs * dp))
    assert torch.equal(resumed[1][0], ranks[1][3][1][0])
    with pytest.raises(ValueError, match="outside"):
        next(pipeline_batches(train, mbs, 2, dp))
