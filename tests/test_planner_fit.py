"""The latency model: recovers known coefficients from noisy synthetic profiles, checks itself
on held-out points, and produces the solver's grid."""
import numpy as np
import pytest

from seqpipe_ds.planner import LatencyModel, fit_profile
from seqpipe_ds.planner.fit import read_model_file, write_model_file

TRUE_CONTEXT = [2e-4, 1e-6, 3e-6, 4e-8]  # a0, a1*b*l, a2*b*c, a3*b*l*c
TRUE_SEND = [1e-5, 1e-9]  # latency, seconds per byte
HIDDEN = 64


def true_no_context(b, l):
    return 1e-3 + 2e-5 * b * l + 1e-8 * b * l * l


def true_compute(b, l, c):
    a0, a1, a2, a3 = TRUE_CONTEXT
    return true_no_context(b, l) + (c > 0) * (a0 + a1 * b * l + a2 * b * c + a3 * b * l * c)


def synthetic_profile(noise=0.005, seed=0, seq_length=256, granularity=8, batch=2, context_samples=200,
                      length_stride=1):
    """A profile as ``seqpipe-plan profile`` writes it, from known times with relative noise."""
    rng = np.random.default_rng(seed)
    units = seq_length // granularity
    points = [(b, granularity * u, 0) for b in range(1, batch + 1)
              for u in sorted(set(range(1, units + 1, length_stride)) | {units})]
    for _ in range(context_samples):
        lu = int(rng.integers(1, units))
        points.append((int(rng.integers(1, batch + 1)), granularity * lu,
                       granularity * int(rng.integers(1, units - lu + 1))))
    noisy = lambda t: float(t * (1 + noise * rng.standard_normal()))  # noqa: E731
    sizes = [1024 * 4 ** i for i in range(8)]
    return {"format": "seqpipe-profile/1", "device": "synthetic", "torch_version": "none",
            "config": {"num_layers": 2, "hidden_size": HIDDEN, "num_attention_heads": 4, "vocab_size": 128,
                       "seq_length": seq_length, "micro_batch_size": batch, "tp": 1, "granularity": granularity,
                       "dtype_bytes": 4},
            "compute": [{"b": b, "l": l, "c": c, "time": noisy(true_compute(b, l, c))} for b, l, c in points],
            "p2p": [{"bytes": s, "time": noisy(TRUE_SEND[0] + TRUE_SEND[1] * s)} for s in sizes],
            "optimizer_step": 3e-3}


@pytest.mark.timeout(60)
def test_exact_data_gives_exact_coefficients():
    report = fit_profile(synthetic_profile(noise=0.0))
    assert report.model.context_coef == pytest.approx(TRUE_CONTEXT, rel=1e-6)
    assert report.model.send_coef == pytest.approx(TRUE_SEND, rel=1e-6)
    assert report.model.update_time == 3e-3
    # Held-out no-context points are interpolated between their neighbours: t0 is quadratic in l.
    assert report.heldout_max_error < 0.01


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("stride", [1, 4])
def test_noisy_data_recovers_coefficients_and_reports_heldout_error(seed, stride):
    report = fit_profile(synthetic_profile(noise=0.005, seed=seed, length_stride=stride), seed=seed)
    assert report.model.context_coef == pytest.approx(TRUE_CONTEXT, rel=0.1)
    assert report.model.send_coef == pytest.approx(TRUE_SEND, rel=0.05)
    assert report.heldout_points > 30
    # 0.5% noise: the paper's < 2% held-out error must hold on average, and no point be far off.
    assert report.heldout_mean_error < 0.02
    assert report.heldout_max_error < 0.05
    assert report.send_error < 0.02


@pytest.mark.timeout(60)
def test_heldout_error_detects_a_wrong_model():
    # Context cost quadratic in c: the linear context term cannot follow it.
    profile = synthetic_profile(noise=0.0)
    for row in profile["compute"]:
        row["time"] += 5e-6 * row["c"] ** 2 / 8
    assert fit_profile(profile).heldout_max_error > 0.05


