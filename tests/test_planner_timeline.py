"""The predicted timeline: dependencies hold, and its makespan is the planner's objective."""
import numpy as np
import pytest

from seqpipe_ds.planner import solve, timeline
from seqpipe_ds.planner.timeline import makespan


def by_key(segments):
    return {(s.stage, s.slice, s.phase): s for s in segments}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(5))
def test_forward_only_makespan_is_sum_plus_bubble(seed):
    rng = np.random.default_rng(seed)
    forward = list(rng.random(int(rng.integers(1, 12))) + 0.01)
    stages = int(rng.integers(1, 10))
    segments = [s for s in timeline(forward, [0.0] * len(forward), stages) if s.phase == "fwd"]
    assert makespan(segments) == pytest.approx(sum(forward) + (stages - 1) * max(forward))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(5))
def test_makespan_of_forward_and_backward(seed):
    # The longest chain goes down the stages with the forwards and back up with the backwards,
    # taking the largest forward and the largest backward at every extra stage.
    rng = np.random.default_rng(seed)
    n, stages = int(rng.integers(1, 12)), int(rng.integers(1, 10))
    forward, backward = list(rng.random(n) + 0.01), list(rng.random(n) + 0.01)
    update = float(rng.random())
    segments = timeline(forward, backward, stages, update)
    expected = sum(forward) + sum(backward) + (stages - 1) * (max(forward) + max(backward)) + update
    assert makespan(segments) == pytest.approx(expected)


@pytest.mark.timeout(60)
def test_dependencies_and_stage_order():
    rng = np.random.default_rng(7)
    n, stages = 6, 4
    forward, backward = list(rng.random(n) + 0.1), list(rng.random(n) + 0.1)
    segments = timeline(forward, backward, stages, update_time=0.05)
    seg = by_key(segments)
    eps = 1e-12
    for k in range(stages):
        row = [s for s in segments if s.stage == k]
        # Forwards in order, then backwards in reverse order, then the update; never overlapping.
        assert [(s.phase, s.slice) for s in row] == ([("fwd", i) for i in range(n)] +
                                                     [("bwd", i) for i in reversed(range(n))] + [("update", -1)])
        assert all(a.end <= b.start + eps for a, b in zip(row, row[1:]))
        for i in range(n):
            assert seg[k, i, "fwd"].end - seg[k, i, "fwd"].start == pytest.approx(forward[i])
            if k:
                assert seg[k, i, "fwd"].start >= seg[k - 1, i, "fwd"].end - eps
            if k + 1 < stages:
                assert seg[k, i, "bwd"].start >= seg[k + 1, i, "bwd"].end - eps


@pytest.mark.timeout(60)
def test_solved_plan_latency_equals_timeline_makespan():
    rng = np.random.default_rng(3)
    units, stages, update = 12, 6, 0.2
    l = np.arange(units + 1)[None, :, None]
    c = np.arange(units + 1)[None, None, :]
    b = np.arange(3)[:, None, None]
    grid = (0.05 + b * l * (1 + 0.05 * c)) * (1 + 0.1 * rng.random((3, units + 1, units + 1)))
    plan = solve(grid, batch_size=2, seq_len=units * 8, num_stages=stages, update_time=update)
    times = [grid[bs, length // 8, context // 8] for bs, lengths in zip(plan.batch_slices, plan.input_slices)
             for length, context in zip(lengths, np.cumsum([0] + lengths[:-1]))]
    fraction = 1 / 3  # backward a fixed multiple of forward: max(f) + max(b) = max(t)
    segments = timeline([t * fraction for t in times], [t * (1 - fraction) for t in times], stages, update)
    assert makespan(segments) == pytest.approx(plan.latency)


@pytest.mark.timeout(60)
def test_rejects_mismatched_times():
    with pytest.raises(ValueError, match="one forward and one backward"):
        timeline([1.0, 2.0], [1.0], 2)
    with pytest.raises(ValueError, match="num_stages"):
        timeline([1.0], [1.0], 0)
