"""In-engine calibration: per stage, how much longer a unit runs inside DeepSpeed's engine than the
profile timed it.

Why: the profile times one stage's layers alone, in a loop. Inside the engine the same forward and
backward run longer: on the issue's Xeon every unit by 20-25%, on a later Xeon 0-8% on the first
stage and 10-25% on the last (``benchmarks/bench_engine_overhead.py`` measures it, wall and CPU time
side by side). So predictions from the profile alone were 14-29% low. What the engine adds is
compute, not waiting (a unit's CPU time is its wall time), and it differs by stage and by direction,
so it is measured where it happens: a short in-engine run of a few candidate slicings records every
unit's forward and backward in each timed iteration (``SeqPipeEngine.slice_trace``). A unit's time is
its median over those iterations, so a slowdown of the host during fewer than half of them does not
move the fit (the 2-core EPYC switches between two speeds within seconds). Per stage and direction a
unit's measured time is then fitted as ``factor * model time + seconds per unit + sequences * seconds
per sequence`` (non-negative least squares over the traced units). The extra seconds are what the
engine costs beyond a unit's size (on the 2-core EPYC about 25 ms per forward of one sequence, against
a 128-token forward of 70-80 ms: a factor alone, fitted on 1 and 4 slices, priced 8-slice forwards
23-31% low while pricing 4 slices right). They grow with the unit's sequences: at batch 8 a unit of 8
sequences x 128 tokens ran 1.5x its profiled time, and over that run's units a per-sequence term fits
(factors 1.0-1.16, 8-39 ms per sequence) where a per-unit one comes out zero; so where the traced
units have more than one number of sequences (``seqpipe-bench`` traces a micro-batch of the whole
batch too) the data chooses between the two. Where the traced units have one size only, the factor
alone (measured over modelled seconds) is used. A step
also spends time outside its units. Some is the same for every slicing (the optimizer step beyond
the profiled one, the tied-embedding all-reduce, barriers: 0.1-0.2 s per step on the Xeon at the
default GPT): ``step_extra``, added to each stage's step; the engine traces its step too, and where
the traces have it, the fit keeps at least that (``measured_step``). Some comes with every instruction
(the engine's loop, receive buffers, the sends' bookkeeping around each forward and backward): ``gap``,
charged by the simulator around each F and B. At batch 8 on the 2-core EPYC a per-step constant
alone priced the 128-units-per-stage runs 10-11% low while pricing 16 units right. Both terms fitted
from the steps (``_step_terms``, the seconds per step at least the measured step; the calibration
runs have 2-16 units per stage), refitted on that
bench's second calibration, priced all 13 timed runs within +0.5% to +6.8%; on its first, made while the
host apparently ran faster than during the timed runs, -18% to -4%
(``benchmarks/results/bench_b8_gap_refit_epyc.txt``).
``CostModel.scale``, ``unit_extra``, ``sequence_extra``, ``gap`` and ``step`` carry them; a latency
model file keeps them (``calibration``), so that every path pricing a plan on that many stages uses
them.

The stated error of a calibration is how far its own runs stay from the calibrated model
(``residual``: the largest relative deviation of a run's step time or of its summed units on one
stage); a held-out run is expected within it.
"""
import json
import os
import tempfile
import statistics
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import lsq_linear, nnls

from ..schedules.actions import BACKWARD, FORWARD, STEP
from ..slicing import SlicePlan
from .costs import CostModel

# A traced unit as seqpipe_ds.benchmark records it: [stage, kind ("F"/"B"), micro-batch, batch slice,
# sequence slice, start, end] (seconds).
TraceRow = Sequence


class Run(NamedTuple):
    """One traced in-engine run: what ran, the units' trace of each timed iteration, their step times."""
    schedule: str
    plan: SlicePlan  # of one micro-batch
    micro_batches: int
    traces: Sequence[Sequence[TraceRow]]  # per iteration
    step_times: Sequence[float]


