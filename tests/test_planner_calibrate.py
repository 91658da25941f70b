"""In-engine calibration (planner/calibrate.py): factors recovered from traced runs, a held-out run
predicted within the stated error, and the factors carried through a model file into every plan."""
import json
from dataclasses import replace

import numpy as np
import pytest

from seqpipe_ds.planner.calibrate import Calibration, Run, _affine, calibrate, misses, store
from seqpipe_ds.planner.costs import CostModel
from seqpipe_ds.planner.fit import read_model_file
from seqpipe_ds.planner.planning import (calibration_runs, calibration_variants, cost_model,
                                         keep_first_predictions, missed_predictions, variant_plan)
from seqpipe_ds.schedules.actions import BACKWARD, FORWARD, STEP
from seqpipe_ds.slicing import make_plan

SEQ = 512
TRUE_SCALE = ((1.04, 1.09), (1.21, 1.17), (1.12, 1.25))  # the "engine": each stage and direction its own factor
TRUE_EXTRA = 0.03  # and seconds per step outside the units
TRUE_UNIT_EXTRA = ((0.004, 0.0), (0.006, 0.002), (0.0, 0.003))  # and seconds per forward / backward call
TRUE_SEQUENCE_EXTRA = ((0.002, 0.005), (0.0, 0.001), (0.003, 0.0))  # and per sequence of a unit
TRUE_GAP = 0.004  # and seconds around every forward and backward instruction, outside the unit


def profile_costs(stages=3):
    """A latency model's reading: attention makes later slices dearer; the last stage has a head."""
    def compute(s, b, l, c):
        return b * (2e-4 * l + 1e-7 * l * c) * (1.3 if s == stages - 1 else 1.0) + 1e-3
    return CostModel(stages=stages, compute=compute, send=lambda b, l: 1e-5 * b * l, forward_fraction=0.35)


def engine_of(profile, gap=0.0):
    return Calibration(profile.stages, TRUE_SCALE, 0.0, 0, TRUE_EXTRA, TRUE_UNIT_EXTRA,
                       TRUE_SEQUENCE_EXTRA, gap).apply(profile)


def traced_run(engine, schedule, micro_batches, plan, noise=0.0, seed=0, steps_traced=False):
    """What ``seqpipe_ds.benchmark`` records for a seqpipe run, here from the simulator of a known
    engine: the units of each of two timed iterations and their step times (a unit's trace ends
    before the engine's gap around it); with ``steps_traced`` each stage's STEP too, as the engine
    traces it now (traces recorded before it have none)."""
    result = engine.simulate(schedule, micro_batches, plan)
    rng = np.random.default_rng(seed)
    iterations = []
    for _ in range(2):
        rows = []
        for seg in result.segments:
            if seg.kind in (FORWARD, BACKWARD):
                duration = (seg.end - seg.start - engine.gap) * (1 + noise * rng.uniform(-1, 1))
                rows.append([seg.stage, seg.kind, *seg.action.key, seg.start, seg.start + duration])
            elif seg.kind == STEP and steps_traced:
                rows.append([seg.stage, seg.kind, *seg.action.key, seg.start, seg.end])
        iterations.append(rows)
    steps = [result.makespan * (1 + noise * rng.uniform(-1, 1)) for _ in range(2)]
    return Run(schedule, plan, micro_batches, iterations, steps)


