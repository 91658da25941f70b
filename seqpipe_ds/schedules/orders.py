"""Schedules: the order in which each stage runs the forwards and backwards of its units.

A unit is one (batch slice, sequence slice) of one micro-batch. Whatever the order, two rules
hold on every stage: the slices of one sequence run their forwards in order (slice j attends to
the K/V cached by slices < j) and their backwards in reverse (slice j's backward produces the
K/V gradients of slices < j). A schedule that ``splits_backward`` also places each unit's W
(its weight gradient) somewhere after the unit's B. Only compute is decided here;
``lowering.lower`` derives the loads, sends, receives and the optimizer step, and the simulator
checks the result.
"""
from abc import ABC, abstractmethod
from collections import deque
from typing import Dict, List, Optional, Sequence, Tuple, Type

from ..slicing import SlicePlan
from .actions import BACKWARD, FORWARD, Action, backward, forward, weight

Key = Tuple[int, Tuple[int, int]]  # (micro-batch, unit)


class Schedule(ABC):
    """Base class: ``compute_order(stage)`` lists a stage's F and B (and W) actions in execution order."""
    name = ""
    splits_backward = False  # True: B is the input gradient only and every unit has a W action

    def __init__(self, stages: int, micro_batches: int, plan: SlicePlan):
        if stages < 1 or micro_batches < 1:
            raise ValueError(f"a schedule needs >= 1 stage and >= 1 micro-batch, got {stages} and {micro_batches}")
        self.stages, self.micro_batches, self.plan = stages, micro_batches, plan

    def stream(self) -> List[Key]:
        """Every unit of every micro-batch of the step, in forward order."""
        return [(m, unit) for m in range(self.micro_batches) for unit in self.plan.units()]

    @abstractmethod
    def compute_order(self, stage: int) -> List[Action]:
        """The F and B actions of ``stage``, in the order it runs them."""

    def compute_orders(self) -> List[List[Action]]:
        return [self.compute_order(stage) for stage in range(self.stages)]


class TeraPipe(Schedule):
    """TeraPipe's order (Li et al., ICML 2021): per micro-batch, the forwards of all its units, then
    their backwards in reverse (GPipe over slices). The pipeline drains after every micro-batch and
    all units of a micro-batch are alive at once."""
    name = "terapipe"

    def compute_order(self, stage: int) -> List[Action]:
        units = self.plan.units()
        order = []
        for m in range(self.micro_batches):
            order += [forward(m, u) for u in units] + [backward(m, u) for u in reversed(units)]
        return order


class Slice1F1B(Schedule):
    """Seq1F1B's order (Sun et al., NAACL 2025) over our units: 1F1B where the unit is a sequence slice.

    The units of all micro-batches form one forward stream. Backwards go sequence by sequence (micro-batch,
    then batch slice), each sequence's slices in reverse. A stage warms up with as many forwards as the
    first backward needs, (stages - stage - 1) + (slices per sequence - 1) plus the one it alternates with,
    then alternates one forward and one backward, then drains. So at most (stages - stage) + (slices - 1)
    units are alive on a stage, against every unit of a micro-batch (terapipe) or `stages` whole
    micro-batches (1F1B without slicing).
    """
    name = "slice-1f1b"

    def compute_order(self, stage: int) -> List[Action]:
        stream = self.stream()
        index = {key: i for i, key in enumerate(stream)}
        seq_slices = self.plan.seq_slices
        backwards = [(m, (b, s)) for m in range(self.micro_batches) for b in range(len(seq_slices))
                     for s in reversed(range(len(seq_slices[b])))]
        # Before the backward of a sequence's slice, this stage must have forwarded the whole sequence
        # and the (stages - stage - 1) units that fill the stages below it (the 1F1B warm-up).
        in_flight = self.stages - stage - 1
        order, done = [], 0
        for m, (b, s) in backwards:
            last = index[(m, (b, len(seq_slices[b]) - 1))]
            needed = min(len(stream), last + 1 + in_flight)
            while done < needed:
                order.append(forward(*stream[done]))
                done += 1
            order.append(backward(m, (b, s)))
            if done < len(stream):  # steady state: one forward after each backward
                order.append(forward(*stream[done]))
                done += 1
        return order


