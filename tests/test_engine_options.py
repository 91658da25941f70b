"""The Llama-style model (RoPE, SwiGLU, RMSNorm, GQA, untied output, no biases, ffn_hidden_size)
through the engine at PP 2, at PP 2 x TP 2 with sequence parallelism, and with full and selective
activation recomputation (the model's own and DeepSpeed's activation_checkpoint_interval), under every
registered schedule, in float64 with hidden dropout 0.1 (test_engine_exact.py says why):
per-step losses, every gradient at every step and the parameters after 3 Adam steps equal stock
DeepSpeed pipelining (with the same options) and a single process without tensor or sequence
parallelism (relative error <= 1e-10). One launch per layout plus one single-process launch."""
import pytest

import engine_cases
import launcher
from common import EXACT_MODEL, RTOL64 as RTOL, assert_close, float64
from engine_cases import merge
from seqpipe_ds.schedules import SCHEDULES
from test_model_options import LLAMA

LLAMA = {**LLAMA, **EXACT_MODEL}
LAYOUTS = {
    "pp2": (2, dict(pp=2, mbs=2, gas=2, model=LLAMA),
            [{"seq_slices": [8, 5, 3], "batch_slices": [1, 1], "schedule": s} for s in SCHEDULES]
            + [{"seq_slices": [[9, 7], [3, 13]], "batch_slices": 2, "schedule": s} for s in SCHEDULES]),
    # Under sequence parallelism every slice splits over the 2 TP ranks: even lengths.
    # Stock DeepSpeed must not partition the stage-to-stage tensors over the TP ranks: that assumes
    # the ranks hold the same activation, but under sequence parallelism they hold different tokens.
    "pp2_tp2_sp": (4, dict(pp=2, tp=2, mbs=2, gas=2, model={**LLAMA, "sequence_parallel": True},
                           ds_config={"pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}),
                   [{"seq_slices": [8, 6, 2], "batch_slices": [1, 1], "schedule": s} for s in SCHEDULES]),
    # Recomputation in the backward re-enters the slice's KV cache (stock DeepSpeed recomputes too).
    **{f"pp2_recompute_{g}": (2, dict(pp=2, mbs=2, gas=2, model={**LLAMA, "recompute_granularity": g}),
                              [{"seq_slices": [7, 5, 4], "batch_slices": [1, 1], "schedule": s} for s in SCHEDULES])
       for g in ("full", "selective")},
    # DeepSpeed's own activation checkpointing (PipelineModule's activation_checkpoint_interval).
    "pp2_ds_checkpoint": (2, dict(pp=2, mbs=2, gas=2, model=LLAMA, checkpoint_interval=1),
                          [{"seq_slices": [7, 5, 4], "batch_slices": [1, 1], "schedule": s} for s in SCHEDULES]),
}
PARAMS = [(name, v) for name, (_, _, variants) in LAYOUTS.items() for v in ["stock", *range(len(variants))]]


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, (world, case, variants) in LAYOUTS.items():
        per_rank = launcher.run(engine_cases.train_many, world, timeout=500,
                                runs=[(case, None)] + [(case, v) for v in variants])
        merged = [_gpt_layout(merge([rank[i] for rank in per_rank]), case.get("tp", 1))
                  for i in range(1 + len(variants))]
        out[name] = {"stock": merged[0], **dict(enumerate(merged[1:]))}
    # The same micro-batches on one process (LLAMA is the model of every layout, without SP).
    single = {"mbs": 2, "gas": 2, "model": LLAMA}
    out["reference"] = merge(launcher.run(engine_cases.train_many, 1, timeout=200, runs=[(single, None)])[0])
    return out


def _gpt_layout(run, tp):
    """SwiGLU's fc1 gathered from TP ranks is [gate_0; up_0; gate_1; up_1] (each rank holds
    [gate; up] of its share); the single process holds [gate; up]. Reorders the gathered tensors."""
    def reorder(name, t):
        if tp == 1 or not name.endswith("mlp.linear_fc1.weight"):
            return t
        return t.view(tp, 2, -1, t.shape[-1]).transpose(0, 1).reshape(t.shape)
    return {"losses": run["losses"], "params": {k: reorder(k, v) for k, v in run["params"].items()},
            "grads": [{k: reorder(k, v) for k, v in step.items()} for step in run["grads"]]}


def _compare(actual, expected, what):
    assert len(actual["losses"]) == engine_cases.STEPS and len(actual["grads"]) == engine_cases.STEPS
    assert_close({"losses": float64(actual["losses"])}, {"losses": float64(expected["losses"])}, RTOL,
                 f"{what} losses")
    for step, (a, e) in enumerate(zip(actual["grads"], expected["grads"])):
        assert_close(a, {k: e[k] for k in a}, RTOL, f"{what} grads step {step}")
    assert_close(actual["params"], {k: expected["params"][k] for k in actual["params"]}, RTOL, f"{what} params")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout,variant", PARAMS)
def test_llama_style_engine_matches_stock_and_single_process(runs, layout, variant):
    run = runs[layout][variant]
    what = f"llama-style {layout} {'stock' if variant == 'stock' else LAYOUTS[layout][2][variant]}"
    _compare(run, runs["reference"], what + " vs single process")
    if variant != "stock":
        _compare(run, runs[layout]["stock"], what + " vs stock DeepSpeed")
    # The untied output layer and the RMSNorm weights are among the compared parameters.
    assert {"5.weight", "6.output_layer.weight", "0.word_embeddings.weight"} <= set(run["params"])
