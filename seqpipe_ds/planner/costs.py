"""The one cost model: what a plan's units cost on each stage, priced for the schedule simulator.

Every path that times a plan goes through ``CostModel``: TeraPipe's DP (its grid), the
schedule-exact search, the cluster advisor, ``seqpipe-plan show`` and ``seqpipe-bench``'s
predictions. So a time recorded in a plan file is what simulating that plan again gives.

A unit is b sequences of l tokens after c tokens of context (the tokens of the same sequences in
earlier slices, which its attention reads; ``contexts`` is the one place that counts them).
``compute(stage, b, l, c)`` is its forward + backward seconds on a stage, ``forward_fraction`` of
it the forward; ``send(b, l)`` one activation or gradient message between neighbour stages;
``step`` each stage's reduction + optimizer step. ``unit_times`` is where a stage's own options
change a unit's forward / backward split: the calibration's ``scale``, ``unit_extra`` and
``sequence_extra`` (its ``gap`` is charged around units, in ``costs``), and activation
recomputation (``recompute``, one mode for every stage: ``recompute.py``), whose rerun of the
forward (``recompute_cost``, measured per mode by the profile) lengthens each backward. A schedule that
splits the backward (``slice-zb``) runs ``weight(stage, b, l)`` of it as the unit's W and the rest
as B (``Costs.weight``); the latency model's measured W, or where it has none Zero Bubble PP's
t_W = t_F (the forward of the unit without context: the same GEMMs).

Two readings of a latency model (``seqpipe-plan fit``):

* ``from_latency_model``: what runs. Each stage's layers, the embedding on the first stage and
  the LM head + loss on the last, the sends as messages the simulator overlaps with compute.
* ``identical_stages``: what TeraPipe's DP charges. Every stage is the profiled one and a slice's
  two sends are part of its time. On the terapipe order with one micro-batch the simulated
  makespan is the DP's objective sum(t) + (stages - 1) * max(t) + step exactly (a proportionate
  flow shop: every stage takes t * forward_fraction forward and the rest backward).
"""
import functools
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..schedules import Costs, SimResult, get_schedule, lower, simulate
from ..schedules.actions import FORWARD
from ..slicing import SlicePlan
from .memory_model import MemoryModel
from .recompute import check_mode

FORWARD_FRACTION = 1 / 3  # forward's share of a unit's compute where nothing was measured: backward ~ 2 forwards

Unit = Tuple[int, int]


def contexts(plan: SlicePlan) -> Dict[Unit, int]:
    """Tokens of the same sequences before each unit: the context its attention reads."""
    return {(b, s): sum(lengths[:s]) for b, lengths in enumerate(plan.seq_slices) for s in range(len(lengths))}


def unit_tokens(plan: SlicePlan) -> List[Tuple[int, int]]:
    """(tokens, context tokens) of every unit, summed over its sequences: what the memory model's
    transient of a unit's backward grows with."""
    context = contexts(plan)
    return [(b * l, b * context[unit]) for unit in plan.units() for b, l in [plan.shape(unit)]]


def slice_grid(time: Callable, batch_size: int, seq_len: int, granularity: int) -> np.ndarray:
    """``grid[b, l // g, c // g]`` = ``time(b, l, c)`` (element-wise over arrays) for TeraPipe's DP,
    inf where l + c > seq_len or b or l is 0."""
    units = seq_len // granularity
    b, lu, cu = np.meshgrid(np.arange(batch_size + 1), np.arange(units + 1), np.arange(units + 1), indexing="ij")
    allowed = (b >= 1) & (lu >= 1) & (lu + cu <= units)
    b, l, c = b[allowed], granularity * lu[allowed], granularity * cu[allowed]
    grid = np.full(allowed.shape, np.inf)
    grid[allowed] = np.broadcast_to(time(b, l, c), b.shape)
    return grid


def simulate_plan(schedule: str, stages: int, micro_batches: int, plan: SlicePlan, costs: Optional[Costs] = None,
                  saved_bytes_per_token: Optional[Sequence[float]] = None,
                  weight_bytes_per_token: Optional[Sequence[float]] = None) -> SimResult:
    """The simulated step of ``schedule`` running ``micro_batches`` micro-batches sliced by ``plan``
    (``costs`` None: nominal token costs, for the alive tokens alone)."""
    return simulate(lower(schedule, stages, micro_batches, _structure(plan)), plan, costs,
                    bytes_per_token=saved_bytes_per_token, weight_bytes_per_token=weight_bytes_per_token)


def _structure(plan: SlicePlan) -> SlicePlan:
    """The plan with every length 1: lowering depends only on the units (how many batch slices, how
    many sequence slices each), so all plans of one structure share one cached lowering; the
    simulation with the real plan still checks every program against it."""
    return SlicePlan(tuple(1 for _ in plan.batch_slices),
                     tuple(tuple(1 for _ in lengths) for lengths in plan.seq_slices))


