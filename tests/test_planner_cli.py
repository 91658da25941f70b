"""``seqpipe-plan`` end to end: a synthetic profile through fit, solve and show, and a tiny real
profile of the model's layers (TP=2 on two processes, with the p2p ping-pong)."""
import json
import re

import numpy as np
import pytest

import launcher
from seqpipe_ds.cli.plan import main
from seqpipe_ds.planner import find_plan, fit_profile, solve
from test_planner_fit import synthetic_profile


@pytest.fixture
def model_file(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(synthetic_profile(noise=0.0)))
    out = tmp_path / "model.json"
    assert main(["fit", str(profile), "--out", str(out), "--grid-out", str(tmp_path / "grid.npy")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"held-out relative error on \d+ points: mean \d\.\d\d%", printed)
    assert "context term: 0.0002 + 1e-06*b*l + 3e-06*b*c + 4e-08*b*l*c" in printed
    assert np.load(tmp_path / "grid.npy").shape == (3, 33, 33)
    return out


@pytest.mark.timeout(120)
def test_fit_solve_show(tmp_path, model_file, capsys):
    plans = tmp_path / "dp_results.json"
    assert main(["solve", str(model_file), "--num-stages", "4", "--plan-file", str(plans), "--dp", "2",
                 "--model-name", "synthetic-gpt", "--objective", "dp"]) == 0
    printed = capsys.readouterr().out
    latency = float(re.search(r"predicted iteration: ([\d.e-]+) s", printed).group(1))
    # The CLI's plan is the API's plan on the fitted grid, with the profiled update time.
    grid = np.load(tmp_path / "grid.npy")
    assert latency == pytest.approx(solve(grid, 2, 256, 4, 8, update_time=3e-3).latency, rel=1e-5)
    entry = find_plan(str(plans), model={"num_layers": 8, "hidden_size": 64, "num_attention_heads": 4,
                                         "vocab_size": 128}, micro_batch_size=2, tp=1, pp=4, dp=2, seq_length=256)
    assert entry.device == "synthetic" and entry.model["name"] == "synthetic-gpt"

    png = tmp_path / "plan.png"
    assert main(["show", str(plans), "--latency-model", str(model_file), "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "stage   3: 0.0.0F " in printed and " STEP " in printed
    makespan = float(re.search(r"timeline makespan: ([\d.e-]+) s", printed).group(1))
    assert makespan == pytest.approx(latency, rel=1e-5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(120)
def test_show_lists_plans_and_reports_errors(tmp_path, model_file, capsys):
    plans = tmp_path / "dp_results.json"
    for stages in ("2", "4"):
        main(["solve", str(model_file), "--num-stages", stages, "--plan-file", str(plans)])
    capsys.readouterr()
    assert main(["show", str(plans)]) == 0
    printed = capsys.readouterr().out
    assert "2 plans (choose one with --index)" in printed and "[1] model num_layers=8" in printed
    assert main(["show", str(plans), "--index", "5"]) == 1
    assert "--index 5 is out of range" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "missing.json")]) == 1
    assert "does not exist" in capsys.readouterr().err


def profile_with_cli(out):
    main(["profile", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--vocab-size", "64",
          "--seq-length", "32", "--micro-batch-size", "1", "--tp", "2", "--length-stride", "2",
          "--context-samples", "5", "--warmup", "1", "--repeats", "2", "--p2p-sizes", "1024", "65536", "--quiet",
          "--out", out])


@pytest.mark.timeout(240)
def test_profile_tiny_model_with_tp2_and_p2p(tmp_path):
    out = tmp_path / "profile.json"
    launcher.run(profile_with_cli, 2, out=str(out))
    profile = json.loads(out.read_text())
    assert profile["device"].startswith("cpu") and profile["torch_version"]
    assert profile["config"]["tp"] == 2 and profile["config"]["dtype_bytes"] == 4
    shapes = [(r["b"], r["l"], r["c"]) for r in profile["compute"]]
    assert shapes[:3] == [(1, 8, 0), (1, 24, 0), (1, 32, 0)]  # every 2nd length, and the full sequence
    assert len(shapes) == 8 and all(c > 0 and l + c <= 32 for _, l, c in shapes[3:])
    assert all(r["time"] > 0 and len(r["samples"]) == 2 for r in profile["compute"])
    assert [r["bytes"] for r in profile["p2p"]] == [1024, 65536] and all(r["time"] > 0 for r in profile["p2p"])
    assert profile["optimizer_step"] > 0
    # Every recomputation mode beside the plain stage at half and the whole sequence, and half after half.
    assert sorted((r["recompute"], r["l"], r["c"]) for r in profile["recompute"]) == sorted(
        (mode, l, c) for mode in ("none", "selective", "full") for l, c in ((16, 0), (32, 0), (16, 16)))
    assert set(profile["recompute_bytes"]) == {"none", "selective", "full"}
    full = profile["recompute_bytes"]["full"]
    assert full["kept"]["middle"] < profile["saved_bytes_per_token"]["middle"] and full["transient"]["middle"] > 0
    report = fit_profile(profile)  # real, noisy timings: the fit must run, not be accurate
    assert np.isfinite(report.model.grid(1, 32, 8)[1, 1:, 0]).all()
    assert set(report.model.recompute_extra) == {"selective", "full"}


@pytest.mark.timeout(120)
def test_solve_under_sequence_parallelism_keeps_slices_divisible_by_tp(tmp_path, capsys):
    profile = synthetic_profile(noise=0.0)
    profile["config"]["tp"] = 2
    path, model = tmp_path / "profile.json", tmp_path / "model.json"
    path.write_text(json.dumps(profile))
    assert main(["fit", str(path), "--out", str(model)]) == 0
    plans = tmp_path / "dp_results.json"
    assert main(["solve", str(model), "--num-stages", "2", "--sequence-parallel", "--plan-file", str(plans)]) == 0
    entry = json.loads(plans.read_text())[0]
    assert all(length % 2 == 0 for lengths in entry["input_slices"] for length in lengths)
    capsys.readouterr()
    assert main(["solve", str(model), "--num-stages", "2", "--sequence-parallel", "--granularity", "4"]) == 0
    assert main(["solve", str(model), "--num-stages", "2", "--sequence-parallel", "--granularity", "3"]) == 1
    assert "granularity 3 must be a multiple of 2" in capsys.readouterr().err
    profile["config"]["tp"] = 1
    path.write_text(json.dumps(profile))
    assert main(["fit", str(path), "--out", str(model)]) == 0
    assert main(["solve", str(model), "--num-stages", "2", "--sequence-parallel"]) == 1
    assert "needs tensor parallelism" in capsys.readouterr().err