def test_recovers_the_engine_factors_exactly():
    profile = profile_costs()
    engine = engine_of(profile)
    runs = [traced_run(engine, "slice-1f1b", 2, make_plan(1, 1, 1, SEQ)),
            traced_run(engine, "slice-1f1b", 2, make_plan(1, 4, 1, SEQ)),
            traced_run(engine, "slice-1f1b", 1, make_plan(1, 4, 3, SEQ))]  # units of 3 sequences
    found = calibrate(profile, runs)
    np.testing.assert_allclose(np.array(found.scale), np.array(TRUE_SCALE), rtol=1e-9)
    np.testing.assert_allclose(np.array(found.unit_extra), np.array(TRUE_UNIT_EXTRA), rtol=0, atol=1e-11)
    np.testing.assert_allclose(np.array(found.sequence_extra), np.array(TRUE_SEQUENCE_EXTRA), rtol=0, atol=1e-11)
    assert found.step_extra == pytest.approx(TRUE_EXTRA, rel=1e-9)
    assert found.residual < 1e-9 and found.units == sum(len(trace) for run in runs for trace in run.traces)
    # A held-out run (another schedule, slicing and batch) is then predicted exactly.
    held_out = make_plan([1, 1], [[128, 256, 128], [256, 256]], 2, SEQ)
    predicted = found.apply(profile).simulate("terapipe", 3, held_out).makespan
    assert predicted == pytest.approx(engine.simulate("terapipe", 3, held_out).makespan, rel=1e-9)
    uncalibrated = profile.simulate("terapipe", 3, held_out).makespan
    assert uncalibrated < 0.92 * predicted  # without the factors the prediction is > 8% low
    # Factors alone (what one ratio per stage and direction gives) miss the per-call seconds: an
    # 8-slice run is priced low by more than the stated error, the fitted model prices it exactly.
    eight = make_plan(1, 8, 1, SEQ)
    ratio_only = Calibration(profile.stages, TRUE_SCALE, 0.0, 0, TRUE_EXTRA).apply(profile)
    actual = engine.simulate("slice-1f1b", 2, eight).makespan
    assert ratio_only.simulate("slice-1f1b", 2, eight).makespan < 0.97 * actual
    assert found.apply(profile).simulate("slice-1f1b", 2, eight).makespan == pytest.approx(actual, rel=1e-9)
    # Units of one sequence alone cannot tell the per-sequence seconds from the per-unit ones: fitted on
    # them, both land in the per-unit term, which prices 8 slices of 8 sequences low.
    single = calibrate(profile, runs[:2])
    assert single.sequence_extra == ()
    np.testing.assert_allclose(np.array(single.unit_extra), np.array(TRUE_UNIT_EXTRA) + TRUE_SEQUENCE_EXTRA,
                               rtol=0, atol=1e-11)
    wide = make_plan(1, 8, 8, SEQ)
    actual = engine.simulate("slice-1f1b", 1, wide).makespan
    assert single.apply(profile).simulate("slice-1f1b", 1, wide).makespan < 0.97 * actual
    assert found.apply(profile).simulate("slice-1f1b", 1, wide).makespan == pytest.approx(actual, rel=1e-9)


def test_the_gap_around_every_instruction_is_fitted_from_the_steps():
    """The engine spends time around each F and B that no traced unit shows: where the runs have
    different numbers of instructions on their longest paths, the step residuals tell it from the
    per-step time, and a held-out run of many more units is predicted exactly; without it (the step's
    extra time alone, the median residual) that run is priced low by more than the stated error."""
    profile = profile_costs()
    engine = engine_of(profile, TRUE_GAP)
    runs = [traced_run(engine, "slice-1f1b", 2, make_plan(1, 1, 1, SEQ)),
            traced_run(engine, "slice-1f1b", 2, make_plan(1, 4, 1, SEQ)),
            traced_run(engine, "slice-1f1b", 1, make_plan(1, 4, 3, SEQ))]
    found = calibrate(profile, runs)
    assert found.gap == pytest.approx(TRUE_GAP, rel=1e-9) and found.step_extra == pytest.approx(TRUE_EXTRA, rel=1e-9)
    np.testing.assert_allclose(np.array(found.scale), np.array(TRUE_SCALE), rtol=1e-9)
    assert found.residual < 1e-9
    assert Calibration.from_dict(json.loads(json.dumps(found.to_dict()))) == found
    many = make_plan(1, 8, 1, SEQ)
    actual = engine.simulate("terapipe", 6, many).makespan  # 48 units per stage, against at most 8 fitted
    assert found.apply(profile).simulate("terapipe", 6, many).makespan == pytest.approx(actual, rel=1e-9)
    no_gap = replace(found, gap=0.0, step_extra=0.0)
    median = float(np.median([np.median(run.step_times) - no_gap.apply(profile).simulate(
        run.schedule, run.micro_batches, run.plan).makespan for run in runs]))
    median_only = replace(no_gap, step_extra=median)
    assert median_only.apply(profile).simulate("terapipe", 6, many).makespan < (1 - 0.05) * actual
    # One run cannot tell the gap from the step's extra time: the gap is 0 there.
    assert calibrate(profile, runs[1:2]).gap == 0.0