@dataclass(frozen=True)
class Calibration:
    stages: int
    scale: Tuple[Tuple[float, float], ...]  # per stage (forward, backward) factor
    residual: float  # the stated error: largest relative deviation of a run's step time after calibrating
    units: int  # traced unit timings it rests on (units x iterations)
    step_extra: float = 0.0  # seconds per step outside the units, added to each stage's step
    unit_extra: Tuple[Tuple[float, float], ...] = ()  # per stage (forward, backward) seconds per unit; (): none
    sequence_extra: Tuple[Tuple[float, float], ...] = ()  # the same per sequence of a unit; (): none
    gap: float = 0.0  # seconds around every forward and backward instruction, outside the traced units

    def apply(self, costs: CostModel) -> CostModel:
        """``costs`` with the factors, the seconds per unit and per sequence, and the step's extra time."""
        return replace(costs, scale=self.scale, unit_extra=self.unit_extra or None,
                       sequence_extra=self.sequence_extra or None, gap=self.gap, step=costs.step + self.step_extra)

    def describe(self) -> str:
        """Per stage the fitted terms, forward / backward, the step's extra time and the stated error."""
        none = ((0.0, 0.0),) * self.stages
        terms = ", ".join(f"stage {s} x{f:.2f} + {1e3 * ef:.1f} ms + {1e3 * qf:.1f} ms/seq / x{b:.2f} + "
                          f"{1e3 * eb:.1f} ms + {1e3 * qb:.1f} ms/seq"
                          for s, ((f, b), (ef, eb), (qf, qb)) in enumerate(zip(
                              self.scale, self.unit_extra or none, self.sequence_extra or none)))
        return (f"{terms}; outside the units {self.step_extra:.3f} s per step and {1e3 * self.gap:.1f} ms "
                f"around each forward and backward (stated error {self.residual:.1%})")

    def to_dict(self) -> Dict:
        return {"stages": self.stages, "scale": [list(pair) for pair in self.scale], "residual": self.residual,
                "units": self.units, "step_extra": self.step_extra,
                "unit_extra": [list(pair) for pair in self.unit_extra],
                "sequence_extra": [list(pair) for pair in self.sequence_extra], "gap": self.gap}

    @classmethod
    def from_dict(cls, data: Dict) -> "Calibration":
        def pairs(key):
            return tuple((float(f), float(b)) for f, b in data.get(key, ()))
        return cls(int(data["stages"]), pairs("scale"), float(data["residual"]), int(data["units"]),
                   float(data.get("step_extra", 0.0)), pairs("unit_extra"), pairs("sequence_extra"),
                   float(data.get("gap", 0.0)))


def _units(costs: CostModel, runs: Iterable[Run]):
    """Per run: {(stage, forward?): [(measured seconds, model seconds, sequences), ...]} over its units,
    a unit's measured seconds the median over the run's traced iterations."""
    per_run = []
    for _, plan, _, traces, _ in runs:
        model = costs.unit_times(plan)
        durations: Dict[Tuple, List[float]] = {}
        for trace in traces:
            for stage, kind, m, b, s, start, end in trace:
                if kind in (FORWARD, BACKWARD):
                    durations.setdefault((int(stage), kind, int(m), int(b), int(s)), []).append(end - start)
        units: Dict[Tuple[int, bool], List[Tuple[float, float, int]]] = {}
        for (stage, kind, _, b, s), seconds in durations.items():
            forward = kind == FORWARD
            units.setdefault((stage, forward), []).append(
                (statistics.median(seconds), model[stage, (b, s)][0 if forward else 1], plan.shape((b, s))[0]))
        per_run.append(units)
    return per_run


