"""``advise`` on a tiny synthetic cluster against brute force: which (TP, PP, DP) are considered (TP
inside a node), which fit the memory, how they rank; the paper cluster's description; bad input."""
import itertools
import json

import pytest

from seqpipe_ds.cli.plan import main
from seqpipe_ds.planner.advise import advise, factorisations, flop_rate_costs, load_cluster, parse_rate
from seqpipe_ds.planner.memory_model import MemoryModel, analytic_bytes_per_token, stage_parameters
from seqpipe_ds.schedules import SCHEDULES
from seqpipe_ds.slicing import SlicePlan

MODEL = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 64,
         "max_position_embeddings": 64}
G, BATCH = 16, 4


def cluster(**changes):
    data = {"name": "tiny", "nodes": 2, "gpus_per_node": 2, "gpu": "V100", "gpu_memory": "2200KiB", "reserved": "0GiB",
            "intra_node": {"bandwidth": "100GB/s", "latency": 5e-6},
            "inter_node": {"bandwidth": "10Gbit/s", "latency": 2e-5}}
    data.update(changes)
    return load_cluster(data)


def brute_force(tiny, tp, pp, dp):
    """Least makespan over schedules, micro-batch splits, groupings and every slicing, within memory."""
    costs = flop_rate_costs(MODEL, tiny, tp, pp, dp)
    layers = [MODEL["num_layers"] // pp] * pp
    memory = MemoryModel.for_stages(stage_parameters(MODEL, pp, tp),
                                    analytic_bytes_per_token(MODEL, tp, layers, "bf16"),
                                    "bf16", 0, dp)
    batch, units, best = BATCH // dp, MODEL["seq_length"] // G, None
    for schedule in SCHEDULES:
        for mb in (m for m in range(1, batch + 1) if batch % m == 0):
            for grouping in {(mb,), (1,) * mb}:
                for cuts in itertools.product([0, 1], repeat=units - 1):
                    bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [units]
                    lengths = tuple(G * (b - a) for a, b in zip(bounds, bounds[1:]))
                    c = costs.predict(schedule, batch // mb, SlicePlan(grouping, (lengths,) * len(grouping)), memory)
                    if c.peak <= tiny.gpu_memory and (best is None or c.makespan < best.makespan):
                        best = c
    return best


@pytest.mark.timeout(240)
def test_advise_matches_brute_force_on_a_tiny_cluster():
    tiny = cluster()
    advice = advise(MODEL, tiny, BATCH, granularity=G, local_moves=True)
    every = [(t, p, d) for t, p, d in itertools.product(range(1, 5), repeat=3) if t * p * d == 4]
    considered = set(factorisations(MODEL, tiny, BATCH))
    # TP stays inside a node; every other factorisation of the 4 GPUs is considered.
    assert considered == {(t, p, d) for t, p, d in every if t <= 2}
    expected = {config: brute_force(tiny, *config) for config in considered}
    fitting = {config for config, best in expected.items() if best is not None}
    assert len(fitting) >= 2 and fitting != considered  # the memory filter removes some, not all
    assert {(c.tp, c.pp, c.dp) for c in advice.ranked} == fitting
    assert {(c.tp, c.pp, c.dp) for c in advice.rejected} == considered - fitting
    for c in advice.ranked:
        assert c.best.peak <= tiny.gpu_memory
        assert c.time <= expected[c.tp, c.pp, c.dp].makespan * (1 + 1e-9)
    times = [c.time for c in advice.ranked]
    assert times == sorted(times)
    brute_ranking = sorted(fitting, key=lambda config: expected[config].makespan)
    assert (advice.ranked[0].tp, advice.ranked[0].pp, advice.ranked[0].dp) == brute_ranking[0]


@pytest.mark.timeout(240)
def test_cli_advise_writes_table_plan_and_launch_flags(tmp_path, capsys):
    path, plans = tmp_path / "cluster.json", tmp_path / "dp_results.json"
    path.write_text(json.dumps({"name": "tiny", "nodes": 2, "gpus_per_node": 2, "gpu": "V100", "gpu_memory": "2200KiB",
                                "reserved": "0GiB", "intra_node": {"bandwidth": "100GB/s", "latency": 5e-6},
                                "inter_node": {"bandwidth": "10Gbit/s", "latency": 2e-5}}))
    shape = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "128",
             "--seq-length", "64"]
    assert main(["advise", *shape, "--cluster", str(path), "--global-batch-size", "4", "--granularity", "16",
                 "--plan-file", str(plans)]) == 0
    printed = capsys.readouterr().out
    assert "| TP | PP | DP | schedule |" in printed and "does not fit: TP" in printed
    assert "deepspeed --num_nodes 2 --num_gpus 2" in printed and "--tensor-model-parallel-size" in printed
    entry = json.loads(plans.read_text())[0]
    assert entry["schedule"] in SCHEDULES and entry["tp"] * entry["pp"] * entry["dp"] == 4
    assert max(entry["predicted_peak_bytes"]) <= 2200 * 2 ** 10


def test_paper_cluster_description_loads():
    paper = load_cluster("configs/cluster_terapipe_paper.json")
    assert paper.gpus == 384 and paper.gpu.name == "V100" and paper.gpu_memory == 15 * 2 ** 30
    assert paper.inter_node.bandwidth == pytest.approx(25e9 / 8)
    assert parse_rate("150GB/s") == 150e9


@pytest.mark.timeout(60)
def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"lacks inter_node, intra_node.latency"):
        data = json.loads(json.dumps({"nodes": 1, "gpus_per_node": 2, "gpu": "V100", "gpu_memory": "16GiB",
                                      "intra_node": {"bandwidth": "1GB/s"}}))
        load_cluster(data)
    with pytest.raises(ValueError, match="unknown gpu 'TPU'"):
        cluster(gpu="TPU")
    with pytest.raises(ValueError, match="is not a bandwidth"):
        cluster(inter_node={"bandwidth": "fast", "latency": 0})
    # Too little memory for the model states of every factorisation.
    with pytest.raises(ValueError, match="no TP x PP x DP factorisation fits .* GiB per GPU: the smallest peak"):
        advise(MODEL, cluster(gpu_memory="100KiB"), BATCH, granularity=G)
    with pytest.raises(ValueError, match="no TP x PP x DP of 4 GPUs suits"):
        advise({**MODEL, "num_layers": 3, "num_attention_heads": 3, "vocab_size": 129}, cluster(), 3, granularity=G)
    with pytest.raises(SystemExit):
        main(["advise", "--model-preset", "gpt3-9000", "--cluster", "x.json", "--global-batch-size", "2"])
    assert "invalid choice: 'gpt3-9000'" in capsys.readouterr().err
    assert main(["advise", "--model-preset", "gpt3-1b", "--cluster", str(tmp_path / "none.json"),
                 "--global-batch-size", "2"]) == 1
    assert "cannot be read" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_cli_advise_with_a_profiled_latency_model(tmp_path, capsys):
    from test_planner_fit import synthetic_profile
    profile, model, path = tmp_path / "profile.json", tmp_path / "model.json", tmp_path / "cluster.json"
    profile.write_text(json.dumps(synthetic_profile(noise=0.0)))  # TP 1, 2 layers, hidden 64, seq 256
    assert main(["fit", str(profile), "--out", str(model)]) == 0
    path.write_text(json.dumps({"name": "tiny", "nodes": 2, "gpus_per_node": 2, "gpu": "V100", "gpu_memory": "1GiB",
                                "reserved": "0GiB", "intra_node": {"bandwidth": "100GB/s", "latency": 5e-6},
                                "inter_node": {"bandwidth": "10Gbit/s", "latency": 2e-5}}))
    capsys.readouterr()
    assert main(["advise", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size",
                 "128", "--seq-length", "64", "--cluster", str(path), "--global-batch-size", "4", "--granularity", "16",
                 "--latency-model", str(model)]) == 0
    printed = capsys.readouterr().out
    assert "device model: profile of synthetic at TP 1" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert rows and all(row.startswith("| 1 |") for row in rows)  # only the profiled TP size