def test_the_step_traced_by_the_engine_is_taken_as_measured():
    """With the engine's STEP in the traces the step's time is measured (the fit keeps at least that):
    even one run, which cannot tell the gap from the step's time by its step alone, then gives both
    exactly (the stage that steps last is the one that counts), and a held-out run of many more units
    is predicted exactly; from traces without STEP rows the gap stays 0 there and that run is priced low."""
    from seqpipe_ds.planner.calibrate import measured_step
    profile = profile_costs()
    engine = engine_of(profile, TRUE_GAP)
    runs = [traced_run(engine, "slice-1f1b", 2, make_plan(1, 1, 1, SEQ), steps_traced=True),
            traced_run(engine, "slice-1f1b", 1, make_plan(1, 4, 3, SEQ), steps_traced=True)]
    assert measured_step(runs) == pytest.approx(profile.step + TRUE_EXTRA, rel=1e-12)
    # From the last stage's STEP start to the iteration's end: a stage that steps early (and waits in
    # its step for the others) does not count, what the iteration spends after the steps does.
    first = runs[0]
    last = max(row[-2] for row in first.traces[0] if row[1] == STEP)
    early = [row[:-2] + [row[-2] - 0.5, row[-1]] if row[1] == STEP and row[-2] < last else row
             for row in first.traces[0]]
    assert measured_step([first._replace(traces=[early], step_times=first.step_times[:1])]) == pytest.approx(
        profile.step + TRUE_EXTRA, rel=1e-12)
    later = first._replace(step_times=[t + 0.01 for t in first.step_times])
    assert measured_step([later]) == pytest.approx(profile.step + TRUE_EXTRA + 0.01, rel=1e-12)
    assert measured_step([traced_run(engine, "slice-1f1b", 1, make_plan(1, 4, 3, SEQ))]) is None
    one = calibrate(profile, runs[1:])
    assert one.step_extra == pytest.approx(TRUE_EXTRA, rel=1e-9) and one.gap == pytest.approx(TRUE_GAP, rel=1e-6)
    many = make_plan(1, 8, 3, SEQ)  # units of 3 sequences, as the run's (one run cannot tell per sequence)
    actual = engine.simulate("terapipe", 6, many).makespan
    assert one.apply(profile).simulate("terapipe", 6, many).makespan == pytest.approx(actual, rel=1e-6)
    # The measured step is a floor of the fitted one: a step that also spends time the simulator places
    # nowhere (0.05 s here, before its STEP) gets it added, fitted with the gap from runs that tell them apart.
    three = [traced_run(engine, "slice-1f1b", 2, make_plan(1, 1, 1, SEQ), steps_traced=True),
             traced_run(engine, "slice-1f1b", 2, make_plan(1, 4, 1, SEQ), steps_traced=True),
             traced_run(engine, "slice-1f1b", 1, make_plan(1, 4, 3, SEQ), steps_traced=True)]
    unplaced = [run._replace(step_times=[t + 0.05 for t in run.step_times],
                             traces=[[r[:-2] + [r[-2] + 0.05, r[-1] + 0.05] if r[1] == STEP else r for r in t]
                                     for t in run.traces]) for run in three]
    assert measured_step(unplaced) == pytest.approx(profile.step + TRUE_EXTRA, rel=1e-12)
    more = calibrate(profile, unplaced)
    assert more.step_extra == pytest.approx(TRUE_EXTRA + 0.05, rel=1e-9) and more.gap == pytest.approx(TRUE_GAP,
                                                                                                       rel=1e-6)
    untraced = calibrate(profile, [run._replace(traces=[[r for r in t if r[1] != STEP] for t in run.traces])
                                   for run in runs[1:]])
    assert untraced.gap == 0.0
    assert untraced.apply(profile).simulate("terapipe", 6, many).makespan < 0.95 * actual


def test_noisy_traces_predict_a_held_out_run_within_the_stated_error():
    profile = profile_costs()
    engine = engine_of(profile)
    runs = [traced_run(engine, "slice-1f1b", 2, make_plan(1, k, 1, SEQ), noise=0.05, seed=k) for k in (1, 4)]
    found = calibrate(profile, runs)
    assert 0 < found.residual < 0.05
    held_out = make_plan(2, 2, 2, SEQ)
    predicted = found.apply(profile).simulate("slice-1f1b", 2, held_out).makespan
    actual = engine.simulate("slice-1f1b", 2, held_out).makespan
    assert abs(predicted / actual - 1) <= found.residual


