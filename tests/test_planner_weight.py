"""The planner's side of split backwards (``slice-zb``): the profile times W on its own, the fit
makes it linear in the tokens, and the one cost model charges it as the unit's W and the rest of
the backward as its B, so a split schedule is priced from what was measured."""
import pytest
import torch

from seqpipe_ds.planner import fit
from seqpipe_ds.planner.costs import CostModel
from seqpipe_ds.planner.profile import ProfileSpec, _time_slice, stage_modules, weight_rows
from seqpipe_ds.schedules import SCHEDULES
from seqpipe_ds.slicing import make_plan

W0, W1, HEAD = 2e-4, 3e-7, 5e-7  # s, s per token (layers), s per token (LM head)


def weight_profile():
    """``recompute_profile`` plus split-backward rows whose W is exactly W0 + W1 * tokens (layers),
    and HEAD * tokens for the LM head."""
    from test_planner_recompute import recompute_profile
    profile = recompute_profile()
    profile["weight"] = [{"b": 1, "l": l, "c": c, "time": t, "forward": 0.4 * t, "weight": W0 + W1 * l}
                         for l, c, t in ((64, 0, 0.01), (128, 0, 0.02), (64, 64, 0.015))]
    for row in profile["stage_ends"]["last"]:
        row["weight"] = HEAD * row["b"] * row["l"]
    return profile


@pytest.mark.timeout(60)
def test_fit_recovers_the_weight_gradient_times():
    model = fit.fit_profile(weight_profile()).model
    assert model.weight_coef["layers"] == pytest.approx([W0, W1], rel=1e-9)
    assert model.weight_coef["last"] == pytest.approx([0.0, HEAD], abs=1e-12)
    assert float(model.weight_time(2, 100, last=False)) == pytest.approx(W0 + W1 * 200, rel=1e-9)
    assert float(model.weight_time(2, 100, last=True)) == pytest.approx(W0 + (W1 + HEAD) * 200, rel=1e-9)
    assert fit.LatencyModel.from_dict(model.to_dict()).weight_coef == model.weight_coef
    older = fit.fit_profile({k: v for k, v in weight_profile().items() if k != "weight"}).model
    assert older.weight_time(1, 64, last=False) is None  # not measured: the cost model's fallback


@pytest.mark.timeout(60)
def test_split_schedules_charge_w_and_the_rest_of_the_backward_as_b():
    model = fit.fit_profile(weight_profile()).model
    costs = CostModel.from_latency_model(model, stages=2, hidden_size=64)
    plan = make_plan(1, [64, 64], micro_batch_size=1, seq_length=128)
    times = costs.unit_times(plan)
    for name, schedule in SCHEDULES.items():
        result = costs.simulate(name, 2, plan)
        for seg in result.segments:
            if seg.kind not in ("F", "B", "W"):
                continue
            forward, backward = times[seg.stage, seg.action.unit]
            w = float(model.weight_time(*plan.shape(seg.action.unit), last=seg.stage == 1))
            expected = {"F": forward, "B": backward - w if schedule.splits_backward else backward, "W": w}
            assert seg.end - seg.start == pytest.approx(expected[seg.kind], rel=1e-12), (name, seg)
        assert any(seg.kind == "W" for seg in result.segments) == schedule.splits_backward
    # Without measured W, Zero Bubble PP's t_W = t_F: the unit's forward without context.
    fallback = CostModel(stages=1, compute=lambda s, b, l, c: 3.0 * b * l + c, forward_fraction=0.25)
    assert fallback.weight_time(0, 2, 8) == pytest.approx(0.25 * 48)


@pytest.mark.timeout(120)
def test_profile_times_w_inside_the_backward():
    spec = ProfileSpec(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=64,
                       micro_batch_size=1, granularity=16, warmup=1, repeats=3, recompute_modes=())
    from tqdm import tqdm

    from seqpipe_ds import parallel
    parallel.initialize()
    stage, _ = stage_modules(spec, torch.device("cpu"))
    total, forward, w = _time_slice(stage, 1, 32, 32, spec, torch.device("cpu"), lambda: None, split=True)
    assert 0 < w < total - forward
    assert all(p.grad is not None for p in stage.parameters())  # W accumulated every weight's gradient
    with tqdm(disable=True) as bar:
        rows = weight_rows(spec, stage, torch.device("cpu"), lambda: None, bar)
    assert [(r["b"], r["l"], r["c"]) for r in rows] == [(1, 32, 0), (1, 64, 0), (1, 32, 32)]
    assert all(0 < r["weight"] < r["time"] - r["forward"] for r in rows)


@pytest.mark.timeout(120)
def test_saved_tensor_meter_counts_w_buffers_until_w_runs():
    from seqpipe_ds import parallel
    from seqpipe_ds.memory import SavedTensorMeter
    from seqpipe_ds.model import wgrad
    parallel.initialize()
    spec = ProfileSpec(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32,
                       micro_batch_size=1, granularity=16, recompute_modes=())
    stage, _ = stage_modules(spec, torch.device("cpu"))
    x = torch.randn(1, 32, 64, requires_grad=True)
    meter, queue = SavedTensorMeter(stage.parameters()), wgrad.WeightGrads()
    with meter.hooks():
        out = stage(x)
        kept = meter.current
        with wgrad.deferring(queue):
            out.backward(torch.ones_like(out))
        del out
        # the graph is gone; what is left is exactly what the queue holds for W, less than the forward kept
        assert 0 < meter.current == queue.nbytes < kept
        assert all(p.grad is None for name, p in stage.named_parameters() if name.endswith("linear_fc2.weight"))
        queue.run()
        assert meter.current == 0 and len(queue) == 0
    # W reached the parameters themselves, though the hooks handed the backward other tensor objects
    assert all(p.grad is not None for p in stage.parameters())


@pytest.mark.timeout(60)
def test_memory_model_charges_w_buffers_as_kept_until_w():
    from seqpipe_ds.planner.costs import unit_tokens
    from seqpipe_ds.planner.memory_model import MemoryModel
    model = fit.fit_profile(weight_profile()).model
    costs = CostModel.from_latency_model(model, stages=2, hidden_size=64)
    memory = MemoryModel(static_bytes=[1e6, 2e6], bytes_per_token=[100.0, 200.0])
    plan = make_plan(1, [32, 32, 32, 32], micro_batch_size=1, seq_length=128)
    for micro_batches in (1, 3):
        split, plain = (costs.predict(name, micro_batches, plan, memory) for name in ("slice-zb", "slice-1f1b"))
        simulated = costs.simulate("slice-zb", micro_batches, plan)
        assert split.peak_bytes == memory.peaks(simulated.peak_held_tokens, unit_tokens(plan))
        assert all(z >= p for z, p in zip(split.peak_bytes, plain.peak_bytes))
        if micro_batches > 1:  # W buffers held past the next micro-batch's forwards count too
            assert simulated.peak_held_tokens[1] > simulated.peak_alive_tokens[1]
