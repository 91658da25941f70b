"""seqpipe equals stock DeepSpeed pipelining and a single-process reference, step by step.

Every layout (PP x TP x DP, world size <= 4) trains the same model on the same data with stock
DeepSpeed and with several slicings; per-step losses, every parameter's gradient at every step
and the final parameters must agree at fp32 relative error <= 1e-5, under every schedule.
"""
import pytest

import engine_cases
from common import RTOL, assert_close
from engine_cases import merge as _merge

UNEVEN = [8, 4, 3, 1]  # long first, as the planner tends to choose
SCHEDULE_NAMES = ("terapipe", "slice-1f1b")


def both(*variants):
    """Each slicing under every schedule."""
    return [{**v, "schedule": name} for v in variants for name in SCHEDULE_NAMES]


LAYOUTS = {
    # world size 2
    "pp2": (2, [
        (dict(pp=2, mbs=2, gas=1), both({"seq_slices": 1}, {"seq_slices": 4}, {"seq_slices": UNEVEN},
                                        {"seq_slices": 16}, {"seq_slices": 4, "batch_slices": 2})),
        (dict(pp=2, mbs=3, gas=2), both({"batch_slices": [2, 1], "seq_slices": [[5, 11], [16]]},
                                        {"batch_slices": 3, "seq_slices": [1, 2, 13]})),
        # slice-1f1b with the units of three micro-batches in flight
        (dict(pp=2, mbs=2, gas=3), both({"seq_slices": [6, 6, 4], "batch_slices": [1, 1]},
                                        {"seq_slices": [[16], [10, 6]], "batch_slices": [1, 1]})),
        (dict(pp=2, mbs=2, gas=2, zero=1, clip=0.05), both({"seq_slices": [5, 5, 6], "batch_slices": [1, 1]})),
    ]),
    # world size 4
    "pp4": (4, [(dict(pp=4, mbs=2, gas=3), both({"seq_slices": 4, "batch_slices": 2}, {"seq_slices": [10, 3, 2, 1]}))]),
    "pp2_tp2": (4, [(dict(pp=2, tp=2, mbs=2, gas=2, clip=0.05), both({"seq_slices": 4}, {"seq_slices": [1] * 16}))]),
    "pp2_dp2": (4, [(dict(pp=2, dp=2, mbs=2, gas=2), both({"seq_slices": [9, 7], "batch_slices": 2})),
                    (dict(pp=2, dp=2, mbs=2, gas=1, zero=1), both({"seq_slices": 4}))]),
}


@pytest.fixture(scope="module")
def results():
    """{(layout, case index): {"reference": ..., "stock": ..., variant index: ...}}, merged over ranks."""
    raw = engine_cases.run_layouts({name: (world, [(case, [None, *variants]) for case, variants in cases])
                                    for name, (world, cases) in LAYOUTS.items()})
    return {key: {"reference": _merge(runs.pop("reference")), "stock": _merge(runs.pop(0)),
                  **{v - 1: _merge(r) for v, r in runs.items()}} for key, runs in raw.items()}


PARAMS = [pytest.param(name, c, v, id=f"{name}-case{c}-{v}") for name, (_, cases) in LAYOUTS.items()
          for c, (_, variants) in enumerate(cases) for v in ["stock", *range(len(variants))]]


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("layout,case,variant", PARAMS)
def test_matches_reference_and_stock(results, layout, case, variant):
    runs = results[layout, case]
    what = f"{layout} case {case} {'stock' if variant == 'stock' else LAYOUTS[layout][1][case][1][variant]}"
    # Clipped runs too: patches/clip_norm.py gives stock DeepSpeed and seqpipe the true global norm.
    _compare(runs[variant], runs["reference"], RTOL, what + " vs single process")
    if variant != "stock":
        _compare(runs[variant], runs["stock"], RTOL, what + " vs stock DeepSpeed")


def _compare(actual, expected, rtol, what):
    import torch
    assert len(actual["losses"]) == engine_cases.STEPS
    assert_close({"losses": torch.tensor(actual["losses"])}, {"losses": torch.tensor(expected["losses"])}, rtol,
                 what + " losses")
    assert len(actual["grads"]) == len(expected["grads"])
    for step, (a, e) in enumerate(zip(actual["grads"], expected["grads"])):
        assert_close(a, {k: e[k] for k in a}, rtol, f"{what} grads step {step}")
    assert_close(actual["params"], {k: expected["params"][k] for k in actual["params"]}, rtol, what + " params")