def test_a_slow_iteration_does_not_move_the_fit():
    """The host slows down (1.8x, as the 2-core EPYC did) during one of three traced iterations: each
    unit's median over the iterations, and the median step, keep the fit exact."""
    profile = profile_costs()
    engine = engine_of(profile)
    runs, slow_only = [], []
    for k in (1, 4):
        run = traced_run(engine, "slice-1f1b", 2, make_plan(1, k, 1, SEQ))
        fast, step = run.traces[0], run.step_times[0]
        slow = [[*row[:6], row[5] + 1.8 * (row[6] - row[5])] for row in fast]
        runs.append(run._replace(traces=[fast, slow, fast], step_times=[step, 1.8 * step, step]))
        slow_only.append(run._replace(traces=[slow], step_times=[1.8 * step]))
    found = calibrate(profile, runs)
    np.testing.assert_allclose(np.array(found.scale), np.array(TRUE_SCALE), rtol=1e-9)
    np.testing.assert_allclose(np.array(found.unit_extra), np.array(TRUE_UNIT_EXTRA) + TRUE_SEQUENCE_EXTRA,
                               rtol=0, atol=1e-11)  # units of one sequence: its seconds are the unit's
    assert found.residual < 1e-9 and found.units == 3 * sum(len(run.traces[0]) for run in runs)
    # The slow iteration alone is fitted as it ran: 1.8x the engine's factors and seconds per call.
    slowed = calibrate(profile, slow_only)
    np.testing.assert_allclose(np.array(slowed.scale), 1.8 * np.array(TRUE_SCALE), rtol=1e-9)


def test_the_fit_weighs_every_unit_relative_to_its_time():
    """Batch 8's calibration on the Xeon (2026-12-04) in small: one-sequence units of three sizes
    (1, 4 and 8 slices) ran 1.03x their model, the whole-batch variant's units of 8 sequences 1.10x.
    Fitted relative to each unit's time, the one-sequence units stay priced within 2% (an absolute
    least-squares fit of the same units, dominated by the long ones, misprices them by up to 6.5%)."""
    one_sequence = [(1.03 * model, model, 1) for model, count in ((0.2, 2), (0.05, 8), (0.03, 16))
                    for _ in range(count)]
    whole_batch = [(1.10 * 0.24, 0.24, 8)] * 8
    factor, per_unit, per_sequence = _affine(one_sequence + whole_batch)
    errors = [(factor * model + per_unit + per_sequence * sequences) / measured - 1
              for measured, model, sequences in one_sequence]
    assert max(abs(e) for e in errors) < 0.025


def test_misses_are_the_held_out_runs_beyond_the_stated_error():
    calibration = Calibration(2, ((1.0, 1.0), (1.0, 1.0)), 0.05, 10)
    held_out = {"within": (1.04, 1.0), "high": (1.2, 1.0), "low": (1.0, 1.1)}
    assert misses(calibration, held_out) == ["high", "low"]
    assert misses(replace(calibration, residual=0.2), held_out) == []


def test_bad_input_is_one_clear_error():
    profile = profile_costs()
    with pytest.raises(ValueError, match="already set"):
        calibrate(engine_of(profile), [])
    with pytest.raises(ValueError, match="traced no forward on stage 0"):
        calibrate(profile, [])


def test_a_model_file_carries_the_calibration_into_cost_model(fitted_recompute_model):
    path = str(fitted_recompute_model)
    found = read_model_file(path)
    stages = 2
    calibration = Calibration(stages, ((1.1, 1.2), (1.3, 1.4)), 0.02, 10, 0.05, ((0.01, 0.0), (0.0, 0.02)),
                              ((0.003, 0.004), (0.0, 0.005)))
    store(path, calibration)
    assert json.loads(open(path).read())["calibration"] == calibration.to_dict()
    calibrated = read_model_file(path)
    assert cost_model(calibrated, stages).scale == calibration.scale
    assert cost_model(calibrated, stages).step == pytest.approx(cost_model(found, stages).step + 0.05, rel=1e-12)
    assert cost_model(calibrated, 3).scale is None  # made on another stage count: not applied
    assert cost_model(calibrated, stages, identical=True).scale is None  # TeraPipe's DP objective stays the DP's
    plan = make_plan(1, 4, 2, found.config["seq_length"])  # units of 2 sequences
    base, scaled = cost_model(found, stages).unit_times(plan), cost_model(calibrated, stages).unit_times(plan)
    for (stage, unit), (forward, backward) in base.items():
        extra = np.array(calibration.unit_extra[stage]) + 2 * np.array(calibration.sequence_extra[stage])
        assert scaled[stage, unit] == pytest.approx((forward * calibration.scale[stage][0] + extra[0],
                                                     backward * calibration.scale[stage][1] + extra[1]), rel=1e-12)
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_unsliced_1f1b_wins_within_the_stated_error():
    from seqpipe_ds.planner.costs import Candidate
    from seqpipe_ds.planner.search import SearchResult, prefer_unsliced
    sliced = Candidate("terapipe", 1, make_plan(4, 4, 4, SEQ), 1.0, None, "DP")
    unsliced = Candidate("slice-1f1b", 4, make_plan(1, 1, 1, SEQ), 1.04, None, "uniform 1")
    other = Candidate("slice-1f1b", 2, make_plan(2, 2, 2, SEQ), 1.02, None, "uniform 2")
    result = SearchResult(best=sliced, evaluated=3, smallest_peak=sliced, fitting=3,
                          candidates=[sliced, other, unsliced])
    assert prefer_unsliced(result, 0.05).best.plan == unsliced.plan  # 4% predicted gain < 5% stated error
    assert "within 5% of the fastest" in prefer_unsliced(result, 0.05).best.source
    assert prefer_unsliced(result, 0.03).best is sliced  # a 4% gain beyond a 3% error is kept
    assert prefer_unsliced(result, 0.0).best is sliced
    without = SearchResult(best=sliced, evaluated=2, smallest_peak=sliced, fitting=2, candidates=[sliced, other])
    assert prefer_unsliced(without, 0.5).best is sliced


