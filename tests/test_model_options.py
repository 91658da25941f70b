"""Today's Megatron GPT options (SwiGLU, RMSNorm, untied output, no biases, ffn_hidden_size,
grouped-query attention, RoPE), each alone and all together (Llama-style):

- our model run slice by slice (uneven sequence slices, uneven batch slices) equals the unsliced run;
- the unsliced run equals megatron-core's GPTModel (local spec, same options) with the same weights,
  moved through seqpipe_ds.model.interop, at TP 1 and TP 2 (per rank);
for the loss and every parameter gradient, fp32 relative error <= 1e-5. Plus the bad-input errors.

One launch per TP size runs every configuration.
"""
import pytest
import torch

import launcher
from common import assert_close, make_batch, tiny_config
from megatron_reference import megatron_gpt, megatron_loss

LLAMA = dict(swiglu=True, normalization="RMSNorm", untie_embeddings_and_output_weights=True, add_bias_linear=False,
             ffn_hidden_size=40, num_query_groups=2, position_embedding_type="rope", rotary_base=500)
OPTIONS = {
    "swiglu": dict(swiglu=True),
    "rmsnorm": dict(normalization="RMSNorm"),
    "untied": dict(untie_embeddings_and_output_weights=True),
    "no_bias": dict(add_bias_linear=False),
    "ffn_hidden_size": dict(ffn_hidden_size=40),
    "gqa": dict(num_query_groups=2),
    "rope": dict(position_embedding_type="rope", rotary_base=500),
    "llama": LLAMA,
    # Recomputation inside the model: the rerun in the backward replays the slice's KV cache.
    "llama_recompute_full": {**LLAMA, "recompute_granularity": "full"},
    "llama_recompute_selective": {**LLAMA, "recompute_granularity": "selective"},
}
# With sequence parallelism at TP 2 (tied output with biases, untied output, Llama-style): equal
# to the same model without it, whole and sliced.
SEQUENCE_PARALLEL = ("swiglu", "untied", "llama", "llama_recompute_full")
BATCH, SEQ = 3, 24
# Batch slices of 1 and 2 sequences, each cut into its own uneven sequence slices; under sequence
# parallelism (TP 2) every slice length is even.
BATCH_SLICES = [(slice(0, 1), [11, 2, 7, 4]), (slice(1, 3), [9, 1, 14])]
SP_BATCH_SLICES = [(slice(0, 1), [10, 2, 8, 4]), (slice(1, 3), [8, 2, 14])]


def _split(batch, rows, lengths):
    """The batch slice ``rows`` of every [b, s] tensor, cut into sequence slices."""
    part = [[t[rows] for t in group] for group in batch]
    return [tuple(tuple(t.split(lengths, dim=1)[j] for t in group) for group in part) for j in range(len(lengths))]


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _samples(rows=slice(None)):
    """The hidden-dropout key of the batch's rows (seqpipe_ds.model.dropout): rows are samples 0, 1, ..."""
    from seqpipe_ds.model import dropout
    return dropout.samples(dropout.Samples(seed=3, numbers=torch.arange(BATCH)[rows]))


def _run_whole(module, batch):
    with _samples():
        loss = module.loss_fn(module(batch[0]), batch[1])
    loss.backward()
    return loss.detach()


def _run_sliced(module, batch, batch_slices=BATCH_SLICES):
    """Forward of every slice in order, backward in reverse, per batch slice, as the engine runs them."""
    from seqpipe_ds.attention import KVCache
    normalizer = module.loss_fn.normalizer(batch[1])
    total = 0.0
    for rows, lengths in batch_slices:
        cache = KVCache(capacity=module.gpt_config.max_position_embeddings)
        losses = []
        for j, (inputs, labels) in enumerate(_split(batch, rows, lengths)):
            with cache.slice(j), _samples(rows):
                losses.append(module.loss_fn(module(inputs), labels, normalizer=normalizer))
        for j in reversed(range(len(lengths))):
            torch.autograd.backward(*cache.backward_args(j, [losses[j]], [None]))
            cache.release(j)
        total += sum(loss.detach() for loss in losses)
    return total


