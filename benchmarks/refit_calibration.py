"""Refits a finished ``seqpipe-bench`` run's calibration with the current ``calibrate()`` and prices
its timed runs again, beside what they measured: how a change to the calibration's terms would have
predicted a run already made, without timing it again.

    python benchmarks/refit_calibration.py OUT [STEM]

OUT is the bench's ``--out`` folder (its ``latency_model.json``, ``timing.spec.json``/``timing.json``
and the launch whose traced calibration variants are refitted, ``STEM.spec.json``/``STEM.json``: STEM
``calibration`` for the first one, ``timing`` for the second, which the timing launch runs beside
the timed variants; ``recalibration`` in runs made before 2026-12-03's change, when the second
calibration was a launch of its own). The held-out runs are the bench's timed ones: none of them is
among the calibration's.
"""
import argparse
import json
import os
import statistics
from dataclasses import replace

from seqpipe_ds.planner.calibrate import calibrate
from seqpipe_ds.planner.fit import read_model_file
from seqpipe_ds.planner.planning import calibration_runs, cost_model, predict_run, variant_plan
from seqpipe_ds.planner.recompute import mode_of


def _load(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("stem", nargs="?", default="calibration")
    args = parser.parse_args()
    spec, traced = _load(args.out, f"{args.stem}.spec.json"), _load(args.out, f"{args.stem}.json")
    timed_spec, timed = _load(args.out, "timing.spec.json"), _load(args.out, "timing.json")
    config = _load(args.out, "bench.json")["config"]
    if config.get("documents"):
        raise SystemExit("a bench of packed documents prices its runs with the documents' attention: not refitted here")
    stages, batch_size, seq_length = spec["stages"], config["batch_size"], config["seq_length"]
    uncalibrated = replace(read_model_file(os.path.join(args.out, "latency_model.json")), calibration=None)
    # Launches made before 2026-12-03's change name their calibration variants "variants".
    variants = spec.get("calibration") or spec["variants"]
    runs = calibration_runs(variants, traced, stages, batch_size, seq_length)
    calibration = calibrate(cost_model(uncalibrated, stages), runs)
    found = replace(uncalibrated, calibration=calibration.to_dict())
    print(f"refitted {args.stem} of {args.out}: {calibration.describe()}")
    errors = []
    for name, variant in timed_spec["variants"].items():
        schedule, plan, micro_batches = variant_plan(variant, stages, batch_size, seq_length)
        predicted = predict_run(found, stages, schedule, micro_batches, plan, timed["saved_bytes_per_token"],
                                mode_of(variant["recompute"]), None, timed.get("weight_bytes_per_token")).makespan
        measured = statistics.median(timed["times"][name])
        errors.append(predicted / measured - 1)
        print(f"{name:<28} predicted {predicted:7.3f} s  measured {measured:7.3f} s  {errors[-1]:+6.1%}")
    print(f"errors {min(errors):+.1%} to {max(errors):+.1%}; within the stated error "
          f"({calibration.residual:.1%}): {sum(abs(e) <= calibration.residual for e in errors)} of {len(errors)}; "
          f"within 10%: {sum(abs(e) <= 0.10 for e in errors)} of {len(errors)}")


if __name__ == "__main__":
    main()