class SliceZB(Slice1F1B):
    """slice-1f1b's order with each backward split into B and W (Zero Bubble PP's ZB-H1, Qi et al.,
    ICLR 2024, over sequence slices), each W placed where its stage would otherwise wait.

    The F and B actions are slice-1f1b's, in its order, so the activations alive on a stage are
    exactly slice-1f1b's; a W only holds its unit's linear inputs and output gradients until it
    runs. The W's are placed by running the stages together with Zero Bubble PP's nominal costs
    (t_F = t_B = t_W, one unit each, no transfer time): a stage whose next F or B still waits for
    its neighbour runs its oldest pending W instead, and one that holds more than ``pending_bound``
    runs one at once, which bounds the W buffers by slice-1f1b's own bound on alive units. The
    rest run at the end, in the drain. Unit costs ignore the lengths, so the order depends only on
    the slicing's structure, as the lowering's cache requires. With one slice per micro-batch this
    is ZB-H1 for whole micro-batches.
    """
    name = "slice-zb"
    splits_backward = True

    def held_bound(self) -> int:
        """The most units a stage holds between F and W: slice-1f1b's bound on the first stage's alive
        units, which ZB-H1 gives every stage (its peak is 1F1B's, the first stage's)."""
        return self.stages + max(len(lengths) for lengths in self.plan.seq_slices) - 1

    def compute_order(self, stage: int) -> List[Action]:
        return self.compute_orders()[stage]

    def compute_orders(self) -> List[List[Action]]:
        return place_weights([Slice1F1B.compute_order(self, s) for s in range(self.stages)], self.held_bound())


def place_weights(orders: Sequence[Sequence[Action]], bound: int) -> List[List[Action]]:
    """``orders`` (F and B per stage) with a W after each B: where the stage would otherwise wait,
    before an F that would hold more than ``bound`` units (forwarded, their W not yet run), or at
    the end (see ``SliceZB``)."""
    stages = len(orders)
    finished: Dict[Tuple[int, str, tuple], float] = {}  # (stage, kind, key) -> finish time
    clock, pc, held = [0.0] * stages, [0] * stages, [0] * stages
    pending = [deque() for _ in range(stages)]
    placed: List[List[Action]] = [[] for _ in range(stages)]

    def ready(stage: int, action: Action) -> Optional[float]:
        """When the neighbour's part of ``action`` is done (None: not yet known)."""
        if action.kind == FORWARD:
            return 0.0 if stage == 0 else finished.get((stage - 1, FORWARD, action.key))
        return 0.0 if stage == stages - 1 else finished.get((stage + 1, BACKWARD, action.key))

    while any(pc[s] < len(orders[s]) for s in range(stages)):
        known, waiting = [], []
        for s in range(stages):
            if pc[s] == len(orders[s]):
                continue
            action = orders[s][pc[s]]
            at = ready(s, action)
            full = action.kind == FORWARD and held[s] >= bound
            if pending[s] and (full or (at is not None and at >= clock[s] + 1.0)):
                known.append((clock[s], s, True))  # at the bound, or a W ends before the neighbour is done
            elif at is not None:
                known.append((max(clock[s], at), s, False))
            elif pending[s]:
                waiting.append(s)
        # What a waiting stage needs cannot be done before the earliest known start plus one unit, so a
        # W that starts by then fills its wait without delaying it.
        earliest = min(known)[0]
        start, s, run_weight = min(known + [(clock[s], s, True) for s in waiting if clock[s] <= earliest])
        if run_weight:
            placed[s].append(weight(*pending[s].popleft()))
            held[s] -= 1
        else:
            action = orders[s][pc[s]]
            pc[s] += 1
            placed[s].append(action)
            finished[s, action.kind, action.key] = start + 1.0
            if action.kind == FORWARD:
                held[s] += 1
            else:
                pending[s].append((action.micro_batch, action.unit))
        clock[s] = start + 1.0
    return [p + [weight(*key) for key in rest] for p, rest in zip(placed, pending)]


SCHEDULES: Dict[str, Type[Schedule]] = {cls.name: cls for cls in (TeraPipe, Slice1F1B, SliceZB)}


def get_schedule(name: str) -> Type[Schedule]:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; available: {', '.join(SCHEDULES)}") from None