@pytest.mark.timeout(60)
def test_grid_matches_predictions_and_marks_disallowed_slices():
    model = fit_profile(synthetic_profile(noise=0.0)).model
    grid = model.grid(batch_size=2, seq_len=256, granularity=8)
    assert grid.shape == (3, 33, 33)
    assert np.isinf(grid[0]).all() and np.isinf(grid[:, 0]).all()
    assert np.isinf(grid[1, 20, 13]) and np.isfinite(grid[1, 20, 12])  # l + c beyond the sequence
    sends = 2 * (TRUE_SEND[0] + TRUE_SEND[1] * 2 * 80 * HIDDEN * 4)
    assert grid[2, 10, 5] == pytest.approx(true_compute(2, 80, 40) + sends, rel=1e-6)
    assert grid[1, 32, 0] == pytest.approx(model.predict(1, 256, 0))
    # Beyond the profiled batch or sequence the model does not guess.
    assert np.isinf(model.predict(3, 80, 0)) and np.isinf(model.predict(1, 264, 0))


@pytest.mark.timeout(60)
def test_batch_sizes_between_measured_ones_are_interpolated():
    model = LatencyModel(batch_sizes=[1, 4], lengths=[[8, 16], [8, 16]], no_context=[[1.0, 2.0], [4.0, 8.0]],
                         context_coef=[0.0] * 4, send_coef=[0.0, 0.0], message_bytes_per_token=4, update_time=0.0)
    assert model.predict([1, 2, 4], [12, 12, 16], 0) == pytest.approx([1.5, 3.0, 8.0])


@pytest.mark.timeout(60)
def test_model_file_round_trip(tmp_path):
    profile = synthetic_profile()
    report = fit_profile(profile)
    path = tmp_path / "model.json"
    write_model_file(str(path), report, profile)
    loaded = read_model_file(str(path))
    assert loaded.model == report.model and loaded.config == profile["config"] and loaded.device == "synthetic"
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a latency model"):
        read_model_file(str(tmp_path / "other.json"))


@pytest.mark.timeout(60)
def test_heldout_check_leaves_the_fit_enough_context_points():
    report = fit_profile(synthetic_profile(noise=0.0, context_samples=4), holdout=0.5)
    assert report.model.context_coef == pytest.approx(TRUE_CONTEXT, rel=1e-6)
    assert report.heldout_points == 30  # half of the 2 x 30 interior no-context lengths, no context point


@pytest.mark.timeout(60)
def test_too_few_context_points_is_an_error():
    with pytest.raises(ValueError, match="needs at least 4"):
        fit_profile(synthetic_profile(context_samples=3))


def _adaptive_run(no_context, context_samples=48, noise=0.0):
    """The adaptive profile's point selection on a synthetic stage (no torch): which points it measures."""
    from tqdm import tqdm

    from seqpipe_ds.planner.profile import ProfileSpec, _adaptive, _Bench
    spec = ProfileSpec(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=256,
                       micro_batch_size=1, granularity=8, context_samples=context_samples, warmup=0, repeats=3,
                       adaptive=True)
    rng = np.random.default_rng(0)
    a0, a1, a2, a3 = TRUE_CONTEXT

    def time_point(point):
        b, l, c = point
        t = no_context(b, l) + (c > 0) * (a0 + a1 * b * l + a2 * b * c + a3 * b * l * c)
        t *= 1 + noise * rng.standard_normal()
        return t, t / 3

    bench = _Bench(spec, time_point, tqdm(total=0, disable=True))
    report = _adaptive(spec, bench)
    return bench.rows, report


@pytest.mark.timeout(60)
def test_adaptive_profile_measures_few_points_where_the_line_is_straight():
    straight, report = _adaptive_run(lambda b, l: 1e-3 + 2e-5 * b * l)
    lengths = sorted(l for b, l, c in straight if c == 0)
    # 1, 2, 4, ... 32 units; every midpoint lies on the line, so no gap is bisected further.
    assert {8, 16, 32, 64, 128, 256} <= set(lengths) and len(lengths) == 6 + 4  # + one midpoint per gap
    assert max(report["length_midpoint_errors"]) < 1e-9
    assert len([p for p in straight if p[2] > 0]) <= 24 and report["context_round_errors"][-1] < 0.03
    # A cliff (cost per token jumps below 64 tokens) makes it bisect where the line is off.
    cliff, _ = _adaptive_run(lambda b, l: 1e-3 + 2e-5 * b * l * (3 if l < 64 else 1))
    assert len([p for p in cliff if p[2] == 0]) > len(lengths)
    report = fit_profile({"config": {"hidden_size": 64}, "compute": list(straight.values())})
    assert report.heldout_max_error < 0.01
