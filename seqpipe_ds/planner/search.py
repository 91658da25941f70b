"""Schedule-exact planning: the slicing, schedule and micro-batch split with the least simulated step.

TeraPipe's DP (``solve``) minimises sum(t) + (stages - 1) * max(t), the exact makespan of its order
only when every stage takes the same time for a slice and backward is a fixed multiple of forward.
Here every candidate is scored by the schedule simulator (``seqpipe_ds.schedules``) on the programs
that will run, with each stage's own costs: the first stage's embedding, the last stage's LM head
and loss, the measured forward share, the sends and the optimizer step (``costs.CostModel``); and its
peak memory per stage comes from the same simulation (``memory_model``). The search:

* for every micro-batch size dividing the batch (gradient accumulation = batch / micro-batch) and
  every schedule asked for,
* scores seed slicings: TeraPipe's DP on the bottleneck stage's slice times, the DP's least-sum
  slicing under several bounds on the slice time (the uniform slicings' longest slice), uniform
  slicings and Seq1F1B's equal-FLOP slicings (earlier slices longer, as attention over the context
  makes later tokens dearer), each with the micro-batch as one batch slice or one per sequence;
* then improves the best few by local moves (one granularity unit from a slice to its neighbour,
  splitting a slice, merging two), keeping a move while it lowers the makespan, until none does.

It is a heuristic: on small grids it is checked against exhaustive enumeration
(tests/test_planner_search.py). A candidate fits when every stage's predicted peak is within the
memory limit; the fastest fitting candidate wins, and when none fits the error names the smallest
peak found.
"""
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..schedules import SCHEDULES
from ..slicing import SlicePlan, even_split, make_plan
from .costs import Candidate, CostModel, contexts
from .memory_model import MemoryModel, format_bytes
from .recompute import RECOMPUTE_MODES, check_mode
from .solve import solve

SCHEDULE_NAMES = tuple(SCHEDULES)  # every registered schedule
_UNIFORM_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_CLIMB_STARTS = 3  # best candidates per (schedule, micro-batch size) that local moves start from


class NoFit(ValueError):
    """No candidate fits the memory limit; ``smallest`` is the candidate with the least peak."""

    def __init__(self, message: str, smallest: "Candidate"):
        super().__init__(message)
        self.smallest = smallest


@dataclass
class SearchResult:
    best: Candidate
    evaluated: int  # candidates simulated
    smallest_peak: Candidate  # the candidate with the least peak memory, fitting or not
    fitting: int  # candidates within the memory limit
    candidates: List[Candidate] = field(default_factory=list)  # every fitting candidate, fastest first


def prefer_unsliced(result: SearchResult, margin: float) -> SearchResult:
    """``result`` with stock DeepSpeed's own configuration (unsliced 1F1B: slice-1f1b, one unit per
    micro-batch) as the best when it is predicted within ``margin`` (a fraction) of the fastest: a
    prediction is only as good as its stated error (the in-engine calibration's), and within it a
    sliced plan's gain is not known to exist, while its cost of switching is real."""
    unsliced = [c for c in result.candidates if c.schedule == "slice-1f1b" and len(c.plan.units()) == 1]
    if margin <= 0 or not unsliced or unsliced[0].makespan > result.best.makespan * (1 + margin):
        return result
    chosen = replace(unsliced[0], source=f"unsliced 1F1B, within {margin:.0%} of the fastest")
    return replace(result, best=chosen)