@dataclass(frozen=True)
class Candidate:
    schedule: str
    micro_batches: int  # gradient accumulation steps
    plan: SlicePlan  # the slicing of one micro-batch
    makespan: float
    peak_bytes: Optional[List[float]]  # per stage, with a memory model
    source: str  # which seed or move produced it
    recompute: str = "none"  # the activation recomputation of every stage (recompute.RECOMPUTE_MODES)

    @property
    def micro_batch_size(self) -> int:
        return self.plan.micro_batch_size

    @property
    def peak(self) -> float:
        return max(self.peak_bytes) if self.peak_bytes else 0.0

    def describe(self) -> str:
        parts = " | ".join(f"{b}x{list(lengths)}" for b, lengths in zip(self.plan.batch_slices, self.plan.seq_slices))
        return f"{self.schedule}, recompute {self.recompute}, {self.micro_batches} micro-batch(es) of ({parts})"


@dataclass(frozen=True)
class CostModel:
    """What a unit costs on each stage, in seconds (see the module's docstring). ``compute`` and
    ``send`` take numbers or numpy arrays alike; ``hidden_size`` weighs attention against the
    matmuls in the search's equal-FLOP seeds. ``recompute_cost[mode](stage, b, l, c)``: the seconds
    a unit's backward adds to rerun its forward under recomputation ``mode`` (before ``scale``),
    for every mode it can price besides "none"."""
    stages: int
    compute: Callable[[int, int, int, int], float]
    send: Callable[[int, int], float] = lambda b, l: 0.0
    forward_fraction: float = FORWARD_FRACTION
    step: float = 0.0
    hidden_size: int = 1024
    # Per stage (forward, backward) factors on the latency model's times: what a short in-engine run
    # measured against them (``calibrate.py``); None: the profile's times as they are.
    scale: Optional[Tuple[Tuple[float, float], ...]] = None
    # Per stage (forward, backward) seconds the engine adds to every unit beyond the factors (its
    # Python, hooks and wrappers per call), from the same calibration; None: nothing.
    unit_extra: Optional[Tuple[Tuple[float, float], ...]] = None
    # Per stage (forward, backward) seconds the engine adds per sequence of a unit (a unit of b
    # sequences: b times them), from the same calibration; None: nothing.
    sequence_extra: Optional[Tuple[Tuple[float, float], ...]] = None
    # Seconds the engine spends around every forward and backward instruction, outside the unit itself
    # (receive buffers, the sends' bookkeeping, the instruction loop), from the same calibration; the
    # simulator charges it to each F and B, ``unit_times`` leaves it out (a traced unit has none of it).
    gap: float = 0.0
    recompute: str = "none"
    recompute_cost: Mapping[str, Callable[[int, int, int, int], float]] = field(default_factory=dict, hash=False)
    # W seconds of a unit of b sequences and l tokens on a stage (before ``scale``); None: t_W = t_F
    weight: Optional[Callable[[int, int, int], float]] = field(default=None, hash=False)

    def __post_init__(self):
        check_mode(self.recompute)
        if self.recompute != "none" and self.recompute not in self.recompute_cost:
            raise ValueError(f"recompute {self.recompute!r} has no measured cost of rerunning the forward (priced: "
                             f"{', '.join(['none', *self.recompute_cost])}): profile it (seqpipe-plan profile "
                             "--recompute-modes) and fit again")

    @classmethod
    def from_latency_model(cls, model, stages: int, hidden_size: int, recompute: str = "none") -> "CostModel":
        """Each stage's layers, plus the embedding on the first and the head + loss on the last; under
        ``recompute`` the layers' measured rerun (``LatencyModel.recompute_time``)."""
        measured = model.weight_time(1, 1, False) is not None
        return cls(stages=stages, compute=lambda s, b, l, c: model.stage_compute(b, l, c, s == 0, s == stages - 1),
                   send=model.send_time, forward_fraction=model.forward_fraction, step=model.update_time,
                   hidden_size=hidden_size, recompute=recompute, recompute_cost=_rerun(model),
                   weight=(lambda s, b, l: model.weight_time(b, l, s == stages - 1)) if measured else None)

    @classmethod
    def identical_stages(cls, model, stages: int, hidden_size: int, recompute: str = "none") -> "CostModel":
        """TeraPipe's DP's reading: every stage the profiled one, a slice's sends inside its time."""
        measured = model.weight_time(1, 1, False) is not None
        return cls(stages=stages, compute=lambda s, b, l, c: model.predict(b, l, c),
                   forward_fraction=model.forward_fraction, step=model.update_time, hidden_size=hidden_size,
                   recompute=recompute, recompute_cost=_rerun(model),
                   weight=(lambda s, b, l: model.weight_time(b, l, False)) if measured else None)

    def with_recompute(self, mode: str) -> "CostModel":
        """The same stages under recomputation ``mode``."""
        return replace(self, recompute=mode)

    def split(self, stage: int, b, l, c) -> Tuple:
        """(forward, backward) seconds of units of shape (b, l, c) on ``stage`` (numbers or arrays):
        the forward share of the compute, the rest plus the recomputation's rerun in the backward,
        each by the calibration's factors (the rerun is forward work: the forward's) plus its
        seconds per unit and per sequence."""
        t = self.compute(stage, b, l, c)
        forward, backward = self.scale[stage] if self.scale else (1.0, 1.0)
        forward_extra, backward_extra = self.unit_extra[stage] if self.unit_extra else (0.0, 0.0)
        if self.sequence_extra:
            forward_extra = forward_extra + b * self.sequence_extra[stage][0]
            backward_extra = backward_extra + b * self.sequence_extra[stage][1]
        rerun = self.recompute_cost[self.recompute](stage, b, l, c) if self.recompute != "none" else 0.0
        return (t * self.forward_fraction * forward + forward_extra,
                t * (1 - self.forward_fraction) * backward + rerun * forward + backward_extra)

    def weight_time(self, stage: int, b, l) -> float:
        """The W seconds of a unit of b sequences and l tokens on ``stage``, by the calibration's
        backward factor (W is backward work), at most the backward itself."""
        if self.weight is not None:
            t = self.weight(stage, b, l)
        else:
            t = self.compute(stage, b, l, 0) * self.forward_fraction
        return float(t) * (self.scale[stage][1] if self.scale else 1.0)

    def unit_times(self, plan: SlicePlan) -> Dict[Tuple[int, Unit], Tuple[float, float]]:
        """(forward, backward) seconds of every unit on every stage; ValueError where the model cannot
        time one (outside the profiled range)."""
        context = contexts(plan)
        times = {(stage, unit): tuple(float(v) for v in self.split(stage, *plan.shape(unit), context[unit]))
                 for stage in range(self.stages) for unit in plan.units()}
        if not np.isfinite([v for pair in times.values() for v in pair]).all():
            raise ValueError("the latency model cannot predict every slice of this plan (outside the profiled range)")
        return times

    def costs(self, plan: SlicePlan) -> Costs:
        """The simulator's costs of ``plan``'s units: their times, each F and B with the ``gap``."""
        times = self.unit_times(plan)
        sends = {unit: float(self.send(*plan.shape(unit))) for unit in plan.units()}
        weights = {(stage, unit): min(self.weight_time(stage, *plan.shape(unit)), times[stage, unit][1])
                   for stage, unit in times}
        return Costs(compute=lambda stage, a: times[stage, a.unit][0 if a.kind == FORWARD else 1] + self.gap,
                     send=lambda a: sends[a.unit], step=self.step, weight=lambda stage, a: weights[stage, a.unit])

    def simulate(self, schedule: str, micro_batches: int, plan: SlicePlan,
                 saved_bytes_per_token: Optional[Sequence[float]] = None) -> SimResult:
        """The simulated step, with every segment (for timelines) and the alive tokens per stage."""
        return simulate_plan(schedule, self.stages, micro_batches, plan, self.costs(plan), saved_bytes_per_token)

    def predict(self, schedule: str, micro_batches: int, plan: SlicePlan, memory: Optional[MemoryModel] = None,
                source: str = "") -> Candidate:
        """The step time of ``schedule`` running ``micro_batches`` micro-batches sliced by ``plan``, and
        with a memory model each stage's peak."""
        if memory is not None and memory.recompute != self.recompute:
            raise ValueError(f"memory model for recompute {memory.recompute!r}, costs for {self.recompute!r}")
        result = self.simulate(schedule, micro_batches, plan)
        # A split backward's W buffers (its linear layers' inputs and output gradients) are part of what
        # a unit keeps: charged as kept until its W, an upper bound of what they hold.
        alive = result.peak_held_tokens if get_schedule(schedule).splits_backward else result.peak_alive_tokens
        peaks = memory.peaks(alive, unit_tokens(plan)) if memory is not None else None
        return Candidate(schedule, micro_batches, plan, result.makespan, peaks, source, self.recompute)

    def bottleneck_grid(self, batch_size: int, seq_len: int, granularity: int) -> np.ndarray:
        """``solve``'s grid from the slowest stage's slice time plus a send each way."""
        def slowest(b, l, c):
            compute = np.max([np.broadcast_to(sum(self.split(s, b, l, c)), b.shape) for s in range(self.stages)],
                             axis=0)
            return compute + (2 * np.broadcast_to(self.send(b, l), b.shape) if self.stages > 1 else 0.0)
        return slice_grid(slowest, batch_size, seq_len, granularity)


def _rerun(model) -> Dict[str, Callable[[int, int, int, int], float]]:
    """A latency model's measured recomputation costs, as ``CostModel.recompute_cost``: every stage
    reruns its layers (the embedding and the head are not recomputed)."""
    return {mode: functools.partial(_layers_rerun, model, mode) for mode in model.recompute_extra}


def _layers_rerun(model, mode: str, stage: int, b, l, c):
    return model.recompute_time(mode, b, l, c)
