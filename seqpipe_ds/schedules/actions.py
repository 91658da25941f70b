"""The vocabulary every schedule, the simulator, the planner's timelines and the engine share.

An ``Action`` is one step of one pipeline stage, written like ``torch.distributed.pipelining``'s
``_Action``: ``"1.0.2F"`` is the forward of micro-batch 1, batch slice 0, sequence slice 2.
Compute actions (F, B, and W where a schedule splits the backward) are what a schedule decides;
loads, sends, receives and the optimizer step are derived from them by ``lowering.lower``.

A backward is B alone, or, in a schedule that splits it (Zero Bubble PP, Qi et al., ICLR 2024),
B is the input gradient, which the previous stage waits for, and W the weight gradient of the
same unit, which nothing waits for until the optimizer step.
"""
from dataclasses import dataclass
from typing import Tuple

FORWARD, BACKWARD = "F", "B"
WEIGHT = "W"  # the deferred weight gradient of a unit whose B computed only the input gradient
SEND_ACT, RECV_ACT = "SEND_F", "RECV_F"  # activation of a unit, to / from the next stage
SEND_GRAD, RECV_GRAD = "SEND_B", "RECV_B"  # gradient of a unit's input, to / from the previous stage
LOAD = "LOAD"  # first and last stage: read micro-batch m from the data iterator
STEP = "STEP"  # tied-weight and data-parallel reduction, then the optimizer step

COMPUTE = (FORWARD, BACKWARD)
SENDS = {SEND_ACT: RECV_ACT, SEND_GRAD: RECV_GRAD}  # send kind -> the receive that matches it
RECVS = {v: k for k, v in SENDS.items()}
DIRECTION = {SEND_ACT: +1, RECV_ACT: -1, SEND_GRAD: -1, RECV_GRAD: +1}  # peer stage = stage + direction


@dataclass(frozen=True, order=True)
class Action:
    kind: str
    micro_batch: int = -1
    batch_slice: int = -1
    seq_slice: int = -1

    @property
    def unit(self) -> Tuple[int, int]:
        """(batch slice, sequence slice): the part of a micro-batch the action is about."""
        return self.batch_slice, self.seq_slice

    @property
    def key(self) -> Tuple[int, int, int]:
        """(micro-batch, batch slice, sequence slice): how the engine and the simulator key state."""
        return self.micro_batch, self.batch_slice, self.seq_slice

    def __str__(self) -> str:
        if self.kind == STEP:
            return STEP
        if self.kind == LOAD:
            return f"{self.micro_batch}{LOAD}"
        return f"{self.micro_batch}.{self.batch_slice}.{self.seq_slice}{self.kind}"

    __repr__ = __str__


def forward(m: int, unit) -> Action:
    return Action(FORWARD, m, *unit)


def backward(m: int, unit) -> Action:
    return Action(BACKWARD, m, *unit)


def weight(m: int, unit) -> Action:
    return Action(WEIGHT, m, *unit)
