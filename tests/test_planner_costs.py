"""The one cost model: predicted timelines come from the schedule simulator; for terapipe on one
micro-batch with identical stages their makespan is the DP's objective, slice-1f1b's follows its own
shape, and ``seqpipe-plan show`` reproduces every plan file's recorded time."""
import json
import re

import numpy as np
import pytest

from seqpipe_ds.cli.plan import main
from seqpipe_ds.planner import CostModel, read_plans, solve
from seqpipe_ds.planner.costs import contexts
from seqpipe_ds.planner.fit import read_model_file
from seqpipe_ds.schedules import Costs, lower, simulate
from seqpipe_ds.schedules.actions import BACKWARD, FORWARD, STEP
from seqpipe_ds.slicing import make_plan


def _costs(forward, backward, update=0.0):
    return Costs(lambda stage, a: (forward if a.kind == FORWARD else backward)[a.seq_slice], step=update)


def _plan(n):
    return make_plan(1, [1] * n, micro_batch_size=1, seq_length=n)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(5))
def test_forward_only_makespan_is_sum_plus_bubble(seed):
    rng = np.random.default_rng(seed)
    forward = list(rng.random(int(rng.integers(1, 12))) + 0.01)
    stages = int(rng.integers(1, 10))
    plan = _plan(len(forward))
    result = simulate(lower("terapipe", stages, 1, plan), plan, _costs(forward, [0.0] * len(forward)))
    assert result.makespan == pytest.approx(sum(forward) + (stages - 1) * max(forward))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(5))
def test_terapipe_makespan_of_forward_and_backward(seed):
    # The longest chain goes down the stages with the forwards and back up with the backwards,
    # taking the largest forward and the largest backward at every extra stage.
    rng = np.random.default_rng(seed)
    n, stages = int(rng.integers(1, 12)), int(rng.integers(1, 10))
    forward, backward = list(rng.random(n) + 0.01), list(rng.random(n) + 0.01)
    update = float(rng.random())
    plan = _plan(n)
    result = simulate(lower("terapipe", stages, 1, plan), plan, _costs(forward, backward, update))
    expected = sum(forward) + sum(backward) + (stages - 1) * (max(forward) + max(backward)) + update
    assert result.makespan == pytest.approx(expected)
    for stage in range(stages):
        row = result.stage_segments(stage)
        assert [(s.kind, s.action.seq_slice) for s in row] == (
            [(FORWARD, i) for i in range(n)] + [(BACKWARD, i) for i in reversed(range(n))] + [(STEP, -1)])


@pytest.mark.timeout(60)
def test_slice_1f1b_on_equal_slices_is_1f1b_over_slices():
    # m micro-batches of k equal slices, forward f and backward b per slice, K stages: like 1F1B over
    # m*k units, the makespan is (m*k + K - 1) * (f + b) when the warm-up covers a whole sequence.
    f, b, k, m, stages = 1.0, 2.0, 4, 3, 2
    plan = make_plan(1, k, micro_batch_size=1, seq_length=4 * k)
    result = simulate(lower("slice-1f1b", stages, m, plan), plan, _costs([f] * k, [b] * k))
    assert result.makespan == pytest.approx((m * k + stages - 1) * (f + b))
    terapipe = simulate(lower("terapipe", stages, m, plan), plan, _costs([f] * k, [b] * k))
    assert terapipe.makespan == pytest.approx(m * (k + stages - 1) * (f + b))  # drains per micro-batch