def _compare(name, tp):
    """Our model loaded with megatron's weights: whole vs megatron, then sliced; our weights back
    into megatron (strict load) for the other direction of the conversion."""
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    from seqpipe_ds.model.interop import from_megatron, load_stage, to_megatron
    config = tiny_config(**OPTIONS[name])
    ours = gpt_pipeline(config, parallel.initialize(tensor_parallel_size=tp), seed=7)
    megatron = megatron_gpt(config, tp, seed=11)
    load_stage(ours, from_megatron(megatron.state_dict(), config))
    batch = make_batch(BATCH, SEQ, config.vocab_size, seed=3)

    loss = _run_whole(ours, batch)
    whole = _grads(ours)
    reference = megatron_loss(megatron, batch)
    reference.backward()
    ours.zero_grad(set_to_none=True)
    sliced_loss = _run_sliced(ours, batch)
    megatron.load_state_dict(to_megatron(ours.state_dict(), config), strict=True)
    result = dict(loss=loss, grads=whole, megatron_loss=reference.detach(),
                  megatron_grads=from_megatron({n: p.grad for n, p in megatron.named_parameters()}, config),
                  sliced_loss=sliced_loss, sliced_grads=_grads(ours))
    if tp > 1 and name in SEQUENCE_PARALLEL:
        result["sp"] = _sequence_parallel(ours, batch)
    if tp == 1 and name == "llama":
        result["recompute"] = _recompute(ours, batch)
    return result


def _recompute(ours, batch):
    """DeepSpeed's full recomputation (activation_checkpoint_interval 1, transformer layers): loss,
    gradients and the peak bytes saved for backward, unsliced and sliced (its chunks rerun by
    layers.recomputed, which replays the KV cache); and seqpipe's set-up check, which accepts it."""
    import dataclasses

    import seqpipe_ds
    from seqpipe_ds import parallel
    from seqpipe_ds.memory import SavedTensorMeter
    from seqpipe_ds.model import gpt_pipeline
    out = {}
    for interval in (0, 1):
        module = gpt_pipeline(ours.gpt_config, parallel.initialize(), seed=5, activation_checkpoint_interval=interval)
        module.load_state_dict(ours.state_dict(), strict=True)
        module._precompute_checkpointable_values()  # DeepSpeed's pipeline engine does it at set-up
        meter = SavedTensorMeter(module.parameters())
        with meter.hooks():
            loss = _run_whole(module, batch)
        out[interval] = loss, _grads(module), meter.peak
        module.zero_grad(set_to_none=True)
        out[interval, "sliced"] = _run_sliced(module, batch), _grads(module)
    config = {"train_micro_batch_size_per_gpu": BATCH, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
              "seqpipe": {"enabled": True, "seq_length": SEQ, "seq_slices": 2}}
    try:
        seqpipe_ds.resolve_plan(config, module)
        out["seqpipe"] = "no error"
    except ValueError as e:
        out["seqpipe"] = str(e)
    # The model's own recomputation, run sliced: peak bytes saved for backward; and with dropout,
    # where the rerun must draw the first run's masks (megatron's checkpoint restores the RNG states).
    for dropout in (0.0, 0.1):
        for granularity in (None, "full", "selective"):
            config = dataclasses.replace(ours.gpt_config, recompute_granularity=granularity, hidden_dropout=dropout,
                                         attention_dropout=dropout)
            module = gpt_pipeline(config, parallel.initialize(), seed=5)
            module.load_state_dict(ours.state_dict(), strict=True)
            meter = SavedTensorMeter(module.parameters())
            torch.manual_seed(0)
            with meter.hooks():
                loss = _run_sliced(module, batch)
            out["sliced" if not dropout else "dropout", granularity] = loss, _grads(module), meter.peak
    return out


def _sequence_parallel(ours, batch):
    """The same weights with sequence parallelism: whole, and sliced into even slices (whose
    reference is the same slicing without it)."""
    import dataclasses
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    sp = gpt_pipeline(dataclasses.replace(ours.gpt_config, sequence_parallel=True),
                      parallel.initialize(tensor_parallel_size=2), seed=5)
    sp.load_state_dict(ours.state_dict(), strict=True)
    out = {}
    for module in (ours, sp):
        module.zero_grad(set_to_none=True)
        out[module is sp, "sliced"] = _run_sliced(module, batch, SP_BATCH_SLICES), _grads(module)
    sp.zero_grad(set_to_none=True)
    out[True, "whole"] = _run_whole(sp, batch), _grads(sp)
    return {"whole": out[True, "whole"], "sliced": out[True, "sliced"], "sliced_without": out[False, "sliced"],
            "odd_slices_error": _odd_slices_error(sp)}