def _affine(units: Sequence[Tuple[float, float, int]]) -> Tuple[float, float, float]:
    """(factor, seconds per unit, seconds per sequence) >= 0 with measured ~ factor * model + seconds
    + sequences * seconds, by non-negative least squares over the terms the units tell apart: the
    factor alone where they have one modelled size, no per-sequence term where they have one number
    of sequences (it would be the per-unit term again).

    Each unit's residual counts relative to its measured time, as every prediction is judged: with
    absolute residuals the longest units decide the fit. Measured on the 2-core Xeon (2026-12-04):
    the whole-batch variant's units (8 sequences x 128 tokens) ran their backward 6-9% slower in the
    timing launch than in their own launch while one-sequence units moved 0-4%, and the absolute fit
    raised every backward by a factor of x1.15 instead of x1.03, pricing batch 8 up to 13% high; the
    relative fit of the same units prices it -0.1% to +8.4%."""
    measured, model, sequences = (np.array(column, dtype=float) for column in zip(*units))
    if np.ptp(model) <= 1e-9 * model.max():
        return float(measured.sum() / model.sum()), 0.0, 0.0
    columns = [model, np.ones_like(model)] + ([sequences] if np.ptp(sequences) > 0 else [])
    weights = 1.0 / np.maximum(measured, np.finfo(float).tiny)
    found, _ = nnls(np.stack(columns, axis=1) * weights[:, None], measured * weights)
    if found[0] <= 0:
        return float(measured.sum() / model.sum()), 0.0, 0.0
    factor, extra, per_sequence = (*found, 0.0)[:3]
    return float(factor), float(extra), float(per_sequence)


def calibrate(costs: CostModel, runs: Sequence[Run]) -> Calibration:
    """Factors, seconds per unit and per sequence, and the step's extra time of ``costs``
    (uncalibrated) from traced in-engine runs."""
    if costs.scale is not None or costs.unit_extra is not None or costs.sequence_extra is not None:
        raise ValueError("calibrate a cost model without a calibration (CostModel.scale, unit_extra or "
                         "sequence_extra is already set)")
    per_run = _units(costs, runs)
    fitted = {}
    for stage in range(costs.stages):
        for forward in (True, False):
            units = [unit for run in per_run for unit in run.get((stage, forward), ())]
            if not units or sum(model for _, model, _ in units) <= 0:
                raise ValueError(f"the calibration runs traced no {'forward' if forward else 'backward'} on stage "
                                 f"{stage}")
            fitted[stage, forward] = _affine(units)

    def term(i):
        found = tuple((fitted[s, True][i], fitted[s, False][i]) for s in range(costs.stages))
        return found if i == 0 or any(v for pair in found for v in pair) else ()
    scale, unit_extra, sequence_extra = term(0), term(1), term(2)
    calibrated = replace(costs, scale=scale, unit_extra=unit_extra or None, sequence_extra=sequence_extra or None)
    measured = [statistics.median(run.step_times) for run in runs]
    step = measured_step(runs)
    extra, gap, simulated = _step_terms(calibrated, runs, measured,
                                        None if step is None else max(0.0, step - costs.step))
    # The stated error: the worse of how far a run's step and a run's summed units on one stage stay off.
    steps = max(abs((s + extra) / m - 1) for m, s in zip(measured, simulated))

    def predicted(stage, forward, model, sequences):
        factor, per_unit, per_sequence = fitted[stage, forward]
        return factor * model + per_unit + sequences * per_sequence
    units = max(abs(sum(m for k in run if k[0] == stage for m, _, _ in run[k]) /
                    sum(predicted(*k, model, b) for k in run if k[0] == stage for _, model, b in run[k]) - 1)
                for run in per_run for stage in {k[0] for k in run})
    residual = max(steps, units)
    return Calibration(costs.stages, scale, residual, sum(len(trace) for run in runs for trace in run.traces), extra,
                       unit_extra, sequence_extra, gap)


GAP_STEP = 1e-3  # seconds: the trial gap whose effect on a simulated step gives the step's slope in the gap


