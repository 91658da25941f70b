"""Predicted per-stage timeline of one iteration of a sliced pipeline.

Every stage runs the forwards of all slices in order, then their backwards in reverse order (a
slice's K/V gradients come from the backwards of the slices after it), then the optimizer step.
A forward starts when the previous stage has finished that slice and this stage its previous
slice; a backward when the next stage has finished it and this stage the one after it.

The longest chain of that schedule runs the forwards across all stages and back, so its makespan
is sum(fwd) + sum(bwd) + (K - 1) * (max(fwd) + max(bwd)) + update: with backward a fixed multiple
of forward, exactly the planner's sum(t) + (K - 1) * max(t) + update.
"""
from dataclasses import dataclass
from typing import List, Sequence


@dataclass(frozen=True)
class Segment:
    stage: int
    slice: int  # -1 for the optimizer step
    phase: str  # "fwd", "bwd" or "update"
    start: float
    end: float


def timeline(forward: Sequence[float], backward: Sequence[float], num_stages: int,
             update_time: float = 0.0) -> List[Segment]:
    """Segments of every stage, in the order the schedule runs them; slices in pipeline order."""
    if len(forward) != len(backward) or not forward:
        raise ValueError(f"need one forward and one backward time per slice, got {len(forward)} and {len(backward)}")
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    n = len(forward)
    fwd_end = [[0.0] * n for _ in range(num_stages)]
    bwd_end = [[0.0] * n for _ in range(num_stages)]
    segments = []
    for k in range(num_stages):
        for i in range(n):
            start = max(fwd_end[k - 1][i] if k else 0.0, fwd_end[k][i - 1] if i else 0.0)
            fwd_end[k][i] = start + forward[i]
            segments.append(Segment(k, i, "fwd", start, fwd_end[k][i]))
    for k in reversed(range(num_stages)):
        for i in reversed(range(n)):
            after_next_stage = bwd_end[k + 1][i] if k + 1 < num_stages else 0.0
            after_this_stage = bwd_end[k][i + 1] if i + 1 < n else fwd_end[k][n - 1]
            start = max(after_next_stage, after_this_stage)
            bwd_end[k][i] = start + backward[i]
            segments.append(Segment(k, i, "bwd", start, bwd_end[k][i]))
        if update_time:
            segments.append(Segment(k, -1, "update", bwd_end[k][0], bwd_end[k][0] + update_time))
    return segments


def makespan(segments: Sequence[Segment]) -> float:
    return max(segment.end for segment in segments)
