"""Our GPT against megatron-core's own GPTModel (local spec) with the same weights, moved through
seqpipe_ds.model.interop; loading pipeline stages; clear errors for bad input.

Two launches serve every test: one process (TP=1, plus the single-process error checks) and two
processes (TP=2, then PP=2 for the stage loading).
"""
import traceback

import pytest
import torch

import launcher
from common import assert_close, make_batch, tiny_config
from megatron_reference import megatron_gpt, megatron_loss

BATCH, SEQ = 2, 24


def _compare(tp):
    """Loss and gradients of both models from megatron's initial weights, then the round trip of
    ours through megatron. Returns this TP rank's shards, and megatron's initial state dict."""
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    from seqpipe_ds.model.interop import from_megatron, load_stage, to_megatron
    config = tiny_config()
    ours = gpt_pipeline(config, parallel.initialize(tensor_parallel_size=tp), seed=7)
    megatron = megatron_gpt(config, tp, seed=11)
    ours_init = {n: p.detach().clone() for n, p in ours.named_parameters()}
    megatron_init = {k: v if v is None else v.clone() for k, v in megatron.state_dict().items()}

    load_stage(ours, from_megatron(megatron.state_dict(), config))
    batch = make_batch(BATCH, SEQ, config.vocab_size, seed=3)
    loss = ours.loss_fn(ours(batch[0]), batch[1])
    loss.backward()
    reference_loss = megatron_loss(megatron, batch)
    reference_loss.backward()

    megatron.load_state_dict(to_megatron(ours_init, config), strict=True)
    return dict(loss=loss.detach(), megatron_loss=reference_loss.detach(),
                grads={n: p.grad for n, p in ours.named_parameters()},
                megatron_grads=from_megatron({n: p.grad for n, p in megatron.named_parameters()}, config),
                ours_init=ours_init, round_trip=from_megatron(megatron.state_dict(), config),
                megatron_init=megatron_init, module=ours)


def _too_long(module):
    from seqpipe_ds.model import EmbeddingPipe
    config = module.gpt_config
    inputs, _ = make_batch(1, config.max_position_embeddings + 1, config.vocab_size)
    with pytest.raises(ValueError, match="sequence of 65 tokens is longer than max_position_embeddings 64"):
        EmbeddingPipe(config)(inputs)


def _beyond_kv_capacity(module):
    from seqpipe_ds.attention import KVCache
    cache = KVCache(capacity=32)
    tokens, positions = make_batch(BATCH, 40, module.gpt_config.vocab_size)[0]
    with cache.slice(0):
        module((tokens[:, :24], positions[:, :24]))
    with pytest.raises(ValueError, match="slice 1 ends at position 40, beyond the cache capacity 32"):
        with cache.slice(1):
            module((tokens[:, 24:], positions[:, 24:]))


def _kv_batch_mismatch(module):
    from seqpipe_ds.attention import KVCache
    cache = KVCache()
    with cache.slice(0):
        module(make_batch(BATCH, 8, module.gpt_config.vocab_size)[0])
    with pytest.raises(ValueError, match=r"K/V of shape \(3, 4, 8, 8\), which does not fit the cached \(2, 4, 8, 8\)"):
        with cache.slice(1):
            module(make_batch(3, 8, module.gpt_config.vocab_size)[0])


def _kv_heads_mismatch(module):
    from seqpipe_ds.attention import KVCache
    cache = KVCache()
    with cache.slice(0):
        cache.record(0, *[torch.zeros(BATCH, 4, 5, 8)] * 2)
    with pytest.raises(ValueError, match=r"K/V of shape \(2, 2, 3, 8\), which does not fit the cached \(2, 4, 5, 8\)"):
        with cache.slice(1):
            cache.record(0, *[torch.zeros(BATCH, 2, 3, 8)] * 2)


SINGLE_PROCESS_CHECKS = {f.__name__.lstrip("_"): f for f in (_too_long, _beyond_kv_capacity, _kv_batch_mismatch,
                                                              _kv_heads_mismatch)}


def single_process():
    result = _compare(1)
    module = result.pop("module")
    checks = {}
    for name, check in SINGLE_PROCESS_CHECKS.items():
        try:  # each check reports on its own, though all share this launch
            check(module)
            checks[name] = "ok"
        except BaseException:  # pytest.raises fails with an OutcomeException, a BaseException
            checks[name] = traceback.format_exc()
    return result, checks


