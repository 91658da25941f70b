"""TeraPipe's optimal slicing: exact minimisation of sum(t_i) + (K - 1) * max(t_i) + update.

For a fixed bound ``t_max`` on every slice time the problem separates: each batch slice of b
sequences independently takes the sequence slicing with the least sum of slice times among those
whose slices all take <= t_max (a DP over prefix lengths), and the batch slicing is a DP over
prefixes of the batch on those sums. Batch slices only add their sums, because the (K - 1) * max
term is paid once for the whole iteration: it is the bound t_max itself, shared by all of them.
Writing S(t) for that least sum, the optimum is min over t of S(t) + (K - 1) * t, and t only
needs to range over the distinct grid values.

Evaluating every grid value would be slow (a 2048-token, granularity-8 grid has ~66k per batch
size), so candidates are pruned with two exact rules:

* S is non-increasing. If the plan found for bound t has largest slice m <= t, S is constant on
  [m, t], so no candidate in (m, t] beats that plan, whose true objective S(t) + (K - 1) * m is
  known.
* For a candidate t' below an evaluated t, S(t') >= S(t); once S(t) + (K - 1) * t' reaches the
  best objective found, t' cannot win.

Candidates are evaluated in batches spread over those still alive, and the DP is vectorised over
the batch of bounds, so only the prefix loop runs in Python.
"""
from dataclasses import dataclass
from typing import List

import numpy as np

# Bounds evaluated per round: large enough to amortise the Python prefix loop, small enough that
# the pruning of one round spares most of the next.
_BOUNDS_PER_ROUND = 48


@dataclass(frozen=True)
class Plan:
    """Batch slices (sequences each), each one's sequence slices (tokens), predicted iteration time."""
    batch_slices: List[int]
    input_slices: List[List[int]]
    latency: float


def solve(grid: np.ndarray, batch_size: int, seq_len: int, num_stages: int, granularity: int = 8,
          update_time: float = 0.0) -> Plan:
    """The slicing that minimises the predicted iteration time of ``num_stages`` pipeline stages.

    ``grid[b, l // g, c // g]`` is the time (forward + backward + sends) of a slice of ``b``
    sequences and ``l`` tokens after ``c`` tokens of context, ``inf`` where not allowed; ``b``
    runs 1..batch_size, ``l // g`` 1..seq_len // g and ``c // g`` 0..seq_len // g - 1.
    """
    units = _check(grid, batch_size, seq_len, num_stages, granularity, update_time)
    weights = _slice_weights(grid, batch_size, units)
    bound = _search(weights, num_stages)
    sums, maxima, choices = _prefix_dp(weights, np.array([bound]))
    batch_sum, batch_max, batch_choice = _batch_dp(sums[:, 0], maxima[:, 0])
    batch_slices = _walk_back(batch_choice, batch_size)
    input_slices = [[granularity * u for u in _walk_back(choices[b - 1, 0], units)] for b in batch_slices]
    latency = float(batch_sum + (num_stages - 1) * batch_max + update_time)
    return Plan(batch_slices=batch_slices, input_slices=input_slices, latency=latency)


def _check(grid, batch_size, seq_len, num_stages, granularity, update_time) -> int:
    if granularity < 1 or seq_len < granularity or seq_len % granularity:
        raise ValueError(f"seq_len {seq_len} must be a positive multiple of the granularity {granularity}")
    if batch_size < 1 or num_stages < 1:
        raise ValueError(f"batch_size ({batch_size}) and num_stages ({num_stages}) must be >= 1")
    if not np.isfinite(update_time) or update_time < 0:
        raise ValueError(f"update_time must be a finite time >= 0, got {update_time}")
    units = seq_len // granularity
    need = (batch_size + 1, units + 1, units)
    if grid.ndim != 3 or any(have < want for have, want in zip(grid.shape, need)):
        raise ValueError(f"grid of shape {grid.shape} is too small for batch {batch_size}, {units} sequence "
                         f"units: it needs at least {need} (grid[b, l // g, c // g])")
    return units


def _slice_weights(grid: np.ndarray, batch_size: int, units: int) -> np.ndarray:
    """weights[b - 1, p, q]: time of the slice covering units [q, p) for b sequences (inf if q >= p)."""
    p, q = np.tril_indices(units + 1, k=-1)
    weights = np.full((batch_size, units + 1, units), np.inf)
    weights[:, p, q] = grid[1:batch_size + 1, p - q, q]
    valid = weights[np.isfinite(weights)]
    if np.isnan(weights).any() or (valid < 0).any():
        raise ValueError("grid holds NaN or negative slice times (use inf for slices that are not allowed)")
    return weights


