"""The slicing DP against brute force over every slicing, on small random grids."""
import importlib
import itertools
import time

import numpy as np
import pytest

from seqpipe_ds.planner import solve

# The package re-exports the function under the module's name.
solve_module = importlib.import_module("seqpipe_ds.planner.solve")


def compositions(n):
    """Every ordered split of n into positive parts."""
    for cuts in itertools.product((False, True), repeat=n - 1):
        parts, start = [], 0
        for position, cut in enumerate(cuts, 1):
            if cut:
                parts.append(position - start)
                start = position
        yield parts + [n - start]


def objective(grid, batch_slices, unit_slices, num_stages, update_time):
    times = [grid[b, l, c] for b, ls in zip(batch_slices, unit_slices)
             for l, c in zip(ls, np.cumsum([0] + ls[:-1]))]
    if not np.isfinite(times).all():
        return np.inf
    return sum(times) + (num_stages - 1) * max(times) + update_time


def brute_force(grid, batch_size, units, num_stages, update_time):
    best = np.inf
    for batch_slices in compositions(batch_size):
        for unit_slices in itertools.product(list(compositions(units)), repeat=len(batch_slices)):
            best = min(best, objective(grid, batch_slices, [list(s) for s in unit_slices], num_stages, update_time))
    return best


def random_grid(rng, batch_size, units, inf_fraction, coarse):
    grid = rng.random((batch_size + 1, units + 1, units + 1)) + 0.05
    if coarse:  # few distinct values: many ties between candidate bounds and between slicings
        grid = np.round(grid * 4) / 4 + 0.05
    grid[rng.random(grid.shape) < inf_fraction] = np.inf
    return grid


def enumerate_bounds(grid, batch_size, units, num_stages):
    """The paper's method without pruning: for every distinct slice time t as the bound, a plain
    DP over prefixes per batch size, then over the batch."""
    best = np.inf
    values = np.unique(grid[1:batch_size + 1, 1:units + 1, :units])
    for bound in values[np.isfinite(values)]:
        per_size = []
        for b in range(1, batch_size + 1):
            prefix = [0.0] + [np.inf] * units
            for p in range(1, units + 1):
                for q in range(p):
                    t = grid[b, p - q, q]
                    if t <= bound:
                        prefix[p] = min(prefix[p], prefix[q] + t)
            per_size.append(prefix[units])
        batch = [0.0] + [np.inf] * batch_size
        for n in range(1, batch_size + 1):
            batch[n] = min(batch[n - b] + per_size[b - 1] for b in range(1, n + 1))
        best = min(best, batch[batch_size] + (num_stages - 1) * bound)
    return best


