"""The one model of a pipeline schedule: runs every stage's lowered program, checks it, times it.

``simulate(programs, plan, costs)`` executes the per-stage action lists together. It checks what
the engine relies on: every send meets its receive in the same order on both sides, nothing waits
forever, a unit's input is there before its forward, a sequence's slices run forward in order and
backward in reverse, no per-unit buffer is overwritten or left behind, and where a stage splits
its backward (its program has W actions) every unit's W runs after its B and before the step. It
also returns per-stage segments with start and end times, the makespan, and the units, tokens and
(with a memory model) activation bytes alive at each stage's peak, plus the tokens whose W is
still pending (their inputs and output gradients are held until it runs).

Two models of a send. ``rendezvous=True``: a send completes only together with its receive (a
blocking NCCL-style pair); a program that passes this way cannot deadlock under any weaker
semantics, so tests and lowering check with it. ``rendezvous=False`` (default, for timing): sends
are asynchronous like the engine's ``isend``; a receive completes when the message has arrived.
"""
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from ..slicing import SlicePlan
from .actions import (BACKWARD, DIRECTION, FORWARD, LOAD, RECV_ACT, RECV_GRAD, RECVS, SEND_ACT, SEND_GRAD, SENDS,
                      STEP, WEIGHT, Action)


class ScheduleError(ValueError):
    """A program the engine could not run: a deadlock, a mismatched pair, a broken dependency."""


@dataclass(frozen=True)
class Segment:
    stage: int
    action: Action
    start: float
    end: float

    @property
    def kind(self) -> str:
        return self.action.kind


@dataclass(frozen=True)
class Costs:
    """What the simulator charges, in seconds. ``compute(stage, action)`` for F and for a whole
    backward (B), ``send(action)`` for the transfer a SEND starts, ``step`` for each stage's reduction
    + optimizer step. ``weight(stage, action)``: the part of a B's time that is its weight gradient;
    on a stage whose program splits the backward, B is charged the rest and the unit's W that part."""
    compute: Callable[[int, Action], float]
    send: Callable[[Action], float] = lambda action: 0.0
    step: float = 0.0
    weight: Callable[[int, Action], float] = lambda stage, action: 0.0


def token_costs(plan: SlicePlan, forward: float = 1.0, backward: float = 2.0, weight: float = 1.0) -> Costs:
    """Nominal costs: proportional to a unit's tokens, backward twice the forward, half of it the
    weight gradient (Zero Bubble PP's t_F = t_B = t_W)."""
    per_token = {FORWARD: forward, BACKWARD: backward}
    return Costs(lambda stage, a: per_token[a.kind] * plan.tokens(a.unit),
                 weight=lambda stage, a: weight * plan.tokens(a.unit))


@dataclass
class SimResult:
    programs: List[List[Action]]  # what ran (as given, or as on_deadlock rewrote it)
    segments: List[Segment]  # every action of every stage, in program order per stage
    makespan: float
    peak_alive_units: List[int]  # per stage: units forwarded and not yet backwarded, at the peak
    peak_alive_tokens: List[int]
    # with bytes_per_token: the memory model's peak (plus, with weight_bytes_per_token, the W buffers held)
    peak_activation_bytes: Optional[List[float]]
    # per stage: the most tokens whose W was pending at once (0 where the backward is not split)
    peak_pending_weight_tokens: List[int]
    peak_held_tokens: List[int]  # per stage: the most tokens forwarded and not yet through their W (or B)

    def stage_segments(self, stage: int, kinds=(FORWARD, BACKWARD, WEIGHT, STEP)) -> List[Segment]:
        return [s for s in self.segments if s.stage == stage and s.kind in kinds]


class _Stage:
    def __init__(self, sid: int, stages: int, program: Sequence[Action]):
        self.sid, self.first, self.last = sid, sid == 0, sid == stages - 1
        self.program, self.pc, self.clock = list(program), 0, 0.0
        self.loaded = 0
        self.forwarded, self.backwarded, self.weighted, self.sent = set(), set(), set(), set()
        self.splits = any(a.kind == WEIGHT for a in self.program)  # B is the input gradient only, W the rest
        # the engine's per-unit dicts; "wgrads": the weight-gradient work a split B leaves for the unit's W
        self.buffers = {"inputs": set(), "outputs": set(), "grads": set(), "wgrads": set()}
        self.alive_units = self.alive_tokens = self.peak_units = self.peak_tokens = 0
        self.pending_tokens = self.peak_pending = self.peak_held = 0
        self.rates, self.peak_bytes = None, 0.0  # (bytes per alive token, per pending-W token), their peak

    def count(self):
        """Updates the peaks after a unit starts or stops holding memory."""
        self.peak_units, self.peak_tokens = max(self.peak_units, self.alive_units), max(self.peak_tokens,
                                                                                        self.alive_tokens)
        self.peak_pending = max(self.peak_pending, self.pending_tokens)
        self.peak_held = max(self.peak_held, self.alive_tokens + self.pending_tokens)
        if self.rates is not None:
            self.peak_bytes = max(self.peak_bytes, self.alive_tokens * self.rates[0]
                                  + self.pending_tokens * self.rates[1])

    @property
    def current(self) -> Optional[Action]:
        return self.program[self.pc] if self.pc < len(self.program) else None

    def fail(self, message: str):
        raise ScheduleError(f"stage {self.sid}, action {self.pc} ({self.current}): {message}")

    def put(self, buffer: str, key):
        if key in self.buffers[buffer]:
            self.fail(f"{buffer}[{key}] overwritten while still needed")
        self.buffers[buffer].add(key)

    def take(self, buffer: str, key):
        if key not in self.buffers[buffer]:
            self.fail(f"{buffer}[{key}] is missing")
        self.buffers[buffer].remove(key)


