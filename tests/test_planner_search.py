"""Schedule-exact search on synthetic latency grids: never worse than the DP, uniform and equal-FLOP
plans under the same memory limit, and equal to exhaustive enumeration at small sizes."""
import itertools

import numpy as np
import pytest

from seqpipe_ds.planner import solve
from seqpipe_ds.planner.memory_model import MemoryModel
from seqpipe_ds.planner.costs import CostModel
from seqpipe_ds.planner.search import equal_flop_lengths, neighbours, search
from seqpipe_ds.schedules import SCHEDULES
from seqpipe_ds.slicing import SlicePlan, even_split

SEQ, G = 64, 8  # 8 units: 128 slicings of a sequence


def synthetic_costs(stages=2, seed=0, head=0.6, overhead=0.02):
    """Per-slice overhead (slicing is not free), attention growing with context, a first stage that
    is dearer (embedding) and a last one much dearer (LM head), sends and an optimizer step."""
    rng = np.random.default_rng(seed)
    scale = 1 + 0.3 * rng.random(stages)
    scale[-1] += head

    def compute(s, b, l, c):
        b, l, c = (np.asarray(v, dtype=float) for v in (b, l, c))
        return scale[s] * (overhead + 1e-3 * b * l + 2e-5 * b * l * (c + l / 2))

    return CostModel(stages=stages, compute=compute, send=lambda b, l: 1e-3 + 1e-5 * np.asarray(b) * l,
                     forward_fraction=0.3 + 0.1 * rng.random(), step=0.01, hidden_size=16)


def compositions(units):
    for cuts in itertools.product([0, 1], repeat=units - 1):
        lengths, run = [], 1
        for cut in cuts:
            if cut:
                lengths.append(G * run)
                run = 1
            else:
                run += 1
        yield tuple(lengths + [G * run])


