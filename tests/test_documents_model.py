"""The GPT with packed documents equals megatron-core's GPTModel (local spec) given Megatron's own
reset attention mask and reset positions, in the loss and every gradient, at TP 1 and 2; run slice by
slice (block attention per document segment) it equals the unsliced run (dense mask); and the
documents matter (the same tokens without the flags give another loss)."""
import dataclasses

import pytest
import torch

import launcher
from common import assert_close, tiny_config
from engine_cases import SEQ, document_batch
from megatron_reference import megatron_gpt, megatron_loss
from test_model_options import LLAMA, _grads, _run_sliced, _run_whole

DOCUMENTS = dict(reset_attention_mask=True, reset_position_ids=True)
OPTIONS = {"gpt2": DOCUMENTS, "llama": {**LLAMA, **DOCUMENTS},
           "llama_recompute_selective": {**LLAMA, **DOCUMENTS, "recompute_granularity": "selective"}}
BATCH = 3  # rows of engine_cases.DOCUMENT_ROWS: documents cut by the slices below, single tokens, no EOD
BATCH_SLICES = [(slice(0, 1), [5, 1, 7, 3]), (slice(1, 3), [4, 4, 4, 4])]


def _compare(name, tp):
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    from seqpipe_ds.model.interop import from_megatron, load_stage
    config = tiny_config(**OPTIONS[name])
    ours = gpt_pipeline(config, parallel.initialize(tensor_parallel_size=tp), seed=7)
    megatron = megatron_gpt(config, tp, seed=11)
    load_stage(ours, from_megatron(megatron.state_dict(), config))
    batch = document_batch(BATCH, SEQ, config.vocab_size, seed=3)
    loss, grads = _run_whole(ours, batch), _grads(ours)
    reference = megatron_loss(megatron, batch)
    reference.backward()
    ours.zero_grad(set_to_none=True)
    sliced = _run_sliced(ours, batch, BATCH_SLICES), _grads(ours)
    plain = gpt_pipeline(dataclasses.replace(config, reset_attention_mask=False, reset_position_ids=False),
                         parallel.initialize(tensor_parallel_size=tp), seed=7)
    plain.load_state_dict(ours.state_dict(), strict=True)
    plain_loss = _run_whole(plain, ((batch[0][0], torch.arange(SEQ).expand(BATCH, SEQ)), batch[1]))
    return dict(loss=loss, grads=grads, megatron_loss=reference.detach(), sliced=sliced, plain_loss=plain_loss,
                megatron_grads=from_megatron({n: p.grad for n, p in megatron.named_parameters()}, config))


def compare_all(tp):
    return {name: _compare(name, tp) for name in OPTIONS}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("tp", [1, 2])
def test_documents_equal_megatron_and_slicing(tp):
    for rank in launcher.run(compare_all, tp, timeout=300, tp=tp):
        for name, r in rank.items():
            what = f"{name} TP {tp}"
            assert_close({"loss": r["loss"]}, {"loss": r["megatron_loss"]}, what=what + " loss vs megatron-core")
            assert_close(r["grads"], r["megatron_grads"], what=what + " grads vs megatron-core")
            assert_close({"loss": r["sliced"][0]}, {"loss": r["loss"]}, what=what + " sliced loss")
            assert_close(r["sliced"][1], r["grads"], what=what + " sliced grads")
            assert abs(r["plain_loss"] - r["loss"]) > 1e-3, f"{what}: the documents do not change the loss"