@pytest.mark.timeout(60)
def test_solved_plan_latency_equals_predicted_makespan():
    rng = np.random.default_rng(3)
    units, stages, update = 12, 6, 0.2
    l = np.arange(units + 1)[None, :, None]
    c = np.arange(units + 1)[None, None, :]
    b = np.arange(3)[:, None, None]
    grid = (0.05 + b * l * (1 + 0.05 * c)) * (1 + 0.1 * rng.random((3, units + 1, units + 1)))
    solved = solve(grid, batch_size=2, seq_len=units * 8, num_stages=stages, update_time=update)
    plan = make_plan(solved.batch_slices, solved.input_slices, 2, units * 8)
    costs = CostModel(stages, lambda s, bs, length, context: grid[bs, length // 8, context // 8], step=update)
    assert costs.predict("terapipe", 1, plan).makespan == pytest.approx(solved.latency)


@pytest.mark.timeout(60)
def test_rejects_unpredictable_slices():
    plan = _plan(2)
    with pytest.raises(ValueError, match="cannot predict"):
        CostModel(2, lambda s, b, l, c: np.inf).costs(plan)


def test_contexts_count_the_tokens_before_each_slice_of_its_batch_slice():
    plan = make_plan([1, 2], [[16, 8, 8], [24, 8]], micro_batch_size=3, seq_length=32)
    assert contexts(plan) == {(0, 0): 0, (0, 1): 16, (0, 2): 24, (1, 0): 0, (1, 1): 24}


@pytest.fixture
def model_with_ends(tmp_path):
    """A fitted model whose stages differ (embedding, LM head), with sends and a forward share != 1/3."""
    from test_planner_fit import synthetic_profile
    profile = synthetic_profile(noise=0.0, seq_length=128, granularity=16, context_samples=40)
    profile["stage_ends"] = {end: [{"b": b, "l": l, "time": base + 1e-6 * b * l} for b in (1, 2) for l in (16, 128)]
                             for end, base in (("first", 1e-4), ("last", 2e-3))}
    profile["saved_bytes_per_token"] = {"first": 5000.0, "middle": 4900.0, "last": 8000.0}
    for row in profile["compute"]:
        row["forward"] = 0.4 * row["time"]
    path, model = tmp_path / "profile.json", tmp_path / "model.json"
    path.write_text(json.dumps(profile))
    assert main(["fit", str(path), "--out", str(model)]) == 0
    return model


def _shown_makespan(capsys, *argv):
    capsys.readouterr()
    assert main(["show", *argv]) == 0
    return float(re.search(r"timeline makespan: ([\d.e+-]+) s", capsys.readouterr().out).group(1))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("objective", ["makespan", "dp"])
def test_show_reproduces_a_plan_files_recorded_time_exactly(tmp_path, model_with_ends, capsys, objective):
    plans = tmp_path / "plans.json"
    assert main(["solve", str(model_with_ends), "--num-stages", "3", "--batch-size", "4", "--objective", objective,
                 "--global-batch-size", "4", "--plan-file", str(plans)]) == 0
    entry, = read_plans(str(plans))
    assert entry.micro_batches * entry.micro_batch_size == 4 if objective == "makespan" else entry.micro_batches == 1
    assert read_model_file(str(model_with_ends)).model.forward_fraction == pytest.approx(0.4)
    # Printed with 6 digits: the value itself is checked through the library below.
    assert _shown_makespan(capsys, str(plans), "--latency-model", str(model_with_ends)) == float(f"{entry.latency:.6g}")
    from seqpipe_ds.planner.planning import simulate_entry
    assert simulate_entry(read_model_file(str(model_with_ends)), entry).makespan == entry.latency


@pytest.mark.timeout(120)
def test_older_files_read_without_micro_batches_and_with_bytes_per_token(tmp_path, model_with_ends, capsys):
    plans = tmp_path / "plans.json"
    assert main(["solve", str(model_with_ends), "--num-stages", "2", "--batch-size", "4", "--global-batch-size", "8",
                 "--dp", "2", "--plan-file", str(plans)]) == 0
    written, = json.loads(plans.read_text())
    recorded = written.pop("micro_batches")
    plans.write_text(json.dumps([written]))
    assert read_plans(str(plans))[0].micro_batches == recorded  # the global batch over DP and the micro batch
    data = json.loads(model_with_ends.read_text())
    data["model"]["bytes_per_token"] = data["model"].pop("message_bytes_per_token")
    model_with_ends.write_text(json.dumps(data))
    assert read_model_file(str(model_with_ends)).model.message_bytes_per_token == 64 * 4
    assert _shown_makespan(capsys, str(plans), "--latency-model", str(model_with_ends)) == float(
        f"{written['latency']:.6g}")


@pytest.mark.timeout(120)
def test_bench_plans_and_their_predictions_are_the_recorded_times(tmp_path, model_with_ends):
    from seqpipe_ds.planner.planning import bench_plans, predict_run, variant_plan
    dp_file, makespan_file = str(tmp_path / "dp.json"), str(tmp_path / "makespan.json")
    dp, searched = bench_plans(str(model_with_ends), 2, 2, 4, dp_file, makespan_file)
    (dp_entry,), (searched_entry,) = read_plans(dp_file), read_plans(makespan_file)
    assert dp_entry.schedule is None and dp_entry.latency == dp.makespan and dp_entry.model["num_layers"] == 4
    assert searched_entry.schedule == searched.schedule and searched_entry.predicted_peak_bytes == searched.peak_bytes
    found = read_model_file(str(model_with_ends))
    variant = {"micro_batch_size": searched.micro_batch_size, "gradient_accumulation": searched.micro_batches,
               "seqpipe": {"plan": makespan_file}}
    schedule, plan, micro_batches = variant_plan(variant, 2, 2, 128)
    assert (schedule, plan, micro_batches) == (searched.schedule, searched.plan, searched.micro_batches)
    assert predict_run(found, 2, schedule, micro_batches, plan, [1.0, 1.0]).makespan == searched_entry.latency
    stock = {"micro_batch_size": 1, "gradient_accumulation": 2, "seqpipe": None}
    assert variant_plan(stock, 2, 2, 128) == ("slice-1f1b", make_plan(1, 1, 1, 128), 2)
    unsliced = predict_run(None, 2, "slice-1f1b", 2, make_plan(1, 1, 1, 128), [1.0, 1.0])
    assert unsliced.peak_activation_bytes == [256.0, 128.0]  # 1F1B keeps 2 sequences on the first stage