def equal_flop_lengths(seq_len: int, parts: int, granularity: int, hidden_size: int) -> List[int]:
    """Seq1F1B's partition (thunlp/Seq1F1B, read only): slices of equal FLOPs. Per layer and token at
    position p the matmuls cost ~24*h^2 and attention ~4*h*p multiply-adds, so the FLOPs up to
    position x grow as 6*h*x + x^2/2; cuts are placed where that reaches k/parts of the total,
    rounded to the granularity."""
    units = seq_len // granularity
    if parts > units:
        raise ValueError(f"{parts} slices of >= {granularity} tokens do not fit in {seq_len}")
    x = np.arange(units + 1) * granularity
    work = 6.0 * hidden_size * x + x * x / 2.0
    cuts = [0]
    for k in range(1, parts):
        unit = int(np.abs(work - work[-1] * k / parts).argmin())
        unit = min(max(unit, cuts[-1] + 1), units - (parts - k))  # every slice keeps >= 1 unit
        cuts.append(unit)
    cuts.append(units)
    return [granularity * (b - a) for a, b in zip(cuts, cuts[1:])]


def _plan(batch_slices: Sequence[int], seq_slices: Sequence[Sequence[int]]) -> SlicePlan:
    return SlicePlan(tuple(batch_slices), tuple(tuple(s) for s in seq_slices))