def test_the_bench_calibration_variants_identify_every_term():
    """What ``seqpipe-bench`` launches to calibrate (planning.calibration_variants) tells every term apart
    at batch 8: with the whole-batch micro-batch the per-sequence seconds are recovered, and an 8-slice
    micro-batch of 8 sequences is priced exactly; at batch 1 there are only units of one sequence."""
    profile = profile_costs()
    engine = engine_of(profile)
    variants = calibration_variants(8, SEQ, 64)
    assert list(variants) == ["calibration: 1 slice(s)", "calibration: 4 slice(s)", "calibration: 8 slice(s)",
                              "calibration: 8 slice(s) of 8"]
    schedule, whole, micro_batches = variant_plan(variants["calibration: 8 slice(s) of 8"], 3, 8, SEQ)
    assert (schedule, micro_batches, whole.shape((0, 0))) == ("slice-1f1b", 1, (8, SEQ // 8))
    runs = []
    for variant in variants.values():
        schedule, plan, micro_batches = variant_plan(variant, 3, 8, SEQ)
        runs.append(traced_run(engine, schedule, micro_batches, plan))
    timing = {"timed_traces": {name: run.traces for name, run in zip(variants, runs)},
              "times": {name: run.step_times for name, run in zip(variants, runs)}}
    assert calibration_runs(variants, timing, 3, 8, SEQ) == runs
    found = calibrate(profile, runs)
    np.testing.assert_allclose(np.array(found.sequence_extra), np.array(TRUE_SEQUENCE_EXTRA), rtol=0, atol=1e-11)
    np.testing.assert_allclose(np.array(found.unit_extra), np.array(TRUE_UNIT_EXTRA), rtol=0, atol=1e-11)
    wide = make_plan(1, 8, 8, SEQ)
    assert found.apply(profile).simulate("terapipe", 1, wide).makespan == pytest.approx(
        engine.simulate("terapipe", 1, wide).makespan, rel=1e-9)
    assert "stage 2 x1.12 + 0.0 ms + 3.0 ms/seq / x1.25 + 3.0 ms + 0.0 ms/seq" in found.describe()
    one = calibration_variants(1, SEQ, 64)
    assert list(one) == list(variants)[:3] and all(v["gradient_accumulation"] == 1 for v in one.values())
    assert list(calibration_variants(2, SEQ, 256)) == ["calibration: 1 slice(s)", "calibration: 1 slice(s) of 2"]
    with pytest.raises(ValueError, match="at least 1024"):
        calibration_variants(2, SEQ, 1024)


def test_the_rows_that_missed_the_first_calibration_are_named(fitted_recompute_model):
    path = str(fitted_recompute_model)
    with pytest.raises(ValueError, match="no calibration"):
        missed_predictions(path, [])
    store(path, Calibration(2, ((1.0, 1.0), (1.0, 1.0)), 0.05, 10))
    rows = [{"variant": "within", "predicted_s": 1.04, "s_per_iter": 1.0},
            {"variant": "ideal", "s_per_iter": 0.5}]  # rows without a prediction are not checked
    assert missed_predictions(path, rows) == []
    rows.append({"variant": "low", "predicted_s": 0.9, "s_per_iter": 1.0})
    assert missed_predictions(path, rows) == ["low"]
    second = [{**row, "predicted_s": 1.0} if "predicted_s" in row else dict(row) for row in rows]
    keep_first_predictions(rows, second)
    assert second[2]["first_calibration_predicted_s"] == 0.9
    assert second[2]["first_calibration_error"] == pytest.approx(-0.1, rel=1e-12)
    assert "first_calibration_predicted_s" not in second[1]
