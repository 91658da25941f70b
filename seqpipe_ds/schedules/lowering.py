"""Lowering: a schedule's compute order -> per-stage programs with loads, sends, receives, step.

Each compute first gets its receive right before it and its send right after it, the cheapest
placement with asynchronous sends. On NCCL that is not enough: a send does not complete before
the peer posts the matching receive, so two neighbours that both send first wait for each other
forever (in 1F1B's steady state stage s sends an activation while stage s+1 sends a gradient).
The lowering therefore runs the programs in the simulator with rendezvous sends; at each such
standoff the later stage takes the activation first and sends its gradient after, the exchange
that Megatron's ``send_forward_recv_backward`` does in one call. The exchange costs nothing: each
side needs the other's message only after the compute it has just finished. Only a W between a
send and the receive moved before it would wait for the message; so where the later stage has
more of those, the earlier stage takes the gradient first instead. The result meets
every send/receive pair in one order on both sides, so it runs with blocking or async sends.
"""
from collections import defaultdict
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

from ..slicing import SlicePlan
from .actions import (BACKWARD, DIRECTION, FORWARD, LOAD, RECV_ACT, RECV_GRAD, RECVS, SEND_ACT, SEND_GRAD, SENDS,
                      STEP, WEIGHT, Action)
from .orders import get_schedule
from .simulator import simulate


def _eager(orders: Sequence[Sequence[Action]]) -> List[List[Action]]:
    """Each compute with its receive right before it and its send right after it."""
    stages = len(orders)
    programs = []
    for stage, order in enumerate(orders):
        first, last = stage == 0, stage == stages - 1
        program, loaded = [], set()
        for a in order:
            if a.kind == FORWARD and (first or last) and a.micro_batch not in loaded:
                loaded.add(a.micro_batch)
                program.append(Action(LOAD, a.micro_batch))
            if a.kind == FORWARD and not first:
                program.append(Action(RECV_ACT, *a.key))
            if a.kind == BACKWARD and not last:
                program.append(Action(RECV_GRAD, *a.key))
            program.append(a)
            if a.kind == FORWARD and not last:
                program.append(Action(SEND_ACT, *a.key))
            if a.kind == BACKWARD and not first:
                program.append(Action(SEND_GRAD, *a.key))
        programs.append(program + [Action(STEP)])
    return programs


def _exchange(programs: List[List[Action]], pcs: List[int]) -> bool:
    """At a standoff (stage s sends an activation, stage s+1 a gradient) one of them receives first:
    the one that, by receiving where it stands, holds back fewer W actions (work that needs no
    message and would otherwise wait for this one), stage s+1 when it is a tie."""
    for s in range(len(programs) - 1):
        mine, theirs = programs[s][pcs[s]:pcs[s] + 1], programs[s + 1][pcs[s + 1]:pcs[s + 1] + 1]
        if mine and theirs and mine[0].kind == SEND_ACT and theirs[0].kind == SEND_GRAD:
            options = [(s + 1, Action(RECV_ACT, *mine[0].key)), (s, Action(RECV_GRAD, *theirs[0].key))]
            stage, receive = min(options, key=lambda o: _held_back(programs[o[0]], pcs[o[0]], o[1]))
            program = programs[stage]
            program.remove(receive)  # it sits further on, right before its compute
            program.insert(pcs[stage], receive)
            return True
    return False


def _held_back(program: List[Action], pc: int, receive: Action) -> int:
    """The W actions between ``pc`` and ``receive``: what receiving at ``pc`` would make wait."""
    return sum(a.kind == WEIGHT for a in program[pc:program.index(receive)])


def lower_orders(orders: Sequence[Sequence[Action]], plan: SlicePlan) -> List[List[Action]]:
    """Per-stage programs for the given compute orders; raises ScheduleError if they cannot run."""
    return simulate(_eager(orders), plan, rendezvous=True, on_deadlock=_exchange).programs


@lru_cache(maxsize=64)
def lower(name: str, stages: int, micro_batches: int, plan: SlicePlan) -> Tuple[Tuple[Action, ...], ...]:
    """The programs of the registered schedule ``name`` for one training step (cached, so immutable)."""
    schedule = get_schedule(name)(stages, micro_batches, plan)
    return tuple(tuple(p) for p in lower_orders(schedule.compute_orders(), plan))


def receive_posts(program: Sequence[Action]) -> Dict[Optional[Action], Tuple[Action, ...]]:
    """When a stage posts each receive of ``program`` ahead of it: {the action after which (None:
    before the first action): the receives to post then}.

    WHY: a receive posted only where the stage reaches it lets the transfer start only then (gloo
    moves a message once both sides are ready, NCCL runs a send when its receive is posted): a
    512 KiB message sent while the receiver computed then waited 0.54-0.57 ms (medians; up to 5.8 ms),
    and 0.01 ms in a receive posted ahead (``benchmarks/bench_posted_receives.py``, 2-core Intel Xeon).
    Yet a receive posted too early can deadlock on NCCL: it holds back the sends queued behind it
    to the same peer, and the peer may be waiting for one of them before it sends what the receive
    waits for.

    So a receive is posted right after the later of the previous receive from the same peer and
    the last send to that peer before it. Per peer the stage then issues its sends and receives in
    the program's own order, the one the lowering checked both sides to meet in (``lower_orders``),
    which is why the programs and the simulator need no change; and at most one receive per peer is
    outstanding, so one receive buffer per peer is allocated early."""
    posts = defaultdict(tuple)
    last: Dict[int, Optional[Action]] = {}  # peer offset -> the latest send to / receive from that peer so far
    for action in program:
        if action.kind in RECVS:
            peer = DIRECTION[action.kind]
            posts[last.get(peer)] += (action,)
            last[peer] = action
        elif action.kind in SENDS:
            last[DIRECTION[action.kind]] = action
    return dict(posts)