def _odd_slices_error(module):
    """seqpipe's set-up check (run before any communication) of slices that do not split over TP 2."""
    import seqpipe_ds
    config = {"train_micro_batch_size_per_gpu": BATCH, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
              "seqpipe": {"enabled": True, "seq_length": SEQ, "seq_slices": [11, 13]}}
    try:
        seqpipe_ds.resolve_plan(config, module)
    except ValueError as e:
        return str(e)
    return "no error"


def compare_all(tp):
    return {name: _compare(name, tp) for name in OPTIONS}


@pytest.fixture(scope="module")
def tp1():
    return launcher.run(compare_all, 1, timeout=150, tp=1)[0]


@pytest.fixture(scope="module")
def tp2():
    return launcher.run(compare_all, 2, timeout=200, tp=2)


def _assert_exact(result, what):
    from seqpipe_ds.model.interop import key_map
    assert_close({"loss": result["loss"]}, {"loss": result["megatron_loss"]}, what=f"{what} loss vs megatron")
    assert_close(result["grads"], result["megatron_grads"], what=f"{what} gradients vs megatron")
    assert_close({"loss": result["sliced_loss"]}, {"loss": result["loss"]}, what=f"{what} sliced loss")
    assert_close(result["sliced_grads"], result["grads"], what=f"{what} sliced gradients")
    assert all(g.norm() > 0 for g in result["grads"].values()), what
    assert result["grads"].keys() == set(key_map(tiny_config(**OPTIONS[what.split()[0]])).values())


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_tp1(tp1, name):
    _assert_exact(tp1[name], f"{name} TP=1")


@pytest.mark.timeout(260)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_tp2(tp2, name):
    for rank, result in enumerate(tp2):
        _assert_exact(result[name], f"{name} TP=2 rank {rank}")
    # The ranks hold different shards of the first layer's fc1 (both halves of SwiGLU's [gate; up]).
    assert not torch.equal(*[r[name]["grads"]["1.mlp.linear_fc1.weight"] for r in tp2])


@pytest.mark.timeout(260)
@pytest.mark.parametrize("name", SEQUENCE_PARALLEL)
def test_sequence_parallel_tp2(tp2, name):
    for rank, result in enumerate(tp2):
        sp, what = result[name]["sp"], f"{name} TP=2 rank {rank} sequence-parallel"
        assert_close({"loss": sp["whole"][0]}, {"loss": result[name]["loss"]}, what=f"{what} loss")
        assert_close(sp["whole"][1], result[name]["grads"], what=f"{what} gradients")
        assert_close({"loss": sp["sliced"][0]}, {"loss": sp["sliced_without"][0]}, what=f"{what} sliced loss")
        assert_close(sp["sliced"][1], sp["sliced_without"][1], what=f"{what} sliced gradients")
        assert_close(sp["sliced_without"][1], result[name]["grads"], what=f"{what} even slices vs whole")
        assert sp["odd_slices_error"] == ("seqpipe: sequence parallelism splits every slice over the 2 TP ranks, but "
                                          "slice length(s) [11, 13] are not divisible by 2")


@pytest.mark.timeout(200)
def test_full_recomputation_llama_style(tp1):
    runs = tp1["llama"]["recompute"]
    (loss, grads, saved), (recomputed_loss, recomputed_grads, recomputed_saved) = runs[0], runs[1]
    assert_close({"loss": recomputed_loss}, {"loss": loss}, what="recomputed loss")
    assert_close(recomputed_grads, grads, what="recomputed gradients")
    assert_close(grads, tp1["llama"]["grads"], what="the reloaded model")
    # Only the inputs of the 4 transformer layers stay saved, not their insides.
    assert recomputed_saved < saved / 2, (recomputed_saved, saved)
    sliced_loss, sliced_grads = runs[1, "sliced"]  # DeepSpeed's chunks, rerun inside the slices
    assert_close({"loss": sliced_loss}, {"loss": loss}, what="sliced, DeepSpeed-recomputed loss")
    assert_close(sliced_grads, grads, what="sliced, DeepSpeed-recomputed gradients")
    assert runs["seqpipe"] == "no error"


