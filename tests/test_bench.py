"""seqpipe-bench end to end on a tiny model: it runs, and its table and files say what ran.

Speed is not asserted here (benchmarks measure it); this checks the plumbing: profile -> fit ->
solve -> plan file -> timed launch under the deepspeed launcher (both schedules) -> measured iteration
(saved bytes, slice timestamps) -> ideal -> simulator predictions -> table/JSON/PNG.
"""
import json
import os
import subprocess
import sys

import pytest

from seqpipe_ds.planner.recompute import RECOMPUTE_MODES
from seqpipe_ds.schedules import SCHEDULES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(1200)
def test_bench_compares_stock_uniform_and_planned(tmp_path):
    png = tmp_path / "timeline.png"
    command = [sys.executable, "-m", "seqpipe_ds.cli.bench", "--num-layers", "2", "--hidden-size", "64",
               "--num-attention-heads", "4", "--seq-length", "128", "--granularity", "32", "--uniform", "2",
               "--profile-repeats", "1", "--warmup", "0", "--repeats", "2", "--timeout", "300",
               "--memory-limit", "1.0x",
               "--out", str(tmp_path), "--png", str(png)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "SEQPIPE_DIST_TIMEOUT_MIN": "3"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seqpipe = [f"{s} {v}" for s in SCHEDULES for v in ("uniform 2", "planned")] + ["makespan planned"]
    for name in ("stock DeepSpeed", *seqpipe, "ideal (1 process / 2)"):
        assert name in done.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["slice-1f1b uniform 2"]["slicing"] == "1x[64, 64]"
    assert rows["slice-1f1b uniform 2"]["schedule"] == "slice-1f1b"
    plan = json.loads((tmp_path / "dp_results.json").read_text())[0]
    assert rows["terapipe planned"]["slicing"] == " | ".join(
        f"{b}x{lengths}" for b, lengths in zip(plan["batch_slices"], plan["input_slices"]))
    searched = json.loads((tmp_path / "makespan_results.json").read_text())[0]
    assert rows["makespan planned"]["schedule"] == searched["schedule"]
    # The plans' recorded latencies are the first calibration's predictions. The timing launch also ran
    # the calibration's variants, traced and alternating with the timed ones (--recalibrate in-timing);
    # a second calibration fitted on them, into its own model file, predicts every row.
    assert rows["makespan planned"]["first_calibration_predicted_s"] == pytest.approx(searched["latency"], rel=1e-6)
    second = json.loads(open(result["recalibrated"]).read())["calibration"]
    assert second["units"] > 0 and second != json.loads((tmp_path / "latency_model.json").read_text())["calibration"]
    assert "calibrating again on the timing launch's" in done.stdout
    assert "predicted from the second calibration" in done.stdout
    timing = json.loads((tmp_path / "timing.json").read_text())
    calibration = json.loads((tmp_path / "timing.spec.json").read_text())["calibration"]
    assert calibration and set(timing["timed_traces"]) == set(calibration)
    for name in calibration:  # every traced iteration has each stage's step, from which its time is measured
        traced = timing["timed_traces"][name]
        assert all(sorted(row[0] for row in rows if row[1] == "STEP") == [0, 1] for rows in traced)
    assert all(len(timing["times"][name]) == 2 for name in calibration)  # alternated like the timed variants
    assert not set(calibration) & set(timing["saved_peak_bytes"])  # and left out of the measured iteration
    for name in ("stock DeepSpeed", *seqpipe):
        row = rows[name]
        assert row["first_calibration_error"] == pytest.approx(row["first_calibration_predicted_s"] /
                                                               row["s_per_iter"] - 1, rel=1e-9)
    assert "profile: " in done.stderr and "timing on 2 stage(s)" in done.stderr  # progress is shown
    assert "held-out relative error" in done.stdout and "adaptive profile:" in done.stdout  # the fit's error
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["vs_stock"] > 0
    for name in ("stock DeepSpeed", *seqpipe):
        row = rows[name]
        assert row["predicted_s"] > 0 and row["s_min"] <= row["s_per_iter"] <= row["s_max"]
        assert len(row["stage_peak_activation_mib"]) == len(row["stage_predicted_peak_activation_mib"]) == 2
        assert row["peak_activation_mib"] > 0 and row["predicted_peak_activation_mib"] > 0
    assert png.stat().st_size > 0
    # The calibration: factors per stage from the traced in-engine run, stored in the model file, used by
    # the plans (their recorded latency is the calibrated prediction) and printed beside the profile's.
    calibration = json.loads((tmp_path / "latency_model.json").read_text())["calibration"]
    assert calibration["stages"] == 2 and len(calibration["scale"]) == 2 and calibration["units"] > 0
    assert all(f > 0 and b > 0 for f, b in calibration["scale"]) and calibration["residual"] >= 0
    for term in ("unit_extra", "sequence_extra"):
        assert calibration[term] == [] or (len(calibration[term]) == 2 and
                                           all(f >= 0 and b >= 0 for f, b in calibration[term]))
    assert "engine over profile per unit, forward / backward: stage 0 x" in done.stdout
    for name in ("stock DeepSpeed", *seqpipe):
        assert rows[name]["profile_only_error"] is not None
    # --memory-limit 1.0x (stock's own need): both sides' picks timed in the same run, with their peaks and what
    # they gave up.
    budget = result["budget"]
    assert "stock's fastest configuration without recomputation is predicted to need" in done.stdout
    for side in ("stock", "seqpipe"):
        row = budget[side]
        assert row["predicted_peak_mib"] <= budget["limit_mib"] + 1e-9 and row["recompute"] in RECOMPUTE_MODES
        assert row["peak_mib"] > 0 and row["gave_up"] and row["s_per_iter"] > 0 and row["predicted_s"] > 0
    assert "|" not in budget["stock"]["slicing"] and "x[128]" in budget["stock"]["slicing"]  # unsliced micro-batches
    assert f"Within {budget['limit_mib']:.0f} MiB per stage" in done.stdout