def simulate(programs: Sequence[Sequence[Action]], plan: SlicePlan, costs: Optional[Costs] = None,
             rendezvous: bool = False, bytes_per_token: Optional[Sequence[float]] = None,
             on_deadlock: Optional[Callable[[List[List[Action]], List[int]], bool]] = None,
             weight_bytes_per_token: Optional[Sequence[float]] = None) -> SimResult:
    """Runs the programs together; raises ScheduleError for anything the engine could not run.

    ``bytes_per_token[stage]``: what a forwarded token holds until its B; with
    ``weight_bytes_per_token[stage]``, what a token of a split backward holds from its B to its W.

    ``on_deadlock(programs, pcs)`` (for the lowering) may rewrite the not yet executed part of the
    programs when no stage can move on, and return True to continue.
    """
    costs = costs or token_costs(plan)
    stages = len(programs)
    sts = [_Stage(s, stages, p) for s, p in enumerate(programs)]
    if bytes_per_token is not None:
        for st in sts:
            st.rates = (bytes_per_token[st.sid], weight_bytes_per_token[st.sid] if weight_bytes_per_token else 0.0)
    channels: Dict[tuple, deque] = defaultdict(deque)  # (src, dst, kind) -> [(key, arrival)]
    segments: List[Segment] = []
    units = plan.units()
    micro_batches = 1 + max((a.micro_batch for p in programs for a in p if a.micro_batch >= 0), default=-1)
    while any(st.current is not None for st in sts):
        progressed = False
        for st in sts:
            while st.current is not None:
                action = st.current
                if action.kind in SENDS and rendezvous:
                    done = _rendezvous(st, sts, action, costs, segments)
                elif action.kind in SENDS:
                    done = _send(st, action, costs, channels, segments)
                elif action.kind in RECVS:
                    done = _receive(st, action, channels, segments)
                else:
                    _local(st, action, plan, costs, units, micro_batches, segments)
                    done = True
                if not done:
                    break
                st.pc += 1
                progressed = True
        if not progressed and on_deadlock is not None and \
                on_deadlock([st.program for st in sts], [st.pc for st in sts]):
            continue
        if not progressed:
            waits = "; ".join(f"stage {st.sid} waits at {st.current}" for st in sts if st.current is not None)
            raise ScheduleError(f"deadlock: {waits}")
    for st in sts:
        done = {FORWARD: st.forwarded, BACKWARD: st.backwarded, WEIGHT: st.weighted}
        kinds = (FORWARD, BACKWARD, WEIGHT) if st.splits else (FORWARD, BACKWARD)
        missing = [str(a) for m in range(micro_batches) for u in units for a in (Action(k, m, *u) for k in kinds)
                   if a.key not in done[a.kind]]
        if missing:
            raise ScheduleError(f"stage {st.sid} never runs {', '.join(missing[:6])}")
        left = {k: sorted(v) for k, v in st.buffers.items() if v}
        if left:
            raise ScheduleError(f"stage {st.sid} ends with buffers still holding {left}")
    unreceived = {k: [str(key) for key, _ in q] for k, q in channels.items() if q}
    if unreceived:
        raise ScheduleError(f"messages sent but never received: {unreceived}")
    peak_bytes = [st.peak_bytes for st in sts] if bytes_per_token is not None else None
    return SimResult([st.program for st in sts], segments, max((s.end for s in segments), default=0.0),
                     [st.peak_units for st in sts], [st.peak_tokens for st in sts], peak_bytes,
                     [st.peak_pending for st in sts], [st.peak_held for st in sts])


