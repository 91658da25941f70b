"""Schedules: the order in which each stage runs the forwards and backwards of its units.

A unit is one (batch slice, sequence slice) of one micro-batch. Whatever the order, two rules
hold on every stage: the slices of one sequence run their forwards in order (slice j attends to
the K/V cached by slices < j) and their backwards in reverse (slice j's backward produces the
K/V gradients of slices < j). Only compute is decided here; ``lowering.lower`` derives the
loads, sends, receives and the optimizer step, and the simulator checks the result.
"""
from abc import ABC, abstractmethod
from typing import Dict, List, Tuple, Type

from ..slicing import SlicePlan
from .actions import Action, backward, forward

Key = Tuple[int, Tuple[int, int]]  # (micro-batch, unit)


class Schedule(ABC):
    """Base class: ``compute_order(stage)`` lists a stage's F and B actions in execution order."""
    name = ""

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


SCHEDULES: Dict[str, Type[Schedule]] = {cls.name: cls for cls in (TeraPipe, Slice1F1B)}


def get_schedule(name: str) -> Type[Schedule]:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; available: {', '.join(SCHEDULES)}") from None
