"""Predicted timelines: the latency model's slice times charged to the lowered programs of the
schedule that runs, in the one simulator (``seqpipe_ds.schedules``).

A slice's predicted time (compute and its sends, as the DP charges it) is split into forward and
backward by ``forward_fraction``. For the terapipe order on one micro-batch this reproduces the
DP's objective sum(t) + (stages - 1) * max(t) + update exactly (a proportionate flow shop).
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..schedules import Costs, SimResult, lower, simulate
from ..schedules.actions import FORWARD
from ..slicing import SlicePlan

FORWARD_FRACTION = 1 / 3  # backward ~ twice the forward


def context_of(plan: SlicePlan) -> Dict[Tuple[int, int], int]:
    """Tokens of the same sequence before each unit (the context its attention reads)."""
    return {(b, s): sum(lengths[:s]) for b, lengths in enumerate(plan.seq_slices) for s in range(len(lengths))}


def slice_costs(plan: SlicePlan, slice_time: Callable[[int, int, int], float],
                forward_fraction: float = FORWARD_FRACTION, update_time: float = 0.0) -> Costs:
    """Costs from ``slice_time(batch, length, context)`` = forward + backward seconds of one unit."""
    context = context_of(plan)
    times = {u: float(slice_time(*plan.shape(u), context[u])) for u in plan.units()}
    if not np.isfinite(list(times.values())).all():
        raise ValueError("the latency model cannot predict every slice of this plan (outside the profiled range)")
    return Costs(lambda stage, a: times[a.unit] * (forward_fraction if a.kind == FORWARD else 1 - forward_fraction),
                 step=update_time)


def predict(plan: SlicePlan, slice_time: Callable[[int, int, int], float], stages: int, micro_batches: int = 1,
            schedule: str = "terapipe", forward_fraction: float = FORWARD_FRACTION, update_time: float = 0.0,
            bytes_per_token: Optional[Sequence[float]] = None) -> SimResult:
    """The simulated step of ``schedule`` with these slice times."""
    return simulate(lower(schedule, stages, micro_batches, plan), plan,
                    slice_costs(plan, slice_time, forward_fraction, update_time), bytes_per_token=bytes_per_token)