def brute_force(costs, batch, memory=None, limit=None):
    """Every schedule, micro-batch split and sequence slicing (shared by the batch slices of a micro-batch)."""
    best = None
    for schedule in SCHEDULES:
        for mb in [m for m in range(1, batch + 1) if batch % m == 0]:
            for grouping in {(mb,), (1,) * mb}:
                for lengths in compositions(SEQ // G):
                    plan = SlicePlan(grouping, (lengths,) * len(grouping))
                    c = costs.predict(schedule, batch // mb, plan, memory)
                    if limit is not None and c.peak > limit:
                        continue
                    if best is None or c.makespan < best.makespan:
                        best = c
    return best


def memory_for(stages, per_token=1000.0):
    return MemoryModel(static_bytes=[5e4 * (1 + s) for s in range(stages)], bytes_per_token=[per_token] * stages)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed,stages,batch", [(0, 2, 1), (1, 3, 2), (2, 2, 2)])
def test_search_matches_brute_force(seed, stages, batch):
    costs = synthetic_costs(stages, seed)
    found = search(costs, batch, SEQ, G)
    optimum = brute_force(costs, batch)
    # The search may also split a micro-batch into batch slices with different slicings, which the
    # enumeration does not cover, so it can only be at most the optimum, never above it.
    assert found.best.makespan <= optimum.makespan * (1 + 1e-9), (found.best.describe(), optimum.describe())


@pytest.mark.timeout(120)
def test_memory_limit_changes_the_winner_and_matches_brute_force():
    costs, batch = synthetic_costs(2, 3, head=0.0), 4
    memory = memory_for(2)
    free = search(costs, batch, SEQ, G, memory=memory)
    assert free.smallest_peak.peak < free.best.peak  # the fastest plan is not the leanest
    limit = (free.smallest_peak.peak + free.best.peak) / 2  # the unconstrained winner no longer fits
    bounded = search(costs, batch, SEQ, G, memory=memory, memory_limit=limit)
    assert bounded.best.peak <= limit < free.best.peak
    assert bounded.best.makespan >= free.best.makespan
    optimum = brute_force(costs, batch, memory, limit)
    assert bounded.best.makespan <= optimum.makespan * (1 + 1e-9)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(3))
def test_never_worse_than_dp_uniform_and_equal_flop(seed):
    stages, batch, seq, g = 4, 2, 128, 16
    costs = synthetic_costs(stages, seed, overhead=0.005)
    memory = memory_for(stages, per_token=2000.0)
    free = search(costs, batch, seq, g, memory=memory, local_moves=False)
    limit = (free.smallest_peak.peak + free.best.peak) / 2
    found = search(costs, batch, seq, g, memory=memory, memory_limit=limit).best
    units = seq // g
    dp = solve(costs.bottleneck_grid(batch, seq, g), batch, seq, stages, g, costs.step)
    others = [SlicePlan(tuple(dp.batch_slices), tuple(map(tuple, dp.input_slices)))]
    for k in (1, 2, 4, 8):
        for lengths in ([g * u for u in even_split(units, k)], equal_flop_lengths(seq, k, g, costs.hidden_size)):
            others.append(SlicePlan((batch,), (tuple(lengths),)))
    for schedule in SCHEDULES:
        for plan in others:
            other = costs.predict(schedule, 1, plan, memory)
            if other.peak <= limit:
                assert found.makespan <= other.makespan * (1 + 1e-9), (schedule, plan)
    assert found.peak <= limit


def test_equal_flop_puts_longer_slices_first():
    lengths = equal_flop_lengths(2048, 4, 8, hidden_size=64)
    assert sum(lengths) == 2048 and lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    assert all(length % 8 == 0 for length in lengths)
    # Dominated by the matmuls (large hidden size), equal FLOPs are nearly equal lengths.
    assert max(equal_flop_lengths(2048, 4, 8, hidden_size=1 << 20)) - min(
        equal_flop_lengths(2048, 4, 8, hidden_size=1 << 20)) <= 8


def test_neighbours_keep_the_sequence_length():
    plan = SlicePlan((1, 1), ((32, 16, 16), (64,)))
    moves = list(neighbours(plan, 8))
    assert moves and all(sum(lengths) == 64 and min(lengths) >= 8 for p in moves for lengths in p.seq_slices)
    assert SlicePlan((1, 1), ((48, 16), (64,))) in moves and SlicePlan((1, 1), ((32, 16, 16), (32, 32))) in moves


@pytest.mark.timeout(60)
def test_no_fit_names_the_smallest_peak_and_bad_input_is_refused():
    costs = synthetic_costs(2, 0)
    memory = memory_for(2)
    with pytest.raises(ValueError, match="below the parameters, gradients and optimizer states"):
        search(costs, 2, SEQ, G, memory=memory, memory_limit=9e4)
    smallest = search(costs, 2, SEQ, G, memory=memory).smallest_peak.peak
    with pytest.raises(ValueError, match=r"no plan fits .* the smallest peak found is"):
        search(costs, 2, SEQ, G, memory=memory, memory_limit=0.99 * smallest)
    with pytest.raises(ValueError, match="multiple of the granularity"):
        search(costs, 2, 60, G)
    with pytest.raises(ValueError, match="choose from"):
        search(costs, 2, SEQ, G, schedules=["gpipe"])
    with pytest.raises(ValueError, match="must divide the batch"):
        search(costs, 4, SEQ, G, micro_batch_sizes=[3])


@pytest.mark.timeout(120)
def test_cli_solve_under_a_memory_limit_writes_schedule_time_and_peak(tmp_path, capsys):
    import json

    from seqpipe_ds.cli.plan import main
    from seqpipe_ds.planner import find_plan
    from test_planner_fit import synthetic_profile
    profile = synthetic_profile(noise=0.0, seq_length=128, granularity=16, context_samples=40)
    profile["stage_ends"] = {end: [{"b": b, "l": l, "time": base + 1e-6 * b * l} for b in (1, 2) for l in (16, 128)]
                             for end, base in (("first", 1e-4), ("last", 2e-3))}
    profile["saved_bytes_per_token"] = {"first": 5000.0, "middle": 4900.0, "last": 8000.0}
    path, model, plans = tmp_path / "profile.json", tmp_path / "model.json", tmp_path / "dp_results.json"
    path.write_text(json.dumps(profile))
    assert main(["fit", str(path), "--out", str(model)]) == 0
    assert main(["solve", str(model), "--num-stages", "2", "--batch-size", "2", "--plan-file", str(plans)]) == 0
    free = capsys.readouterr().out
    assert "predicted peak per stage: " in free and "TeraPipe's DP plan, simulated the same way" in free
    unlimited = json.loads(plans.read_text())[0]
    limit = 0.97 * max(unlimited["predicted_peak_bytes"])
    assert main(["solve", str(model), "--num-stages", "2", "--batch-size", "2", "--memory-limit", str(limit),
                 "--plan-file", str(plans), "--global-batch-size", "2"]) == 0
    entry = next(e for e in json.loads(plans.read_text()) if e.get("global_batch_size") == 2)
    assert entry["schedule"] in SCHEDULES and entry["latency"] >= unlimited["latency"]
    assert max(entry["predicted_peak_bytes"]) <= limit
    found = find_plan(str(plans), model={"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
                                         "vocab_size": 128}, micro_batch_size=entry["micro_batch_size"], tp=1, pp=2,
                      dp=1, seq_length=128, global_batch_size=2)
    assert found.schedule == entry["schedule"]
    assert main(["solve", str(model), "--num-stages", "2", "--memory-limit", "1KiB"]) == 1
    assert "below the parameters, gradients and optimizer states alone" in capsys.readouterr().err
    assert main(["solve", str(model), "--num-stages", "2", "--objective", "dp", "--memory-limit", "1GiB"]) == 1
    assert "--objective dp plans TeraPipe's objective only" in capsys.readouterr().err