def _search(weights: np.ndarray, num_stages: int) -> float:
    """The bound on slice times under which the best plan is found, by pruned enumeration."""
    candidates = np.unique(weights[np.isfinite(weights)])
    if candidates.size == 0:
        raise ValueError("no slice of the grid has a finite time: nothing can be planned")
    stages_after_first = num_stages - 1
    alive = np.ones(candidates.size, dtype=bool)
    sum_lower_bound = np.zeros(candidates.size)
    best_objective, best_bound = np.inf, candidates[-1]
    while alive.any():
        alive_idx = np.flatnonzero(alive)
        # linspace always takes the largest alive bound, so the unconstrained plan comes first.
        picks = np.unique(alive_idx[np.linspace(0, alive_idx.size - 1, min(_BOUNDS_PER_ROUND, alive_idx.size))
                                    .round().astype(int)])
        bounds = candidates[picks]
        sums, maxima, _ = _prefix_dp(weights, bounds)
        total_sum, total_max, _ = _batch_dp(sums, maxima)
        feasible = np.isfinite(total_sum)
        # Masked so that 0 * inf (a single stage, infeasible bound) cannot turn into NaN.
        objective = total_sum + stages_after_first * np.where(feasible, total_max, 0.0)
        winner = int(np.argmin(objective))
        if objective[winner] < best_objective:
            best_objective, best_bound = objective[winner], bounds[winner]
        alive[picks] = False
        alive &= ~_covered(candidates, total_max[feasible], bounds[feasible])
        sum_at = np.full(candidates.size, -np.inf)
        sum_at[picks] = total_sum
        sum_lower_bound = np.maximum(sum_lower_bound, np.maximum.accumulate(sum_at[::-1])[::-1])
        alive &= sum_lower_bound + stages_after_first * candidates < best_objective
    if not np.isfinite(best_objective):
        raise ValueError("every slicing of the sequence uses a slice whose time is inf: nothing can be planned")
    return float(best_bound)


def _covered(candidates: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
    """Mask of candidates inside any interval (low, high]."""
    marks = np.zeros(candidates.size + 1, dtype=np.int64)
    np.add.at(marks, np.searchsorted(candidates, lows, side="right"), 1)
    np.add.at(marks, np.searchsorted(candidates, highs, side="right"), -1)
    return np.cumsum(marks[:-1]) > 0


def _prefix_dp(weights: np.ndarray, bounds: np.ndarray):
    """Least sum of slice times covering each prefix with slices <= bound, per batch size and bound.

    Returns (sums, maxima, choices): sums/maxima [b - 1, bound] for the whole sequence (maxima is
    the largest slice of the chosen slicing), choices [b - 1, bound, p] the length of the last
    slice of the best slicing of prefix p.
    """
    batch, positions, _ = weights.shape
    shape = (batch, bounds.size, positions)
    best = np.full(shape, np.inf)
    best[:, :, 0] = 0.0
    largest = np.zeros(shape)
    choices = np.zeros(shape, dtype=np.int64)
    rows = np.arange(batch)[:, None]
    for p in range(1, positions):
        w = weights[:, None, p, :p]
        cost = np.where(w <= bounds[None, :, None], best[:, :, :p] + w, np.inf)
        start = cost.argmin(axis=2)
        choices[:, :, p] = p - start
        best[:, :, p] = np.take_along_axis(cost, start[:, :, None], axis=2)[:, :, 0]
        last = weights[rows, p, start]
        largest[:, :, p] = np.maximum(np.take_along_axis(largest[:, :, :p], start[:, :, None], axis=2)[:, :, 0], last)
    return best[:, :, -1], largest[:, :, -1], choices


def _batch_dp(sums: np.ndarray, maxima: np.ndarray):
    """Least total over splits of the batch, given per-size sums/maxima [b - 1, ...].

    Returns (total, largest, choices) with choices[..., n] the size of the last batch slice of
    the best split of n sequences.
    """
    batch = sums.shape[0]
    total = np.full((batch + 1,) + sums.shape[1:], np.inf)
    total[0] = 0.0
    largest = np.zeros_like(total)
    choices = np.zeros(total.shape, dtype=np.int64)
    for n in range(1, batch + 1):
        sizes = np.arange(1, n + 1)
        cost = total[n - sizes] + sums[sizes - 1]
        pick = cost.argmin(axis=0)
        choices[n] = sizes[pick]
        total[n] = np.take_along_axis(cost, pick[None], axis=0)[0]
        prior = np.take_along_axis(largest[n - sizes], pick[None], axis=0)[0]
        largest[n] = np.maximum(prior, np.take_along_axis(maxima[sizes - 1], pick[None], axis=0)[0])
    return total[batch], largest[batch], np.moveaxis(choices, 0, -1)


def _walk_back(last_piece: np.ndarray, end: int) -> List[int]:
    """Piece lengths, first to last, from the table of the last piece's length of each prefix."""
    pieces = []
    while end > 0:
        pieces.append(int(last_piece[end]))
        end -= pieces[-1]
    return pieces[::-1]
