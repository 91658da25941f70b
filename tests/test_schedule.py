"""The TeraPipe schedule in plain Python: all stages' instruction streams simulated together.

Point-to-point calls are modelled as blocking rendezvous: a send completes only together with the
neighbour's matching receive. The engine sends asynchronously, which can only remove waits, so a
schedule free of deadlock here is free of it there too. The simulator
checks matching, the absence of deadlock, forward-before-backward, reverse backward order within
a batch slice, and that no per-unit buffer the engine keeps is overwritten while still needed.
"""
import itertools

import pytest
from deepspeed.runtime.pipe.schedule import OptimizerStep, ReduceGrads, ReduceTiedGrads

from seqpipe_ds import schedule as S
from seqpipe_ds.slicing import make_plan

COMM = {S.SendSliceActivation: ("act", +1), S.RecvSliceActivation: ("act", -1),
        S.SendSliceGrad: ("grad", -1), S.RecvSliceGrad: ("grad", +1)}


def streams(stages, micro_batches, plan):
    return [[cmd for step in S.TeraPipeSchedule(micro_batches, stages, s, plan).steps() for cmd in step]
            for s in range(stages)]


class Stage:
    def __init__(self, sid, stages, program):
        self.sid, self.last, self.program, self.pc = sid, sid == stages - 1, program, 0
        self.loaded, self.forwarded, self.backwarded = set(), set(), []
        self.buffers = {"inputs": {}, "outputs": {}, "grads": {}}  # what SeqPipeEngine keys by unit

    def put(self, kind, unit, value):
        assert unit not in self.buffers[kind], f"stage {self.sid}: {kind}[{unit}] overwritten while still needed"
        self.buffers[kind][unit] = value

    def take(self, kind, unit, expected):
        assert self.buffers[kind].get(unit) == expected, f"stage {self.sid}: {kind}[{unit}] is not micro-batch {expected}"
        del self.buffers[kind][unit]


def execute_local(st, cmd, plan):
    m = getattr(cmd, "micro_batch", None)
    if isinstance(cmd, S.LoadMicroBatch):
        st.loaded.add(m)
    elif isinstance(cmd, S.ForwardSlice):
        b, s = cmd.unit
        assert s == 0 or (m, (b, s - 1)) in st.forwarded, f"stage {st.sid}: slice {cmd.unit} before its predecessor"
        if st.sid == 0:
            assert m in st.loaded
            st.put("inputs", cmd.unit, m)
        if st.sid == 0 or st.last:
            assert m in st.loaded, f"stage {st.sid}: forward of micro-batch {m} before it was loaded"
        assert cmd.unit in st.buffers["inputs"], f"stage {st.sid}: forward {cmd.unit} without its input"
        if st.sid == 0:
            st.take("inputs", cmd.unit, m)
        st.forwarded.add((m, cmd.unit))
        if not st.last:
            st.put("outputs", cmd.unit, m)
    elif isinstance(cmd, S.BackwardSlice):
        b, s = cmd.unit
        assert (m, cmd.unit) in st.forwarded, f"stage {st.sid}: backward before forward of {cmd.unit}"
        later = [(m, (b, j)) for j in range(s + 1, len(plan.seq_slices[b]))]
        assert all(u in st.backwarded for u in later), f"stage {st.sid}: backward of {cmd.unit} before later slices"
        if not st.last:
            st.take("outputs", cmd.unit, m)
            st.take("grads", cmd.unit, m)
        st.backwarded.append((m, cmd.unit))
    else:
        assert isinstance(cmd, (ReduceTiedGrads, ReduceGrads, OptimizerStep)), f"unexpected instruction {cmd}"


def simulate(programs, plan):
    stages = len(programs)
    sts = [Stage(s, stages, prog) for s, prog in enumerate(programs)]
    while True:
        progressed = False
        for st in sts:
            if st.pc == len(st.program):
                continue
            cmd = st.program[st.pc]
            if type(cmd) not in COMM:
                execute_local(st, cmd, plan)
                st.pc += 1
                progressed = True
                continue
            kind, direction = COMM[type(cmd)]
            peer = sts[st.sid + direction] if 0 <= st.sid + direction < stages else None
            assert peer is not None, f"stage {st.sid}: {cmd} has no neighbour"
            other = peer.program[peer.pc] if peer.pc < len(peer.program) else None
            if other is None or type(other) not in COMM:
                continue  # blocked until the neighbour reaches a p2p call
            o_kind, o_dir = COMM[type(other)]
            if o_kind != kind or st.sid + direction + o_dir != st.sid:
                continue  # the neighbour waits on something else; a cycle shows up as a deadlock
            assert (other.micro_batch, other.unit) == (cmd.micro_batch, cmd.unit), \
                f"stages {st.sid}/{peer.sid}: {cmd} matched with {other}"
            sender, receiver = (st, peer) if cmd.name.startswith("Send") else (peer, st)
            if kind == "act":
                receiver.put("inputs", cmd.unit, cmd.micro_batch)
            else:
                sender.take("inputs", cmd.unit, cmd.micro_batch)
                receiver.put("grads", cmd.unit, cmd.micro_batch)
            st.pc += 1
            peer.pc += 1
            progressed = True
        if all(st.pc == len(st.program) for st in sts):
            return sts
        assert progressed, "deadlock: " + "; ".join(f"stage {st.sid} waits at {st.program[st.pc]}"
                                                      for st in sts if st.pc < len(st.program))


CONFIGS = [(stages, mb, bs, ss) for stages, mb, (bs, ss) in itertools.product(
    [1, 2, 3, 4], [1, 2], [(1, 1), (1, 4), (2, [5, 2, 1]), ([3, 1], [[2, 6], [8]]), (4, 8)])]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stages,micro_batches,batch_slices,seq_slices", CONFIGS)
def test_schedule_is_consistent(stages, micro_batches, batch_slices, seq_slices):
    plan = make_plan(batch_slices, seq_slices, micro_batch_size=4, seq_length=8)
    sts = simulate(streams(stages, micro_batches, plan), plan)
    for st in sts:
        assert not any(st.buffers.values()), f"stage {st.sid} left {st.buffers}"
        assert len(st.backwarded) == micro_batches * len(plan.units())
        # TeraPipe's order: per micro-batch, backwards exactly in reverse forward order.
        for m in range(micro_batches):
            assert [u for mb, u in st.backwarded if mb == m] == plan.units()[::-1]


@pytest.mark.timeout(60)
def test_simulator_detects_deadlock_and_mismatch():
    plan = make_plan(1, 2, micro_batch_size=1, seq_length=2)
    good = streams(2, 1, plan)
    swapped = list(good[1])
    i = next(k for k, c in enumerate(swapped) if isinstance(c, S.RecvSliceActivation))
    swapped[i], swapped[i + 2] = swapped[i + 2], swapped[i]  # receive slice 1 before slice 0
    with pytest.raises(AssertionError, match="matched with|before"):
        simulate([good[0], swapped], plan)
    sends_first = [c for c in good[1] if not isinstance(c, S.RecvSliceActivation)]
    with pytest.raises(AssertionError, match="deadlock|without its input"):
        simulate([good[0], sends_first], plan)


def test_every_instruction_has_an_engine_handler():
    from seqpipe_ds.engine import SeqPipeEngine
    plan = make_plan(2, 2, micro_batch_size=2, seq_length=4)
    for program in streams(3, 2, plan):
        for cmd in program:
            assert type(cmd) in SeqPipeEngine._INSTRUCTION_MAP, cmd