def measured_step(runs: Sequence[Run]) -> Optional[float]:
    """The step's seconds as the engine ran it, or None where the traces have no STEP rows: per
    iteration, from the start of the last stage's STEP (the tied-gradient and data-parallel reductions
    and the optimizer step; a stage that gets there earlier waits in its reductions for that one) to
    the end of the iteration (what DeepSpeed's train_batch does after the schedule, such as the loss's
    broadcast, included), which is what the simulator charges as the step. The median over every
    run's iterations, as all slicings step the same parameters. (Trace rows and step times both count
    from the iteration's start.)

    Why measured: fitted from the step times alone, the step's time and the gap trade off against each
    other over a few calibration runs; on the 2-core Xeon (2026-12-04) the fit put 0 s into the step
    and 2 ms into the gap, while the step took 45 ms (the profiled optimizer step: 21 ms), and the
    slice-zb rows were priced 5-11% low. It is a lower bound of the fitted seconds per step, not all
    of them: at batch 8 the same Xeon's steps hold 0.15-0.23 s that the simulator places nowhere
    (the traced step: 26 ms); forced into the gap alone they priced 8-slice rows up to 31% high."""
    durations = []
    for run in runs:
        for trace, step_time in zip(run.traces, run.step_times):
            starts = [start for _, kind, *_, start, _ in trace if kind == STEP]
            if starts:
                durations.append(step_time - max(starts))
    return float(np.median(durations)) if durations else None


def _step_terms(calibrated: CostModel, runs: Sequence[Run], measured: Sequence[float],
                least: Optional[float] = None) -> Tuple[float, float, np.ndarray]:
    """(seconds per step, seconds of gap around every F and B, the runs' simulated steps with that gap)
    that make the simulated steps of the calibrated units meet the measured ones, by least squares
    with both >= 0, and the seconds per step >= ``least`` (what the engine's traced step measured
    beyond the profiled one): the step takes at least that, and what the simulator leaves out
    elsewhere in a step may add to it. A simulated step is piecewise linear in the gap (the longest
    path's number of instructions times it), so the fit is Gauss-Newton: linearized at the current
    gap by the slope over ``GAP_STEP``, refitted until it stays. Where the runs cannot tell the two
    apart (one run, or steps of one slope): with ``least`` the seconds per step are that and the gap
    alone is fitted; without it the gap is 0 and the seconds per step the median residual, as the
    host's one slow run moves a median least."""
    def steps(gap):
        return np.array([replace(calibrated, gap=gap).simulate(run.schedule, run.micro_batches, run.plan).makespan
                         for run in runs])
    measured = np.array(measured, dtype=float)
    at_zero = steps(0.0)
    slopes = (steps(GAP_STEP) - at_zero) / GAP_STEP
    apart = len(runs) >= 2 and np.ptp(slopes) > 1e-9 * max(1.0, slopes.max())
    if not apart and least is None:
        return max(0.0, float(np.median(measured - at_zero))), 0.0, at_zero
    gap, at_gap, extra = 0.0, at_zero, least or 0.0
    for _ in range(8):
        target = measured - at_gap + slopes * gap
        if apart:
            extra, fitted = lsq_linear(np.stack([np.ones_like(slopes), slopes], axis=1), target,
                                       bounds=([least or 0.0, 0.0], [np.inf, np.inf]), method="bvls").x
        else:
            fitted = max(0.0, float(slopes @ (target - extra) / (slopes @ slopes))) if slopes @ slopes > 0 else 0.0
        moved, gap = abs(float(fitted) - gap), float(fitted)
        if moved <= 1e-12:
            break
        at_gap = steps(gap)
        slopes = (steps(gap + GAP_STEP) - at_gap) / GAP_STEP
    return float(extra), gap, at_gap


def misses(calibration: Calibration, held_out: Mapping[str, Tuple[float, float]]) -> List[str]:
    """The held-out runs, {name: (predicted, measured) step seconds}, whose prediction misses by more
    than the calibration's stated error."""
    return [name for name, (predicted, measured) in held_out.items()
            if abs(predicted / measured - 1) > calibration.residual]


def store(model_file: str, calibration: Calibration) -> None:
    """Records the calibration in a latency model file (``seqpipe-plan fit``'s), replacing any earlier one."""
    with open(model_file) as f:
        data = json.load(f)
    data["calibration"] = calibration.to_dict()
    _write(model_file, data)


def uncalibrated_copy(model_file: str, target: str) -> None:
    """``model_file`` without its calibration, at ``target`` (to be calibrated afresh)."""
    with open(model_file) as f:
        data = json.load(f)
    data.pop("calibration", None)
    _write(target, data)


def _write(path: str, data: Dict) -> None:
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(temporary, path)  # never a half-written model file