@pytest.mark.timeout(200)
def test_model_recomputation_with_the_kv_cache_saves_fewer_bytes(tp1):
    """The exactness of sliced recomputation is test_option_tp1[llama_recompute_*]; here: it saves less."""
    runs = tp1["llama"]["recompute"]
    loss, grads, kept = runs["sliced", None]
    for granularity in ("full", "selective"):
        recomputed_loss, recomputed_grads, saved = runs["sliced", granularity]
        assert_close({"loss": recomputed_loss}, {"loss": loss}, what=f"{granularity} sliced loss")
        assert_close(recomputed_grads, grads, what=f"{granularity} sliced gradients")
        assert saved < kept, (granularity, saved, kept)
        # With dropout 0.1 the rerun redraws the first run's masks.
        dropped_loss, dropped_grads, _ = runs["dropout", None]
        recomputed_loss, recomputed_grads, _ = runs["dropout", granularity]
        assert_close({"loss": recomputed_loss}, {"loss": dropped_loss}, what=f"{granularity} dropout loss")
        assert_close(recomputed_grads, dropped_grads, what=f"{granularity} dropout gradients")
    assert runs["sliced", "full"][2] < kept / 2
    assert not torch.equal(runs["dropout", None][0], loss)  # the dropout did drop


@pytest.mark.timeout(30)
def test_option_parameters():
    """Each option changes the parameters it should (names and shapes); no process group needed."""
    from seqpipe_ds.model.interop import key_map
    base, llama = key_map(tiny_config()), key_map(tiny_config(**LLAMA))
    assert "embedding.position_embeddings.weight" in base and "embedding.position_embeddings.weight" not in llama
    assert not any(k.endswith(".bias") for k in llama)
    assert llama["output_layer.weight"] == "6.output_layer.weight"
    assert llama["embedding.word_embeddings.weight"] == "0.word_embeddings.weight"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("overrides, tp, message", [
    (dict(num_query_groups=3), 1, "num_query_groups 3 does not divide num_attention_heads 4"),
    (dict(num_query_groups=1), 2, "num_query_groups 1 is not divisible by the tensor-parallel size 2"),
    (dict(normalization="LayerNorm1P"), 1, "normalization 'LayerNorm1P' is not one of LayerNorm, RMSNorm"),
    (dict(position_embedding_type="alibi"), 1, "position_embedding_type 'alibi' is not one of"),
    (dict(rotary_percent=0.0), 1, r"rotary_percent 0.0 is not in \(0, 1\]"),
    (dict(sequence_parallel=True), 1, "sequence_parallel needs a tensor-parallel size > 1"),
    (dict(recompute_granularity="block"), 1, "recompute_granularity 'block' is not one of None, 'full'"),
])
def test_bad_options(overrides, tp, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides).validate(tp)


@pytest.mark.timeout(30)
def test_slices_must_split_over_tp_under_sequence_parallelism():
    assert tiny_config().slice_problems([3, 5], 2) == []
    assert tiny_config(sequence_parallel=True).slice_problems([4, 2], 2) == []
    assert tiny_config(sequence_parallel=True).slice_problems([3, 4, 5, 5], 2) == [
        "sequence parallelism splits every slice over the 2 TP ranks, but slice length(s) [3, 5] are not divisible "
        "by 2"]


@pytest.mark.timeout(30)
def test_presets_are_valid_models():
    from seqpipe_ds.model import presets
    for name in presets.PRESETS:
        config = presets.gpt_config(name)
        config.validate(8)  # every preset splits over TP 8
        assert config.max_position_embeddings == presets.preset(name)["seq_length"]
    llama = presets.gpt_config("llama2-70b", num_layers=2)
    assert (llama.num_layers, llama.query_groups, llama.ffn_size, llama.swiglu, llama.normalization) == (
        2, 8, 28672, True, "RMSNorm")
    # TeraPipe's MODEL_CONFIGS: (layers, hidden, seq, heads), GPT-3-style with 4h FFN.
    assert [presets.preset("gpt3-175b")[k] for k in presets.SHAPE] == [96, 12288, 96, 2048, 51200]
    assert presets.gpt_config("gpt3-13b-8192").max_position_embeddings == 8192
    with pytest.raises(ValueError, match="unknown model preset 'gpt4'; known: gpt3-1b, "):
        presets.preset("gpt4")
