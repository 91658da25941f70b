"""Packed documents from the command line: Megatron-LM's --reset-attention-mask --reset-position-ids
--eod-mask-loss in megatron_args, the data (embedded corpus and --data-path) and examples/pretrain_gpt.py."""
import pytest
import torch

from seqpipe_ds import megatron_args
from seqpipe_ds.data import (ByteTokenizer, build_datasets, document_starts, embedded_corpus_prefix,
                             pipeline_batches, write_indexed_dataset)
from test_example import ONE_PROCESS, SEQPIPE, assert_same_curve, train
from test_megatron_args import parse, parse_error

FLAGS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]


@pytest.mark.timeout(30)
def test_flags_reach_the_model_config():
    args = parse(*FLAGS)
    config = megatron_args.gpt_config(args, 256)
    assert config.reset_attention_mask and config.reset_position_ids and config.documents and args.eod_mask_loss
    assert not megatron_args.gpt_config(parse("--eod-mask-loss"), 256).documents  # the loss mask is the data's


@pytest.mark.timeout(30)
def test_a_tokenizer_without_end_of_document_id_is_one_clear_error(capsys, monkeypatch):
    class NoEod(ByteTokenizer):
        eod = None

    monkeypatch.setattr(megatron_args, "build_tokenizer", lambda *_: NoEod())
    err = parse_error(capsys, "--reset-attention-mask", "--eod-mask-loss")
    assert "--reset-attention-mask, --eod-mask-loss need the tokenizer's end-of-document id" in err
    parse()  # without the flags the tokenizer is fine


@pytest.mark.timeout(120)
def test_embedded_corpus_batches_follow_megatron(tmp_path):
    """The dataset's reset positions and EOD loss mask are megatron-core's; the batch's document
    starts agree with them (start = position - reset position) and restart after each EOD."""
    tokenizer = ByteTokenizer()
    prefix = embedded_corpus_prefix(tokenizer, str(tmp_path))
    train_set, _, _ = build_datasets(prefix, tokenizer, 2048, "969,30,1", (8, 0, 0), 1,
                                     cache_dir=str(tmp_path / "idx"), reset_position_ids=True,
                                     reset_attention_mask=True, eod_mask_loss=True)
    eods = 0
    for (tokens, positions, starts), (_, loss_mask) in pipeline_batches(train_set, 2, 0, 1, eod=tokenizer.eod):
        is_eod = tokens == tokenizer.eod
        eods += int(is_eod.sum())
        assert torch.equal(starts, torch.arange(tokens.shape[1]) - positions)
        assert torch.equal(starts, document_starts(tokens, tokenizer.eod))
        assert not loss_mask[is_eod].any() and loss_mask[~is_eod].all()
    assert eods > 0


def _short_documents(path):
    """A --data-path corpus of short documents (1..40 bytes), so that every sequence packs several."""
    g = torch.Generator().manual_seed(0)
    words = "the quick brown fox jumps over a lazy dog".split()
    docs = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
            for n in torch.randint(1, 9, (400,), generator=g)]
    prefix = str(path / "short_docs")
    write_indexed_dataset(docs, ByteTokenizer(), prefix)
    return prefix


@pytest.mark.timeout(900)
def test_packed_documents_train_the_same_curve_in_every_layout(tmp_path):
    """--data-path with short documents and the three flags: seqpipe (slices cutting documents), stock
    pipelining (documents carried to its second stage) and one process give one training and
    validation loss curve, and it is not the curve without the flags; the embedded corpus trains with
    the flags too."""
    data = ["--data-path", _short_documents(tmp_path), "--split", "9,1,0", "--eval-iters", "1"]
    sliced, out = train(tmp_path, "docs-seqpipe", SEQPIPE, [*FLAGS, *data])
    stock, _ = train(tmp_path, "docs-stock", extra=[*FLAGS, *data])
    single, _ = train(tmp_path, "docs-single", extra=[*FLAGS, *data], layout=ONE_PROCESS, processes=1)
    plain, _ = train(tmp_path, "plain-single", extra=data, layout=ONE_PROCESS, processes=1)
    assert "engine: SeqPipeEngine" in out and sorted(stock["loss"]) == [1, 2, 3, 4]
    assert_same_curve(sliced["loss"], stock["loss"], "packed documents: seqpipe vs stock DeepSpeed")
    assert_same_curve(sliced["loss"], single["loss"], "packed documents: seqpipe vs one process")
    for name, run in (("stock DeepSpeed", stock), ("one process", single)):
        assert_same_curve(sliced["valid_loss"], run["valid_loss"], f"packed documents: validation vs {name}")
    assert max(abs(plain["loss"][i] - single["loss"][i]) for i in single["loss"]) > 1e-3
    embedded, _ = train(tmp_path, "docs-embedded", SEQPIPE, [*FLAGS, "--eval-iters", "0"])
    assert sorted(embedded["loss"]) == [1, 2, 3, 4]
