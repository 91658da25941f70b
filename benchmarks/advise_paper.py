"""`seqpipe-plan advise` on TeraPipe's cluster (48 x 8 V100 16 GB, NVLink in a node, 25 Gbit/s between
nodes) for GPT3-175B and GPT3-13B, and a check of the paper's claim that the best slice length
depends on the device rather than on the pipeline depth, in our FLOP-rate model.

    python benchmarks/advise_paper.py [--out benchmarks/results/advise_paper.md]

Writes the markdown it prints. The device model is the FLOP-rate model of planner/advise.py (no
GPU was profiled), so the figures are the model's, not measurements.
"""
import argparse
import statistics
import time

from seqpipe_ds.model.presets import preset
from seqpipe_ds.planner import advise as advisor
from seqpipe_ds.planner.search import search

CLUSTER = "configs/cluster_terapipe_paper.json"
# (preset, global batch): the paper's 175B setting runs batch 2 on 384 GPUs; 13B at batch 32 is ours.
RUNS = [("gpt3-175b", 2), ("gpt3-13b", 32)]


def model_of(name):
    fields = preset(name)
    return {**fields, "max_position_embeddings": fields["seq_length"]}


def ranking(lines):
    cluster = advisor.load_cluster(CLUSTER)
    for name, batch in RUNS:
        start = time.perf_counter()
        advice = advisor.advise(model_of(name), cluster, batch, granularity=128)
        lines.append(f"\n### {name}, global batch {batch} ({time.perf_counter() - start:.0f} s to plan)\n")
        lines.append(advisor.table(advice, top=8))
        unsliced = advisor.best_unsliced_overall(advice)
        best = advice.ranked[0]
        if unsliced:
            lines.append(f"\nBest unsliced (micro-batch-only 1F1B): TP {unsliced.tp} x PP {unsliced.pp} x DP "
                         f"{unsliced.dp}, {unsliced.unsliced.makespan:.3f} s; the winner (TP {best.tp} x PP {best.pp} "
                         f"x DP {best.dp}, {best.best.schedule}) is {unsliced.unsliced.makespan / best.time:.2f}x "
                         "faster.")
        rejected = ", ".join(f"{c.tp}x{c.pp}x{c.dp}" for c in advice.rejected)
        lines.append(f"Do not fit 15 GiB usable per GPU (TP x PP x DP): {rejected or 'none'}.")


def slice_study(lines, name="gpt3-13b", tp=8, depths=(2, 4, 8, 10, 20, 40), gpus=("V100", "A100", "H100")):
    """Median slice length of the best one-sequence terapipe plan, per device and pipeline depth."""
    model = model_of(name)
    lines.append(f"\n### Best slice length vs pipeline depth ({name}, TP {tp}, one sequence of "
                 f"{model['seq_length']} tokens, terapipe, granularity 64)\n")
    lines.append("| GPU | " + " | ".join(f"PP {p}" for p in depths) + " |")
    lines.append("|---|" + "---|" * len(depths))
    for gpu in gpus:
        cluster = advisor.load_cluster({**_cluster_json(), "gpu": gpu, "gpu_memory": "141GiB"})
        cells = []
        for pp in depths:
            costs = advisor.flop_rate_costs(model, cluster, tp, pp, 1)
            best = search(costs, 1, model["seq_length"], 64, ["terapipe"], local_moves=False).best
            lengths = best.plan.seq_slices[0]
            cells.append(f"{statistics.median(lengths):.0f} ({len(lengths)} slices)")
        lines.append(f"| {gpu} | " + " | ".join(cells) + " |")


def _cluster_json():
    import json
    with open(CLUSTER) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/advise_paper.md")
    args = parser.parse_args()
    lines = ["## seqpipe-plan advise on TeraPipe's cluster (FLOP-rate model of a V100)"]
    ranking(lines)
    slice_study(lines)
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