def _seeds(costs: CostModel, micro_batch: int, seq_len: int, granularity: int,
           grid: np.ndarray) -> Dict[SlicePlan, str]:
    """Seed slicings of one micro-batch, each with where it came from."""
    units = seq_len // granularity
    seeds: Dict[SlicePlan, str] = {}
    groupings = [[micro_batch]] + ([[1] * micro_batch] if micro_batch > 1 else [])
    counts = [k for k in _UNIFORM_COUNTS if k <= units]
    for k in counts:
        for kind, lengths in (("uniform", [granularity * u for u in even_split(units, k)]),
                              ("equal-FLOP", equal_flop_lengths(seq_len, k, granularity, costs.hidden_size))):
            for batch in groupings:
                seeds.setdefault(_plan(batch, [lengths] * len(batch)), f"{kind} {k}")
    try:
        dp = solve(grid, micro_batch, seq_len, costs.stages, granularity, costs.step)
    except ValueError:  # no slicing the latency model can time at this micro-batch size
        return seeds
    seeds.setdefault(_plan(dp.batch_slices, dp.input_slices), "TeraPipe DP")
    # The DP's least-sum slicing under bounds on the slice time: the uniform slicings' longest slices.
    for k in counts[1:]:
        uniform = _plan([micro_batch], [[granularity * u for u in even_split(units, k)]])
        context = contexts(uniform)
        bound = max(grid[micro_batch, uniform.seq_slices[0][s] // granularity, context[0, s] // granularity]
                    for _, s in uniform.units())
        try:
            bounded = solve(np.where(grid <= bound, grid, np.inf), micro_batch, seq_len, 1, granularity)
        except ValueError:  # no slicing keeps every slice under this bound
            continue
        seeds.setdefault(_plan(bounded.batch_slices, bounded.input_slices), f"DP bound {k}")
    return seeds


def neighbours(plan: SlicePlan, granularity: int) -> Iterable[SlicePlan]:
    """Local moves on one batch slice's sequence slicing: a granularity unit to a neighbour slice,
    a slice split in two, two neighbour slices merged."""
    g = granularity
    for i, lengths in enumerate(plan.seq_slices):
        options = []
        for j in range(len(lengths) - 1):
            for d in (g, -g):
                a, b = lengths[j] + d, lengths[j + 1] - d
                if a >= g and b >= g:
                    options.append(lengths[:j] + (a, b) + lengths[j + 2:])
            options.append(lengths[:j] + (lengths[j] + lengths[j + 1],) + lengths[j + 2:])
        for j, length in enumerate(lengths):
            if length >= 2 * g:
                half = g * (length // g // 2)
                options.append(lengths[:j] + (length - half, half) + lengths[j + 1:])
        for option in options:
            yield SlicePlan(plan.batch_slices, plan.seq_slices[:i] + (option,) + plan.seq_slices[i + 1:])


MemoryByMode = Union[MemoryModel, Mapping[str, MemoryModel]]


def search(costs: CostModel, batch_size: int, seq_len: int, granularity: int,
           schedules: Sequence[str] = SCHEDULE_NAMES, memory: Optional[MemoryByMode] = None,
           memory_limit: Optional[float] = None, micro_batch_sizes: Optional[Sequence[int]] = None,
           local_moves: bool = True, progress: Optional[Callable[[str], None]] = None,
           recompute_modes: Sequence[str] = ("none",)) -> SearchResult:
    """The candidate with the least simulated makespan whose every stage fits ``memory_limit``.

    ``batch_size``: sequences per step on one pipeline (per data-parallel replica). Every
    recomputation mode of ``recompute_modes`` is searched (one mode for all stages: the model has one
    GPTConfig), priced by ``costs.with_recompute(mode)`` and ``memory`` (one MemoryModel for one
    mode, or a mapping from each mode to its own). Raises ValueError for bad input, or NoFit
    when no candidate fits (naming the smallest peak found and its mode)."""
    memories = _memory_by_mode(memory, recompute_modes)
    for mode in recompute_modes:
        _check(costs.with_recompute(mode), batch_size, seq_len, granularity, schedules, memories[mode], memory_limit)
    sizes = list(micro_batch_sizes or divisors(batch_size))
    if any(m < 1 or batch_size % m for m in sizes):
        raise ValueError(f"micro-batch sizes {sizes} must divide the batch of {batch_size}")
    rank = _ranking(memory_limit)
    seen: Dict[Tuple, Candidate] = {}
    for mode in recompute_modes:
        priced = costs.with_recompute(mode)

        def score(schedule, micro_batches, plan, source, priced=priced, memory=memories[mode]):
            key = (priced.recompute, schedule, micro_batches, plan)
            if key not in seen:
                try:
                    seen[key] = priced.predict(schedule, micro_batches, plan, memory, source)
                except ValueError:  # a schedule that cannot run it (ScheduleError), or a slice the model cannot time
                    return None
            return seen[key]

        for micro_batch in sizes:
            grid = priced.bottleneck_grid(micro_batch, seq_len, granularity)
            seeds = _seeds(priced, micro_batch, seq_len, granularity, grid)
            for schedule in schedules:
                if progress:
                    progress(f"{schedule}, recompute {mode}, micro-batches of {micro_batch}: {len(seeds)} seeds")
                scored = [c for c in (score(schedule, batch_size // micro_batch, p, s) for p, s in seeds.items()) if c]
                if not local_moves:
                    continue
                for start in sorted(scored, key=rank)[:_CLIMB_STARTS]:
                    _climb(start, granularity, score, rank)
    if not seen:
        raise ValueError("no candidate slicing could be scheduled")
    ranked = sorted(seen.values(), key=rank)
    best = fastest_fitting(ranked, memory_limit)
    fitting = [c for c in ranked if _fits(c, memory_limit)]
    return SearchResult(best=best, evaluated=len(seen), smallest_peak=min(ranked, key=lambda c: c.peak),
                        fitting=len(fitting), candidates=fitting)


def stock_candidates(costs: CostModel, memory: Optional[MemoryByMode], batch_size: int, seq_len: int,
                     recompute_modes: Sequence[str] = ("none",),
                     micro_batch_sizes: Optional[Sequence[int]] = None) -> List[Candidate]:
    """What stock DeepSpeed can run: unsliced 1F1B (slice-1f1b with one slice per micro-batch) at every
    micro-batch size dividing the batch (or ``micro_batch_sizes``), under every mode of
    ``recompute_modes``, with stock's memory (no KV cache: ``MemoryModel.without_cache``); the ones
    the model cannot time are left out. Fastest first; ``fastest_fitting`` picks under a limit."""
    memories = _memory_by_mode(memory, recompute_modes)
    found = []
    for mode in recompute_modes:
        priced, stock_memory = costs.with_recompute(mode), memories[mode] and memories[mode].without_cache()
        for m in micro_batch_sizes or divisors(batch_size):
            try:
                found.append(priced.predict("slice-1f1b", batch_size // m, make_plan(1, 1, m, seq_len), stock_memory,
                                            source="stock 1F1B"))
            except ValueError:  # beyond the profiled batch sizes
                continue
    return sorted(found, key=lambda c: c.makespan)


def fastest_fitting(candidates: Sequence[Candidate], memory_limit: Optional[float]) -> Candidate:
    """The fastest of ``candidates`` whose every stage's peak is within ``memory_limit`` (None: any);
    NoFit naming the smallest peak (with its recomputation mode) when none fits."""
    if not candidates:
        raise ValueError("no candidate to choose from")
    fitting = [c for c in candidates if _fits(c, memory_limit)]
    if fitting:
        return min(fitting, key=lambda c: c.makespan)
    smallest = min(candidates, key=lambda c: c.peak)
    raise NoFit(f"no plan fits the memory limit of {format_bytes(memory_limit)} per stage: the smallest peak found is "
                f"{format_bytes(smallest.peak)} with recompute {smallest.recompute} ({smallest.describe()})", smallest)


def divisors(batch_size: int) -> List[int]:
    """The micro-batch sizes that split a batch evenly."""
    return [m for m in range(1, batch_size + 1) if batch_size % m == 0]


def _fits(candidate: Candidate, memory_limit: Optional[float]) -> bool:
    return memory_limit is None or candidate.peak <= memory_limit


def _ranking(memory_limit: Optional[float]):
    """Fitting candidates first, faster first; then the rest, smaller peak first."""
    return lambda c: (0, c.makespan) if _fits(c, memory_limit) else (1, c.peak)


def _memory_by_mode(memory: Optional[MemoryByMode], modes: Sequence[str]) -> Dict[str, Optional[MemoryModel]]:
    """Each mode's memory model: one model serves the mode it is for."""
    if not modes:
        raise ValueError(f"no recompute mode asked for: choose from {', '.join(RECOMPUTE_MODES)}")
    for mode in modes:
        check_mode(mode)
    if memory is None or isinstance(memory, MemoryModel):
        wrong = [m for m in modes if memory is not None and m != memory.recompute]
        if wrong:
            raise ValueError(f"a memory model for recompute {memory.recompute!r} cannot price {', '.join(wrong)}: "
                             "give one memory model per mode")
        return {mode: memory for mode in modes}
    missing = [m for m in modes if m not in memory]
    if missing:
        raise ValueError(f"no memory model for recompute {', '.join(missing)}")
    return {mode: memory[mode] for mode in modes}


def _climb(start: Candidate, granularity: int, score, rank) -> Candidate:
    """Steepest descent over ``neighbours`` until no move improves the rank."""
    current = start
    while True:
        moves = [c for c in (score(current.schedule, current.micro_batches, p, f"moves from {start.source}")
                             for p in neighbours(current.plan, granularity)) if c]
        better = min(moves, key=rank, default=None)
        if better is None or rank(better) >= rank(current):
            return current
        current = better


def _check(costs, batch_size, seq_len, granularity, schedules, memory, memory_limit) -> None:
    if costs.stages < 1:
        raise ValueError(f"stages must be >= 1, got {costs.stages}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if granularity < 1 or seq_len < granularity or seq_len % granularity:
        raise ValueError(f"seq_len {seq_len} must be a positive multiple of the granularity {granularity}")
    unknown = [s for s in schedules if s not in SCHEDULE_NAMES]
    if unknown or not schedules:
        raise ValueError(f"schedules {list(schedules)}: choose from {', '.join(SCHEDULE_NAMES)}")
    if memory_limit is not None:
        if memory is None:
            raise ValueError("a memory limit needs a memory model")
        memory.check_limit(memory_limit)
    if memory is not None and len(memory.static_bytes) != costs.stages:
        raise ValueError(f"memory model for {len(memory.static_bytes)} stages, costs for {costs.stages}")