@pytest.mark.timeout(120)
@pytest.mark.parametrize("per_round", [1, 4, 48])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_random_grids(seed, per_round, monkeypatch):
    # Few bounds per round make the pruning rules decide most candidates, not the evaluation.
    monkeypatch.setattr(solve_module, "_BOUNDS_PER_ROUND", per_round)
    rng = np.random.default_rng(seed)
    checked = 0
    for trial in range(40):
        batch_size = int(rng.integers(1, 4))
        units = int(rng.integers(1, 7 if batch_size < 3 else 6))  # 3 batch slices x 6 units: 32^3 slicings
        num_stages = int(rng.integers(1, 9))
        granularity = int(rng.choice([1, 8]))
        update_time = float(rng.choice([0.0, 0.3]))
        grid = random_grid(rng, batch_size, units, inf_fraction=float(rng.choice([0.0, 0.25])),
                           coarse=bool(trial % 2))
        expected = brute_force(grid, batch_size, units, num_stages, update_time)
        if not np.isfinite(expected):
            with pytest.raises(ValueError, match="nothing can be planned"):
                solve(grid, batch_size, units * granularity, num_stages, granularity, update_time)
            continue
        plan = solve(grid, batch_size, units * granularity, num_stages, granularity, update_time)
        assert plan.latency == pytest.approx(expected, rel=1e-12)
        # The plan must achieve what it claims, and be a valid slicing.
        assert sum(plan.batch_slices) == batch_size
        assert all(sum(s) == units * granularity and all(l % granularity == 0 for l in s) for s in plan.input_slices)
        unit_slices = [[l // granularity for l in s] for s in plan.input_slices]
        assert objective(grid, plan.batch_slices, unit_slices, num_stages, update_time) == pytest.approx(expected)
        checked += 1
    assert checked > 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(3))
def test_matches_unpruned_enumeration_on_larger_grids(seed):
    # Too many slicings for brute force, enough distinct values for many pruning rounds.
    rng = np.random.default_rng(100 + seed)
    batch_size, units, num_stages = 2, 20, int(rng.choice([2, 8, 32]))
    l = np.arange(units + 1)[None, :, None]
    c = np.arange(units + 1)[None, None, :]
    b = np.arange(batch_size + 1)[:, None, None]
    grid = (0.3 + b * l * (1 + 0.02 * c)) * (1 + 0.3 * rng.random((batch_size + 1, units + 1, units + 1)))
    grid[rng.random(grid.shape) < 0.05] = np.inf
    plan = solve(grid, batch_size, units * 8, num_stages)
    assert plan.latency == pytest.approx(enumerate_bounds(grid, batch_size, units, num_stages), rel=1e-12)


@pytest.mark.timeout(60)
def test_max_term_is_shared_by_batch_slices():
    # Per batch slice the best sequence slicing alone would be one slice (time 1.0 + 3*1.0), but the
    # whole iteration pays the (K-1) * max once: splitting the batch into [1, 1] at slice time 0.6
    # beats the unsplit batch at 1.0 only when the max is counted once, not per batch slice.
    grid = np.full((3, 2, 2), np.inf)
    grid[1, 1, 0] = 0.6
    grid[2, 1, 0] = 1.0
    plan = solve(grid, batch_size=2, seq_len=1, num_stages=4, granularity=1)
    assert plan.batch_slices == [1, 1]
    assert plan.latency == pytest.approx(0.6 + 0.6 + 3 * 0.6)


@pytest.mark.timeout(60)
def test_plan_shape_and_single_stage():
    grid = np.ones((2, 5, 5))
    plan = solve(grid, batch_size=1, seq_len=32, num_stages=1)
    # One stage: no bubble, so the fewest slices win (a single slice of cost 1).
    assert plan.batch_slices == [1] and plan.input_slices == [[32]] and plan.latency == 1.0


@pytest.mark.timeout(60)
def test_rejects_bad_arguments():
    grid = np.ones((2, 5, 5))
    with pytest.raises(ValueError, match="multiple of the granularity"):
        solve(grid, 1, 30, 2)
    with pytest.raises(ValueError, match="too small"):
        solve(grid, 2, 32, 2)
    with pytest.raises(ValueError, match="NaN or negative"):
        solve(np.where(grid > 0, -1.0, 0.0), 1, 32, 2)
    with pytest.raises(ValueError, match="num_stages"):
        solve(grid, 1, 32, 0)


@pytest.mark.timeout(60)
def test_gpt3_175b_sized_grid_is_fast():
    # Shape of GPT3-175B's problem: seq 2048 at granularity 8, batch 2, 96 stages; every entry distinct.
    rng = np.random.default_rng(0)
    units = 256
    l = np.arange(units + 1)[None, :, None]
    c = np.arange(units + 1)[None, None, :]
    b = np.arange(3)[:, None, None]
    grid = b * (1e-3 + 1e-4 * l + 1e-7 * l * c) * (1 + 0.01 * rng.random((3, units + 1, units + 1)))
    grid[:, 0, :] = np.inf
    start = time.perf_counter()
    plan = solve(grid, batch_size=2, seq_len=2048, num_stages=96)
    elapsed = time.perf_counter() - start
    assert sum(map(sum, plan.input_slices)) == 2048 * len(plan.batch_slices)
    assert elapsed < 3.0  # ~0.1 s here; the margin absorbs a loaded CI machine
