"""Activation recomputation as a plan dimension: each mode's memory model against ``SavedTensorMeter``
in real 2-stage seqpipe runs, the search over modes against brute force under a memory limit, the
error when nothing fits, plan files that record the mode (and older ones that do not), and the
hook's refusal of a plan made for another mode."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest

import launcher
from seqpipe_ds.cli.plan import main
from seqpipe_ds.planner.costs import unit_tokens
from seqpipe_ds.planner.memory_model import MemoryModel, stage_parameters
from seqpipe_ds.planner.plan_file import PlanFileError, read_plans
from seqpipe_ds.planner.recompute import RECOMPUTE_MODES
from seqpipe_ds.planner.search import NoFit, fastest_fitting, search, stock_candidates
from test_planner_memory import MODEL, SEQ, measure
from test_planner_plan_file import resolve_for_models, tiny_plan_file
from test_planner_search import G, brute_force, synthetic_costs

# (schedule, micro-batch size, gradient accumulation, batch slices, sequence slices): all forwards
# first, 1F1B over unequal slices, and stock's unsliced 1F1B.
RUNS = [("terapipe", 1, 1, 1, 4), ("slice-1f1b", 1, 2, 1, [48, 32, 32, 16]), ("slice-1f1b", 1, 2, 1, 1)]
SEARCH_SEQ = 64


@pytest.mark.timeout(400)
def test_each_modes_predicted_peak_is_what_the_meter_measures():
    """Predicted: alive tokens x kept bytes + the largest unit's transient (tokens x transient +
    context x cached K/V), from the profile's meter on one sequence of one stage. The peak comes at
    the first backward on every stage here (the last slice of the last micro-batch forwarded, with
    the most context, is the first backwarded, while every forwarded token is still alive), so the
    model is exact but for what slicing changes in the saved bytes themselves: the last stage's loss
    keeps one scalar per slice, and attention keeps per-slice log-sum-exps, a few bytes per token
    against the ~8 KiB per token a layer keeps. 1% covers it; the "full" peak is 85% transient, so
    a transient counted per stage kind wrongly (the last stage frees the logits first) or a missed
    context term (3/8 of it on the 16-token last slice) would be off by far more."""
    from seqpipe_ds.schedules import lower, simulate
    from seqpipe_ds.slicing import make_plan

    ranks = launcher.run(measure, 2, timeout=380, runs=RUNS, modes=("selective", "full"))
    static = stage_parameters(MODEL, 2)
    for mode in ("selective", "full"):
        measured_bytes = ranks[0][mode][1]
        assert measured_bytes["kept"]["middle"] > 0
        memory = MemoryModel.for_stages(static, measured_bytes["kept"], transient=measured_bytes["transient"],
                                        context=measured_bytes["context"], recompute=mode)
        for index, (schedule, mbs, gas, batch_slices, seq_slices) in enumerate(RUNS):
            plan = make_plan(batch_slices, seq_slices, mbs, SEQ)
            simulated = simulate(lower(schedule, 2, gas, plan), plan)
            predicted = memory.activation_peaks(simulated.peak_alive_tokens, unit_tokens(plan))
            for stage, measured, parameters in (rank[mode][0][index] for rank in ranks):
                assert parameters == static[stage]
                assert predicted[stage] == pytest.approx(measured, rel=0.01), (mode, schedule, plan, stage)
    full, selective = ranks[0]["full"][1], ranks[0]["selective"][1]
    # Full keeps each layer's input alone (2 layers x 64 floats); the cached K/V its rerun saves per
    # context token are one layer's QKV projection (K and V are views of it): 3 x 64 floats.
    assert full["kept"]["middle"] == 2 * 64 * 4 and full["context"] == 3 * 64 * 4
    assert selective["transient"]["middle"] == 0 and selective["context"] == 0


def costs_and_memory(stages=2, seed=0):
    """Synthetic costs whose recomputation reruns part or all of the forward, and memory models
    that keep less per token the more is recomputed, with a transient and a KV cache for full."""
    costs = synthetic_costs(stages, seed, head=0.0)
    layers = lambda s, b, l, c: costs.forward_fraction * costs.compute(s, b, l, c)  # noqa: E731
    costs = replace(costs, recompute_cost={"selective": lambda s, b, l, c: 0.2 * layers(s, b, l, c), "full": layers})
    static = [5e4 * (1 + s) for s in range(stages)]
    memory = {"none": MemoryModel(static, [1000.0] * stages),
              "selective": MemoryModel(static, [700.0] * stages, recompute="selective"),
              "full": MemoryModel(static, [100.0] * stages, [900.0] * stages, [300.0] * stages, [200.0] * stages,
                                  recompute="full")}
    return costs, memory


def brute_force_modes(costs, batch, memory, limit):
    """The brute force of test_planner_search, once per mode: the fastest fitting of any mode."""
    found = [brute_force(costs.with_recompute(mode), batch, memory[mode], limit) for mode in RECOMPUTE_MODES]
    return min((c for c in found if c is not None), key=lambda c: c.makespan)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed,stages,batch", [(0, 2, 2), (1, 3, 2)])
def test_budget_search_over_modes_matches_brute_force(seed, stages, batch):
    costs, memory = costs_and_memory(stages, seed)
    free = search(costs, batch, SEARCH_SEQ, G, memory=memory, recompute_modes=RECOMPUTE_MODES)
    assert free.best.recompute == "none"  # recomputation only costs time
    none_peak = search(costs, batch, SEARCH_SEQ, G, memory=memory["none"]).smallest_peak.peak
    limit = 0.95 * none_peak  # nothing without recomputation fits
    bounded = search(costs, batch, SEARCH_SEQ, G, memory=memory, memory_limit=limit, recompute_modes=RECOMPUTE_MODES)
    assert bounded.best.recompute != "none" and bounded.best.peak <= limit
    assert all(c.peak <= limit for c in bounded.candidates)
    optimum = brute_force_modes(costs, batch, memory, limit)
    # The search may also split a micro-batch into batch slices with different slicings, which the
    # enumeration does not cover: at most the optimum, never above it.
    assert bounded.best.makespan <= optimum.makespan * (1 + 1e-9), (bounded.best.describe(), optimum.describe())
    # Stock's candidates: unsliced 1F1B under every mode and micro-batch size, without the KV cache.
    stock = stock_candidates(costs, memory, batch, SEARCH_SEQ, RECOMPUTE_MODES)
    assert len(stock) == 3 * len([m for m in range(1, batch + 1) if batch % m == 0])
    assert all(len(c.plan.seq_slices[0]) == 1 and len(c.plan.batch_slices) == 1 for c in stock)
    full = min((c for c in stock if c.recompute == "full"), key=lambda c: c.peak)
    plan_memory = costs.with_recompute("full").predict(full.schedule, full.micro_batches, full.plan, memory["full"])
    assert full.peak < plan_memory.peak  # seqpipe's engine also holds the KV cache
    picked = fastest_fitting(stock, max(c.peak for c in stock if c.recompute == "full"))
    assert picked.makespan == min(c.makespan for c in stock if c.peak <= picked.peak or c is picked)


@pytest.mark.timeout(120)
def test_a_limit_nothing_fits_names_the_smallest_peak_and_its_mode():
    costs, memory = costs_and_memory()
    smallest = search(costs, 2, SEARCH_SEQ, G, memory=memory, recompute_modes=RECOMPUTE_MODES).smallest_peak
    assert smallest.recompute == "full"
    with pytest.raises(NoFit, match=r"smallest peak found is [\d.]+ KiB with recompute full \(.*recompute full") as e:
        search(costs, 2, SEARCH_SEQ, G, memory=memory, memory_limit=0.99 * smallest.peak,
               recompute_modes=RECOMPUTE_MODES)
    assert e.value.smallest.peak == smallest.peak
    stock = stock_candidates(costs, memory, 2, SEARCH_SEQ, RECOMPUTE_MODES)
    leanest = min(stock, key=lambda c: c.peak)  # unsliced, full's transient is a whole sequence's layer
    with pytest.raises(NoFit, match=f"with recompute {leanest.recompute} "):
        fastest_fitting(stock, 0.99 * leanest.peak)
    with pytest.raises(ValueError, match="cannot price selective"):
        search(costs, 2, SEARCH_SEQ, G, memory=memory["none"], recompute_modes=("none", "selective"))
    with pytest.raises(ValueError, match="no measured cost"):
        synthetic_costs().with_recompute("full")


def recompute_profile():
    """A synthetic profile with stage ends, every mode's metered bytes and recomputation rows: the
    rerun costs 0.25 (selective) and 1.0 (full) forwards."""
    from test_planner_fit import synthetic_profile
    profile = synthetic_profile(noise=0.0, seq_length=128, granularity=16, context_samples=40)
    profile["stage_ends"] = {end: [{"b": b, "l": l, "time": base + 1e-6 * b * l} for b in (1, 2) for l in (16, 128)]
                             for end, base in (("first", 1e-4), ("last", 2e-3))}
    for row in profile["compute"]:
        row["forward"] = 0.4 * row["time"]
    kinds = lambda first, middle, last: {"first": first, "middle": middle, "last": last}  # noqa: E731
    profile["recompute_bytes"] = {
        "none": {"kept": kinds(5000.0, 4900.0, 8000.0), "transient": kinds(0.0, 0.0, 0.0), "context": 0.0},
        "selective": {"kept": kinds(4000.0, 3900.0, 7000.0), "transient": kinds(0.0, 0.0, 0.0), "context": 0.0},
        "full": {"kept": kinds(600.0, 512.0, 3600.0), "transient": kinds(2400.0, 2400.0, 1200.0), "context": 768.0}}
    profile["saved_bytes_per_token"] = profile["recompute_bytes"]["none"]["kept"]
    profile["recompute"] = [{"recompute": mode, "b": 1, "l": l, "c": c, "time": time * (1 + 0.4 * extra),
                             "forward": 0.4 * time}
                            for l, c, time in ((64, 0, 0.01), (128, 0, 0.02), (64, 64, 0.015))
                            for mode, extra in (("none", 0.0), ("selective", 0.25), ("full", 1.0))]
    return profile


@pytest.fixture
def recompute_model(tmp_path, capsys):
    path, model = tmp_path / "profile.json", tmp_path / "model.json"
    path.write_text(json.dumps(recompute_profile()))
    assert main(["fit", str(path), "--out", str(model)]) == 0
    assert "recompute full: backward + 1 x the layers' forward" in capsys.readouterr().out
    return model


def _solve(capsys, *argv):
    capsys.readouterr()
    code = main(["solve", *argv])
    return code, capsys.readouterr()


@pytest.mark.timeout(180)
def test_solve_chooses_recomputation_under_a_limit_and_show_reproduces_it(tmp_path, recompute_model, capsys):
    from seqpipe_ds.planner.fit import read_model_file
    from seqpipe_ds.planner.planning import makespan_plan, measured_modes, simulate_entry, stage_memory
    found = read_model_file(str(recompute_model))
    assert measured_modes(found) == RECOMPUTE_MODES
    assert found.model.recompute_extra == pytest.approx({"selective": 0.25, "full": 1.0})
    plans = tmp_path / "plans.json"
    args = [str(recompute_model), "--num-stages", "2", "--batch-size", "2", "--plan-file", str(plans)]
    assert _solve(capsys, *args, "--recompute", "auto")[0] == 0
    free, = read_plans(str(plans))
    assert free.recompute == "none"
    leanest = makespan_plan(found, 2, 2, 128, 16, memory=stage_memory(found, 2, 128)).smallest_peak.peak
    limit = 0.97 * leanest  # nothing fits without recomputation
    code, printed = _solve(capsys, *args, "--recompute", "none", "--memory-limit", str(limit))
    assert code == 1 and "with recompute none" in printed.err
    code, printed = _solve(capsys, *args, "--recompute", "auto", "--memory-limit", str(limit),
                           "--global-batch-size", "2")
    assert code == 0 and "recompute full" in printed.out
    entry = next(e for e in read_plans(str(plans)) if e.global_batch_size == 2)
    assert entry.recompute == "full" and max(entry.predicted_peak_bytes) <= limit
    assert json.loads(plans.read_text())[1]["recompute"] == "full"
    assert simulate_entry(found, entry).makespan == entry.latency
    capsys.readouterr()
    assert main(["show", str(plans), "--index", "1", "--latency-model", str(recompute_model)]) == 0
    shown = capsys.readouterr().out
    assert "recompute full" in shown
    assert float(re.search(r"timeline makespan: ([\d.e+-]+) s", shown).group(1)) == float(f"{entry.latency:.6g}")
    # The same plan priced without its recomputation is faster: show did charge the rerun.
    unpriced = simulate_entry(found, replace(entry, recompute="none")).makespan
    assert unpriced < entry.latency


@pytest.mark.timeout(120)
def test_older_model_and_plan_files_read_as_without_recomputation(tmp_path, recompute_model, capsys):
    from seqpipe_ds.planner.fit import read_model_file
    from seqpipe_ds.planner.planning import cost_model, measured_modes, stage_memory
    data = json.loads(recompute_model.read_text())
    for name in ("recompute_extra", "recompute_bytes"):
        del data["model"][name]
    recompute_model.write_text(json.dumps(data))
    old = read_model_file(str(recompute_model))
    assert measured_modes(old) == ("none",)
    memory = stage_memory(old, 2, 128)
    assert memory.bytes_per_token == [5000.0, 8000.0] and memory.recompute == "none"
    with pytest.raises(ValueError, match="no measured cost of rerunning"):
        cost_model(old, 2, recompute="full")
    with pytest.raises(ValueError, match="re-profile with --recompute-modes full"):
        stage_memory(old, 2, 128, recompute="full")
    plans = tmp_path / "plans.json"
    assert _solve(capsys, str(recompute_model), "--num-stages", "2", "--plan-file", str(plans))[0] == 0
    written, = json.loads(plans.read_text())
    del written["recompute"]
    plans.write_text(json.dumps([written]))
    assert read_plans(str(plans))[0].recompute == "none"
    written["recompute"] = "sometimes"
    plans.write_text(json.dumps([written]))
    with pytest.raises(PlanFileError, match="recompute mode 'sometimes' is not one of none, selective, full"):
        read_plans(str(plans))


@pytest.mark.timeout(120)
def test_hook_refuses_a_plan_made_for_another_recomputation(tmp_path):
    plan_path = tiny_plan_file(tmp_path, [8, 8], schedule="slice-1f1b", recompute="full")
    refused, accepted = launcher.run(resolve_for_models, 1, plan_path=plan_path,
                                     models=[{"recompute_granularity": g} for g in (None, "full")])[0]
    assert re.search(r"made for recompute 'full', but the model is built with recompute_granularity=None: build it "
                     r"with recompute_granularity='full'", refused), refused
    assert accepted == [8, 8]


def test_stage_memory_scales_kept_and_cached_bytes_to_the_stage_layers(recompute_model):
    from seqpipe_ds.planner.fit import read_model_file
    from seqpipe_ds.planner.planning import stage_memory
    found = read_model_file(str(recompute_model))  # profiled: 2 layers
    memory = stage_memory(found, 2, 128, num_model_layers=8, recompute="full")  # 4 layers a stage
    assert memory.bytes_per_token == [600.0 + 512.0, 3600.0 + 512.0]  # the layers' bytes doubled
    assert memory.transient_bytes_per_token == [2400.0, 1200.0]  # one layer is rerun at a time
    assert memory.context_bytes_per_token == [768.0, 768.0] and memory.cache_bytes_per_token == [4 * 768.0] * 2
    peaks = memory.peaks([100, 50], [(64, 0), (64, 64)])
    transient = 64 * 2400.0 + 64 * 768.0
    assert np.allclose(np.subtract(peaks, memory.static_bytes),
                       [100 * (1112.0 + 3072.0) + transient, 50 * (4112.0 + 3072.0) + 64 * 1200.0 + 64 * 768.0])
    assert memory.without_cache().peaks([100, 50], [(64, 0)])[0] == memory.static_bytes[0] + 100 * 1112.0 + 64 * 2400.0