def two_processes(megatron_tp1):
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    from seqpipe_ds.model.interop import from_megatron, load_stage
    result = _compare(2)
    del result["module"], result["megatron_init"]
    with pytest.raises(ValueError, match="num_attention_heads 3 is not divisible by the tensor-parallel size 2") as e:
        gpt_pipeline(tiny_config(hidden_size=48, num_attention_heads=3), parallel.initialize(tensor_parallel_size=2))
    result["heads_error"] = str(e.value)

    config = tiny_config()
    stage = gpt_pipeline(config, parallel.initialize(pipeline_parallel_size=2), seed=7)
    full = from_megatron(megatron_tp1, config)
    own = [n for n, _ in stage.named_parameters()]
    # The other stage's keys may be absent.
    load_stage(stage, {k: v for k, v in full.items() if k in own})
    loaded = all(torch.equal(p, full[n]) for n, p in stage.named_parameters())
    with pytest.raises(ValueError, match=rf"missing keys \['{own[-1]}'\]; unexpected keys \['9.weight'\]"):
        load_stage(stage, {**{k: v for k, v in full.items() if k != own[-1]}, "9.weight": full[own[-1]]})
    return result, own, loaded


@pytest.fixture(scope="module")
def tp1():
    return launcher.run(single_process, 1, timeout=120)[0]


@pytest.fixture(scope="module")
def tp2(tp1):
    return launcher.run(two_processes, 2, timeout=150, megatron_tp1=tp1[0]["megatron_init"])


def _assert_matches_megatron(result, what):
    assert_close({"loss": result["loss"]}, {"loss": result["megatron_loss"]}, what=f"{what} loss")
    assert_close(result["grads"], result["megatron_grads"], what=f"{what} gradients")
    assert len(result["grads"]) == 2 + 12 * tiny_config().num_layers + 2
    assert all(g.norm() > 0 for g in result["grads"].values())


@pytest.mark.timeout(150)
def test_matches_megatron_tp1(tp1):
    _assert_matches_megatron(tp1[0], "TP=1")


@pytest.mark.timeout(200)
def test_matches_megatron_tp2(tp1, tp2):
    for rank, (result, _, _) in enumerate(tp2):
        _assert_matches_megatron(result, f"TP=2 rank {rank}")
    # The ranks hold different halves of the heads.
    assert not torch.equal(*[r["grads"]["1.self_attention.linear_qkv.weight"] for r, _, _ in tp2])


@pytest.mark.timeout(200)
def test_round_trip_through_megatron(tp1, tp2):
    for result in [tp1[0]] + [r for r, _, _ in tp2]:
        assert result["round_trip"].keys() == result["ours_init"].keys()
        assert all(torch.equal(result["round_trip"][k], v) for k, v in result["ours_init"].items())


@pytest.mark.timeout(200)
def test_load_pipeline_stages(tp1, tp2):
    from seqpipe_ds.model.interop import key_map
    (_, first, first_loaded), (_, last, last_loaded) = tp2
    assert first_loaded and last_loaded
    # Only the tied embedding is on both stages; together they hold the whole model.
    assert set(first) & set(last) == {"tied_modules.embed.word_embeddings.weight",
                                      "tied_modules.embed.position_embeddings.weight"}
    assert set(first) | set(last) == set(key_map(tiny_config()).values())


@pytest.mark.timeout(200)
def test_tp_size_not_dividing_heads(tp1, tp2):
    for result, _, _ in tp2:  # pytest.raises in the launch matched it already
        assert result["heads_error"].startswith("invalid GPT configuration: num_attention_heads 3")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("check", sorted(SINGLE_PROCESS_CHECKS))
def test_bad_input(tp1, check):
    assert tp1[1][check] == "ok", tp1[1][check]


@pytest.mark.timeout(30)
def test_interop_rejects_foreign_keys():
    import io
    from seqpipe_ds.model.interop import from_megatron, key_map, to_megatron
    config = tiny_config(num_layers=1)
    megatron = {k: torch.zeros(1) for k in key_map(config)}
    with pytest.raises(ValueError, match=r"missing keys \[\]; unexpected keys \['output_layer.weight'\]"):
        from_megatron({**megatron, "output_layer.weight": torch.zeros(1)}, config)  # an untied output layer
    with pytest.raises(ValueError, match="decoder.layers.0.mlp.linear_fc1._extra_state holds extra state"):
        from_megatron({**megatron, "decoder.layers.0.mlp.linear_fc1._extra_state": io.BytesIO(b"fp8")}, config)
    with pytest.raises(ValueError, match=r"missing keys \['2.weight'\]; unexpected keys \[\]"):
        to_megatron({k: v for k, v in from_megatron(megatron, config).items() if k != "2.weight"}, config)
