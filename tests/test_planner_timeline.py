"""Predicted timelines come from the schedule simulator; for terapipe on one micro-batch their
makespan is the planner's objective, and slice-1f1b's follows its own shape."""
import numpy as np
import pytest

from seqpipe_ds.planner import predict, solve
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
        assert [(s.kind, s.action.seq_slice) for s in row] == ([(FORWARD, i) for i in range(n)] +
                                                              [(BACKWARD, i) for i in reversed(range(n))] + [(STEP, -1)])


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
    result = predict(plan, lambda bs, length, context: grid[bs, length // 8, context // 8], stages,
                     update_time=update)
    assert result.makespan == pytest.approx(solved.latency)


@pytest.mark.timeout(60)
def test_rejects_unpredictable_slices():
    plan = _plan(2)
    with pytest.raises(ValueError, match="cannot predict"):
        predict(plan, lambda b, l, c: np.inf, 2)
