"""In-engine calibration: per stage, how much longer a unit runs inside DeepSpeed's engine than the
profile timed it.

Why: the profile times one stage's layers alone, in a loop. Inside the engine the same forward and
backward run longer: on the issue's Xeon every unit by 20-25%, on a later Xeon 0-8% on the first
stage and 10-25% on the last (``benchmarks/bench_engine_overhead.py`` measures it, wall and CPU time
side by side). So predictions from the profile alone were 14-29% low. What the engine adds is
compute, not waiting (a unit's CPU time is its wall time), and it differs by stage and by direction,
so it is measured where it happens: a short in-engine run of a few candidate slicings records every
unit's forward and backward (``SeqPipeEngine.slice_trace``), and per stage and direction a unit's
measured time is fitted as ``factor * model time + seconds per unit`` (non-negative least squares
over the traced units). The per-unit seconds are what every call costs whatever its size (on the
2-core EPYC about 25 ms per forward, against a 128-token forward of 70-80 ms: a factor alone, fitted
on 1 and 4 slices, priced 8-slice forwards 23-31% low while pricing 4 slices right); where the
traced units have one size only, the factor alone (measured over modelled seconds) is used. A step
also spends time outside its units (the optimizer step beyond the profiled one, the tied-embedding
all-reduce, loads, barriers: 0.1-0.2 s per step on the Xeon at the default GPT), the same for every slicing, so after the units
the median of (measured step - simulated step) over the runs is added to each stage's step
(``step_extra``, >= 0). ``CostModel.scale``, ``CostModel.unit_extra`` and ``CostModel.step`` carry
them; a latency model file keeps them (``calibration``), so that every path pricing a plan on that
many stages uses them.

The stated error of a calibration is how far its own runs stay from the calibrated model
(``residual``: the largest relative deviation of a run's step time or of its summed units on one
stage); a held-out run is expected within it.
"""
import json
import os
import tempfile
import statistics
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, NamedTuple, Sequence, Tuple

import numpy as np
from scipy.optimize import nnls

from ..schedules.actions import FORWARD
from ..slicing import SlicePlan
from .costs import CostModel

# A traced unit as seqpipe_ds.benchmark records it: [stage, kind ("F"/"B"), micro-batch, batch slice,
# sequence slice, start, end] (seconds).
TraceRow = Sequence


class Run(NamedTuple):
    """One traced in-engine run: what ran, the units' trace of one iteration, its step times."""
    schedule: str
    plan: SlicePlan  # of one micro-batch
    micro_batches: int
    trace: Sequence[TraceRow]
    step_times: Sequence[float]


@dataclass(frozen=True)
class Calibration:
    stages: int
    scale: Tuple[Tuple[float, float], ...]  # per stage (forward, backward) factor
    residual: float  # the stated error: largest relative deviation of a run's step time after calibrating
    units: int  # traced units it rests on
    step_extra: float = 0.0  # seconds per step outside the units, added to each stage's step
    unit_extra: Tuple[Tuple[float, float], ...] = ()  # per stage (forward, backward) seconds per unit; (): none

    def apply(self, costs: CostModel) -> CostModel:
        """``costs`` with the factors, the seconds per unit and the step's extra time."""
        return replace(costs, scale=self.scale, unit_extra=self.unit_extra or None, step=costs.step + self.step_extra)

    def to_dict(self) -> Dict:
        return {"stages": self.stages, "scale": [list(pair) for pair in self.scale], "residual": self.residual,
                "units": self.units, "step_extra": self.step_extra,
                "unit_extra": [list(pair) for pair in self.unit_extra]}

    @classmethod
    def from_dict(cls, data: Dict) -> "Calibration":
        return cls(int(data["stages"]), tuple((float(f), float(b)) for f, b in data["scale"]),
                   float(data["residual"]), int(data["units"]), float(data.get("step_extra", 0.0)),
                   tuple((float(f), float(b)) for f, b in data.get("unit_extra", ())))


def _units(costs: CostModel, runs: Iterable[Run]):
    """Per run: {(stage, forward?): [(measured seconds, model seconds), ...]} over its traced units."""
    per_run = []
    for _, plan, _, trace, _ in runs:
        model = costs.unit_times(plan)
        units: Dict[Tuple[int, bool], List[Tuple[float, float]]] = {}
        for stage, kind, _, b, s, start, end in trace:
            forward = kind == FORWARD
            units.setdefault((int(stage), forward), []).append(
                (end - start, model[int(stage), (int(b), int(s))][0 if forward else 1]))
        per_run.append(units)
    return per_run


def _affine(pairs: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """(factor, seconds per unit) >= 0 with measured ~ factor * model + seconds, by least squares;
    the factor alone (measured over modelled seconds) where the units have one modelled size."""
    measured, model = (np.array(column, dtype=float) for column in zip(*pairs))
    if np.ptp(model) <= 1e-9 * model.max():
        return float(measured.sum() / model.sum()), 0.0
    (factor, extra), _ = nnls(np.stack([model, np.ones_like(model)], axis=1), measured)
    if factor <= 0:
        return float(measured.sum() / model.sum()), 0.0
    return float(factor), float(extra)


def calibrate(costs: CostModel, runs: Sequence[Run]) -> Calibration:
    """Factors, seconds per unit and the step's extra time of ``costs`` (uncalibrated) from traced
    in-engine runs."""
    if costs.scale is not None or costs.unit_extra is not None:
        raise ValueError("calibrate a cost model without a calibration (CostModel.scale or unit_extra is already set)")
    per_run = _units(costs, runs)
    fitted = {}
    for stage in range(costs.stages):
        for forward in (True, False):
            pairs = [pair for run in per_run for pair in run.get((stage, forward), ())]
            if not pairs or sum(model for _, model in pairs) <= 0:
                raise ValueError(f"the calibration runs traced no {'forward' if forward else 'backward'} on stage "
                                 f"{stage}")
            fitted[stage, forward] = _affine(pairs)
    scale = tuple((fitted[s, True][0], fitted[s, False][0]) for s in range(costs.stages))
    unit_extra = tuple((fitted[s, True][1], fitted[s, False][1]) for s in range(costs.stages))
    calibrated = replace(costs, scale=scale, unit_extra=unit_extra)
    simulated = [calibrated.simulate(run.schedule, run.micro_batches, run.plan).makespan for run in runs]
    measured = [statistics.median(run.step_times) for run in runs]
    extra = max(0.0, statistics.median(m - s for m, s in zip(measured, simulated)))
    # The stated error: the worse of how far a run's step and a run's summed units on one stage stay off.
    steps = max(abs((s + extra) / m - 1) for m, s in zip(measured, simulated))

    def predicted(stage, forward, model):
        return fitted[stage, forward][0] * model + fitted[stage, forward][1]
    units = max(abs(sum(m for k in run if k[0] == stage for m, _ in run[k]) /
                    sum(predicted(*k, model) for k in run if k[0] == stage for _, model in run[k]) - 1)
                for run in per_run for stage in {k[0] for k in run})
    residual = max(steps, units)
    return Calibration(costs.stages, scale, residual, sum(len(run.trace) for run in runs), extra,
                       unit_extra if any(v for pair in unit_extra for v in pair) else ())


def store(model_file: str, calibration: Calibration) -> None:
    """Records the calibration in a latency model file (``seqpipe-plan fit``'s), replacing any earlier one."""
    with open(model_file) as f:
        data = json.load(f)
    data["calibration"] = calibration.to_dict()
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(model_file)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(temporary, model_file)  # never a half-written model file
