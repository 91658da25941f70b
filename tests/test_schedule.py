"""Schedules as data: every registered schedule lowers to programs the library simulator accepts.

The simulator (seqpipe_ds.schedules.simulator) is the one model of a schedule; these tests run it
over stages x micro-batches x slicings and check what the engine relies on, in the rendezvous
model (a send completes only with its receive), which also covers NCCL's blocking sends.
"""
import itertools

import pytest

from seqpipe_ds.schedules import SCHEDULES, Costs, Schedule, ScheduleError, lower, lower_orders, simulate
from seqpipe_ds.schedules import actions as A
from seqpipe_ds.schedules.lowering import _eager, receive_posts
from seqpipe_ds.schedules.orders import Slice1F1B
from seqpipe_ds.slicing import make_plan

SLICINGS = [(1, 1), (1, 4), (1, [5, 2, 1]), (2, [5, 2, 1]), ([3, 1], [[2, 6], [8]]), ([1, 3], [[1, 1, 6], [8]]),
            (4, 8)]
CONFIGS = list(itertools.product(sorted(SCHEDULES), [1, 2, 3, 4], [1, 2, 5], SLICINGS))


def _run(name, stages, micro_batches, batch_slices, seq_slices):
    plan = make_plan(batch_slices, seq_slices, micro_batch_size=4, seq_length=8)
    programs = lower(name, stages, micro_batches, plan)
    return plan, programs, simulate(programs, plan, rendezvous=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,stages,micro_batches,slicing", CONFIGS)
def test_schedule_runs_and_keeps_the_dependencies(name, stages, micro_batches, slicing):
    plan, programs, result = _run(name, stages, micro_batches, *slicing)
    simulate(programs, plan)  # and with asynchronous sends, as the engine on gloo
    units = plan.units()
    for stage, program in enumerate(programs):
        computes = [a for a in program if a.kind in A.COMPUTE]
        assert sorted(computes) == sorted(A.Action(k, m, *u) for k in A.COMPUTE for m in range(micro_batches)
                                          for u in units)
        sends = [a for a in program if a.kind in A.SENDS]
        assert len(sends) == micro_batches * len(units) * ((stage > 0) + (stage < stages - 1))
        assert program[-1].kind == A.STEP
        loads = [a.micro_batch for a in program if a.kind == A.LOAD]
        assert loads == (list(range(micro_batches)) if stage in (0, stages - 1) else [])
        # Forwards of every micro-batch in stream order (the data iterator's order).
        forwards = [(a.micro_batch, a.unit) for a in computes if a.kind == A.FORWARD]
        assert forwards == [(m, u) for m in range(micro_batches) for u in units]
        _check_weight_gradients(SCHEDULES[name], program, micro_batches * len(units))
    peak = result.peak_alive_units
    most_slices = max(len(lengths) for lengths in plan.seq_slices)
    if SCHEDULES[name].splits_backward:
        # The F and B actions are slice-1f1b's, so are the activations alive; a unit is held from F to W
        # within slice-1f1b's bound on the first stage, which ZB-H1 gives every stage.
        _, _, streamed = _run("slice-1f1b", stages, micro_batches, *slicing)
        assert peak == streamed.peak_alive_units
        for program in programs:
            held = list(itertools.accumulate((a.kind == A.FORWARD) - (a.kind == A.WEIGHT) for a in program))
            assert max(held) <= stages + most_slices - 1, held
    if name == "slice-1f1b":
        # Seq1F1B's bound: the warm-up plus one.
        assert all(peak[s] <= (stages - s) + most_slices - 1 for s in range(stages)), peak
    if name == "terapipe":
        assert peak == [len(units)] * stages  # every unit of a micro-batch is alive at once


def _check_weight_gradients(schedule, program, units):
    """A split backward has one W per B, after it and before the step; otherwise there is no W."""
    weights = [k for k, a in enumerate(program) if a.kind == A.WEIGHT]
    if not schedule.splits_backward:
        assert not weights
        return
    assert len(weights) == units
    where = {a.key: k for k, a in enumerate(program) if a.kind == A.BACKWARD}
    assert all(where[program[k].key] < k < len(program) - 1 for k in weights)


# Zero Bubble PP's idealised costs (t_F = t_B = t_W, no transfers): the fraction of the bubble-free
# step, stages x micro-batches x slices, for slice-1f1b and with the weight gradients deferred. The
# 8 x 8 x 1 case is ZB-H1's bubble, (p - 1)(t_F + t_B - t_W) against 1F1B's (p - 1)(t_F + t_B + t_W).
IDEAL = [((2, 1, 4), 0.800, 0.857), ((2, 2, 4), 0.889, 0.960), ((4, 1, 8), 0.727, 0.800),
         ((8, 8, 1), 0.533, 24 / 31), ((8, 8, 4), 0.821, 0.932)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape,sliced,deferred", IDEAL)
def test_deferred_weight_gradients_fill_the_bubbles(shape, sliced, deferred):
    stages, micro_batches, slices = shape
    plan = make_plan(1, slices, micro_batch_size=1, seq_length=slices)
    costs = Costs(lambda stage, a: 1.0 if a.kind == A.FORWARD else 2.0, weight=lambda stage, a: 1.0)
    work = 3.0 * micro_batches * slices
    fractions = {name: work / simulate(lower(name, stages, micro_batches, plan), plan, costs).makespan
                 for name in SCHEDULES}
    assert fractions["slice-1f1b"] == pytest.approx(sliced, abs=5e-4)
    assert fractions["slice-zb"] == pytest.approx(deferred, abs=5e-4)


@pytest.mark.timeout(60)
def test_simulator_checks_weight_gradients():
    plan = make_plan(1, 2, micro_batch_size=1, seq_length=2)
    good = [list(p) for p in lower("slice-zb", 2, 1, plan)]
    simulate(good, plan, rendezvous=True)
    first_w = next(k for k, a in enumerate(good[0]) if a.kind == A.WEIGHT)
    late = list(good[0])
    w = late.pop(first_w)
    late.insert(len(late) - 1, w)  # fine anywhere before the step
    simulate([late, good[1]], plan, rendezvous=True)
    early = list(good[0])
    early.pop(first_w)
    early.insert(early.index(A.Action(A.BACKWARD, *w.key)), w)  # before its own B
    with pytest.raises(ScheduleError, match="weight gradient without its backward"):
        simulate([early, good[1]], plan)
    after_step = [a for a in good[0] if a != w] + [w]
    with pytest.raises(ScheduleError, match="optimizer step before every weight gradient"):
        simulate([after_step, good[1]], plan)
    missing = [a for a in good[0] if a != w]
    with pytest.raises(ScheduleError, match="optimizer step before every weight gradient"):
        simulate([missing, good[1]], plan)
    # The time split: B is charged its backward less the weight part, W that part.
    costs = Costs(lambda stage, a: 1.0 if a.kind == A.FORWARD else 3.0, weight=lambda stage, a: 1.25)
    result = simulate(good, plan, costs)
    durations = {(s.stage, s.kind): s.end - s.start for s in result.segments if s.kind in "BW"}
    assert durations[0, "B"] == pytest.approx(1.75) and durations[0, "W"] == pytest.approx(1.25)
    unsplit = simulate(lower("slice-1f1b", 2, 1, plan), plan, costs)
    assert {s.end - s.start for s in unsplit.segments if s.kind == "B"} == {3.0}


@pytest.mark.timeout(60)
def test_memory_model_counts_w_buffers_until_their_w():
    plan = make_plan(2, [3, 5], micro_batch_size=2, seq_length=8)
    rates, weight_rates = [10.0, 20.0], [4.0, 1.0]
    for name, schedule in SCHEDULES.items():
        programs = lower(name, 2, 3, plan)
        result = simulate(programs, plan, bytes_per_token=rates, weight_bytes_per_token=weight_rates)
        for stage, program in enumerate(programs):
            alive = pending = peak = 0.0
            for a in program:  # by hand: F holds its tokens until B, a split B until its W
                tokens = plan.tokens(a.unit) if a.kind in "FBW" else 0
                alive += tokens * ((a.kind == A.FORWARD) - (a.kind == A.BACKWARD))
                pending += tokens * ((a.kind == A.BACKWARD and schedule.splits_backward) - (a.kind == A.WEIGHT))
                peak = max(peak, alive * rates[stage] + pending * weight_rates[stage])
            assert result.peak_activation_bytes[stage] == pytest.approx(peak), (name, stage)
            if not schedule.splits_backward:
                assert peak == result.peak_alive_tokens[stage] * rates[stage]


@pytest.mark.timeout(60)
def test_terapipe_has_no_such_bound_with_batch_slices():
    plan, _, result = _run("terapipe", 2, 2, 4, 8)
    _, _, streamed = _run("slice-1f1b", 2, 2, 4, 8)
    assert result.peak_alive_units[0] == 32 > 2 + 8 - 1 == streamed.peak_alive_units[0]


@pytest.mark.timeout(60)
def test_slice_1f1b_steady_state_alternates():
    plan = make_plan(1, 4, micro_batch_size=1, seq_length=8)
    order = Slice1F1B(stages=2, micro_batches=3, plan=plan).compute_order(0)
    kinds = "".join(a.kind for a in order)
    warmup = (2 - 0 - 1) + (4 - 1)
    assert kinds == "F" * warmup + "FB" * (12 - warmup) + "B" * warmup


@pytest.mark.timeout(60)
def test_eager_lowering_of_1f1b_deadlocks_with_blocking_sends():
    # Why the lowering exchanges: receive-before-use, send-after-produce deadlocks on NCCL.
    plan = make_plan(1, 2, micro_batch_size=1, seq_length=4)
    orders = Slice1F1B(stages=2, micro_batches=2, plan=plan).compute_orders()
    simulate(_eager(orders), plan)  # fine with async sends
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(_eager(orders), plan, rendezvous=True)
    simulate(lower_orders(orders, plan), plan, rendezvous=True)


@pytest.mark.timeout(60)
def test_simulator_detects_broken_programs():
    plan = make_plan(1, 2, micro_batch_size=1, seq_length=2)
    good = [list(p) for p in lower("terapipe", 2, 1, plan)]
    swapped = list(good[1])
    i = next(k for k, a in enumerate(swapped) if a.kind == A.RECV_ACT)
    swapped[i], swapped[i + 2] = swapped[i + 2], swapped[i]  # receive slice 1 before slice 0
    with pytest.raises(ScheduleError, match="different orders|before"):
        simulate([good[0], swapped], plan, rendezvous=True)
    no_receive = [a for a in good[1] if a.kind != A.RECV_ACT]
    with pytest.raises(ScheduleError, match="deadlock|without its input"):
        simulate([good[0], no_receive], plan, rendezvous=True)
    with pytest.raises(ScheduleError, match="without its input"):
        simulate([good[0], no_receive], plan)
    forward_order = [a if a.kind != A.BACKWARD else None for a in good[0]]
    backwards = [a for a in good[0] if a.kind == A.BACKWARD][::-1]  # slice 0's backward first: wrong
    wrong = [a if a is not None else backwards.pop(0) for a in forward_order]
    with pytest.raises(ScheduleError, match="later slices"):
        simulate([wrong, good[1]], plan)


class _BackwardsInForwardOrder(Schedule):
    """Deliberately wrong: a sequence's slices backward in forward order."""
    name = "broken"

    def compute_order(self, stage):
        units = self.plan.units()
        return [A.forward(m, u) for m in range(self.micro_batches) for u in units] + \
               [A.backward(m, u) for m in range(self.micro_batches) for u in units]


@pytest.mark.timeout(60)
def test_a_schedule_that_cannot_run_a_slicing_is_rejected_by_lowering():
    plan = make_plan(1, 3, micro_batch_size=1, seq_length=6)
    schedule = _BackwardsInForwardOrder(2, 1, plan)
    with pytest.raises(ScheduleError, match="later slices"):
        lower_orders(schedule.compute_orders(), plan)
    single = make_plan(1, 1, micro_batch_size=1, seq_length=6)  # with one slice it is a fine schedule
    lower_orders(_BackwardsInForwardOrder(2, 1, single).compute_orders(), single)


@pytest.mark.timeout(60)
def test_timing_and_memory_model():
    plan = make_plan(1, 4, micro_batch_size=1, seq_length=8)
    costs = Costs(lambda stage, a: 1.0 if a.kind == A.FORWARD else 2.0, send=lambda a: 0.5, step=3.0)
    result = simulate(lower("slice-1f1b", 2, 2, plan), plan, costs, bytes_per_token=[10.0, 20.0])
    assert result.peak_activation_bytes == [t * b for t, b in zip(result.peak_alive_tokens, [10.0, 20.0])]
    assert result.peak_alive_tokens == [2 * u for u in result.peak_alive_units]
    for stage in range(2):
        row = result.stage_segments(stage)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(row, row[1:]))  # one thing at a time
        assert row[-1].kind == A.STEP and row[-1].end - row[-1].start == 3.0
    # Stage 1's first forward waits for stage 0's forward plus the transfer.
    first = {(s.stage, s.action.kind, s.action.key): s for s in result.segments}
    assert first[1, "F", (0, 0, 0)].start == pytest.approx(1.5)
    assert result.makespan == max(s.end for s in result.segments)


def _per_peer(program, posts):
    """Per peer offset, the stage's sends and receive posts in the order the engine issues them."""
    issued = {}
    for action in [None, *program]:
        if action is not None and action.kind in A.SENDS:
            issued.setdefault(A.DIRECTION[action.kind], []).append(action)
        for receive in posts.get(action, ()):
            issued.setdefault(A.DIRECTION[receive.kind], []).append(receive)
    return issued


@pytest.mark.timeout(120)
def test_receives_are_posted_ahead_in_each_peers_own_order():
    """The NCCL-safety argument of ``receive_posts``: per peer, posting ahead keeps the program's order
    of sends and receives (which the lowering checked both sides meet in), and one receive per peer
    is outstanding at a time."""
    ahead = 0
    for name, stages, micro_batches, slicing in CONFIGS:
        plan, programs, _ = _run(name, stages, micro_batches, *slicing)
        for program in programs:
            posts = receive_posts(program)
            index = {a: i for i, a in enumerate(program)}
            posted = {r: -1 if after is None else index[after] for after, rs in posts.items() for r in rs}
            receives = [a for a in program if a.kind in A.RECVS]
            assert sorted(posted) == sorted(receives)  # each receive posted once
            for receive, at in posted.items():
                assert at < index[receive]
                ahead += at < index[receive] - 1
                peer = A.DIRECTION[receive.kind]
                between = program[at + 1:index[receive]]
                assert not [a for a in between if a.kind in A.SENDS and A.DIRECTION[a.kind] == peer]
                assert not [a for a in between if a.kind in A.RECVS and A.DIRECTION[a.kind] == peer]
            in_program = {}
            for a in program:
                if a.kind in A.SENDS or a.kind in A.RECVS:
                    in_program.setdefault(A.DIRECTION[a.kind], []).append(a)
            assert _per_peer(program, posts) == in_program
    assert ahead  # some receive is posted before the action right before it
    # The last of 2 stages posts slice j+1's activation as soon as it has slice j's: before forward j.
    plan = make_plan(1, 4, micro_batch_size=1, seq_length=8)
    last = lower("slice-zb", 2, 1, plan)[1]
    posts = receive_posts(last)
    for j in range(3):
        assert posts[A.Action(A.RECV_ACT, 0, 0, j)] == (A.Action(A.RECV_ACT, 0, 0, j + 1),)


@pytest.mark.timeout(60)
def test_every_instruction_has_an_engine_handler():
    from seqpipe_ds.engine import SeqPipeEngine
    from seqpipe_ds.schedules.instructions import ProgramSchedule
    plan = make_plan(2, 2, micro_batch_size=2, seq_length=4)
    for name in SCHEDULES:
        for stage, program in enumerate(lower(name, 3, 2, plan)):
            for step in ProgramSchedule(program, 2, 3, stage).steps():
                for cmd in step:
                    assert type(cmd) in SeqPipeEngine._INSTRUCTION_MAP, cmd