def _local(st: _Stage, action: Action, plan, costs, units, micro_batches, segments):
    key, start = action.key, st.clock
    if action.kind == LOAD:
        if not (st.first or st.last):
            st.fail("only the first and the last stage read micro-batches")
        if action.micro_batch != st.loaded:
            st.fail(f"micro-batches are read in order; expected {st.loaded}")
        st.loaded += 1
        duration = 0.0
    elif action.kind == FORWARD:
        m, b, s = key
        if key in st.forwarded:
            st.fail("forward run twice")
        if s and (m, b, s - 1) not in st.forwarded:
            st.fail("forward before the forward of the previous slice of its sequence")
        if (st.first or st.last) and m >= st.loaded:
            st.fail(f"forward of micro-batch {m} before it was loaded")
        if not st.first:
            if key not in st.buffers["inputs"]:
                st.fail("forward without its input")
        st.forwarded.add(key)
        if not st.last:
            st.put("outputs", key)
        tokens = plan.tokens(action.unit)
        st.alive_units, st.alive_tokens = st.alive_units + 1, st.alive_tokens + tokens
        st.count()
        duration = costs.compute(st.sid, action)
    elif action.kind == BACKWARD:
        m, b, s = key
        if key not in st.forwarded or key in st.backwarded:
            st.fail("backward without a forward, or run twice")
        later = [(m, b, j) for j in range(s + 1, len(plan.seq_slices[b])) if (m, b, j) not in st.backwarded]
        if later:
            st.fail(f"backward before the backwards of the later slices {later} of its sequence")
        if not st.last:
            st.take("outputs", key)
            st.take("grads", key)
        st.backwarded.add(key)
        tokens = plan.tokens(action.unit)
        st.alive_units, st.alive_tokens = st.alive_units - 1, st.alive_tokens - tokens
        duration = costs.compute(st.sid, action)
        if st.splits:
            st.put("wgrads", key)
            st.pending_tokens += tokens
            st.count()
            duration -= costs.weight(st.sid, action)
    elif action.kind == WEIGHT:
        if key not in st.backwarded or key in st.weighted:
            st.fail("weight gradient without its backward, or run twice")
        st.take("wgrads", key)
        st.weighted.add(key)
        st.pending_tokens -= plan.tokens(action.unit)
        duration = costs.weight(st.sid, Action(BACKWARD, *key))
    elif action.kind == STEP:
        if len(st.backwarded) != micro_batches * len(units):
            st.fail("optimizer step before every backward of the step")
        if st.splits and len(st.weighted) != micro_batches * len(units):
            st.fail("optimizer step before every weight gradient of the step")
        duration = costs.step
    else:
        st.fail(f"unknown action kind {action.kind!r}")
    st.clock = start + duration
    segments.append(Segment(st.sid, action, start, st.clock))


def _check_send(st: _Stage, action: Action):
    peer = st.sid + DIRECTION[action.kind]
    if action.kind == SEND_ACT and (st.last or action.key not in st.forwarded):
        st.fail("activation sent by the last stage or before its forward")
    if action.kind == SEND_GRAD and (st.first or action.key not in st.backwarded):
        st.fail("gradient sent by the first stage or before its backward")
    if (action.kind, action.key) in st.sent:
        st.fail("sent twice")
    st.sent.add((action.kind, action.key))
    if action.kind == SEND_GRAD:
        st.take("inputs", action.key)  # the engine sends inputs[key].grad and drops the input
    return peer


def _deliver(st: _Stage, action: Action):
    """The receiving side's buffer effect."""
    st.put("inputs" if action.kind == RECV_ACT else "grads", action.key)


def _check_receive(st: _Stage, action: Action):
    if (action.kind == RECV_ACT and st.first) or (action.kind == RECV_GRAD and st.last):
        st.fail("receive from a stage that does not exist")


def _send(st, action, costs, channels, segments):
    peer = _check_send(st, action)
    channels[st.sid, peer, SENDS[action.kind]].append((action.key, st.clock + costs.send(action)))
    segments.append(Segment(st.sid, action, st.clock, st.clock))
    return True


def _receive(st, action, channels, segments):
    _check_receive(st, action)
    queue = channels[st.sid + DIRECTION[action.kind], st.sid, action.kind]
    if not queue:
        return False
    key, arrival = queue[0]
    if key != action.key:
        st.fail(f"matched with the message of {key}: sends and receives are in different orders")
    queue.popleft()
    _deliver(st, action)
    start, st.clock = st.clock, max(st.clock, arrival)
    segments.append(Segment(st.sid, action, start, st.clock))
    return True


def _rendezvous(st, sts, action, costs, segments):
    peer_id = st.sid + DIRECTION[action.kind]
    if not 0 <= peer_id < len(sts):
        st.fail("send to a stage that does not exist")
    peer = sts[peer_id]
    other = peer.current
    if other is None or other.kind != SENDS[action.kind]:
        return False  # the peer is busy elsewhere; a cycle of such waits is reported as a deadlock
    if other.key != action.key:
        peer.fail(f"matched with the send of {action}: sends and receives are in different orders")
    _check_send(st, action)
    _check_receive(peer, other)
    _deliver(peer, other)
    start = max(st.clock, peer.clock)
    end = start + costs.send(action)
    segments.append(Segment(st.sid, action, st.clock, end))
    segments.append(Segment(peer.sid, other, peer.clock, end))
    st.clock = peer.clock = end
    peer.pc += 1
    return True
