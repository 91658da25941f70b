"""Time of ``solve`` on a grid the size of GPT3-175B's plan (seq 2048, granularity 8, batch 2,
96 stages: grid shape (3, 257, 257)).

The grid comes from a latency model with textbook numbers for one 175B layer on TP=4 V100s, not
from a measurement: the solver's time depends on the grid's size and how many distinct values it
holds (every entry differs here), not on where the numbers came from.

Usage: python benchmarks/bench_solver.py [--repeats 7]
"""
import argparse
import statistics
import time

import numpy as np

from seqpipe_ds.planner import LatencyModel, solve

SEQ_LEN, GRANULARITY, BATCH, STAGES = 2048, 8, 2, 96
HIDDEN, TP, FP16_BYTES = 12288, 4, 2
PEAK_FLOPS = 75e12  # a V100 at ~60% of its fp16 peak
HBM_BYTES_PER_S = 900e9
LINK_BYTES_PER_S = 12.5e9  # 100 Gb/s between nodes


def gpt3_175b_layer_model() -> LatencyModel:
    flops_per_token = 72 * HIDDEN ** 2 / TP  # forward + backward of the dense layers of one layer
    lengths = list(range(GRANULARITY, SEQ_LEN + 1, GRANULARITY))
    no_context = []
    for b in (1, 2):
        tokens = b * np.array(lengths, dtype=float)
        # Short slices leave the GPU under-used: efficiency tokens / (tokens + 128), plus launch costs.
        t0 = 50e-6 + tokens * flops_per_token / PEAK_FLOPS * (tokens + 128) / tokens
        # Causal attention over the slice itself: l^2 / 2 query-key pairs, 12 * hidden flops each.
        t0 += b * np.array(lengths, dtype=float) ** 2 / 2 * 12 * HIDDEN / TP / PEAK_FLOPS
        no_context.append([float(v) for v in t0])
    return LatencyModel(
        batch_sizes=[1, 2], lengths=[lengths, lengths], no_context=no_context,
        context_coef=[20e-6, 0.0, 2 * 2 * HIDDEN * FP16_BYTES / TP / HBM_BYTES_PER_S, 12 * HIDDEN / TP / PEAK_FLOPS],
        send_coef=[20e-6, 1 / LINK_BYTES_PER_S], bytes_per_token=HIDDEN * FP16_BYTES, update_time=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    grid = gpt3_175b_layer_model().grid(BATCH, SEQ_LEN, GRANULARITY)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        plan = solve(grid, BATCH, SEQ_LEN, STAGES, GRANULARITY)
        times.append(time.perf_counter() - start)
    distinct = np.unique(grid[np.isfinite(grid)]).size
    print(f"grid {grid.shape}, {distinct} distinct slice times, {STAGES} stages")
    print(f"plan: batch slices {plan.batch_slices}, {sum(map(len, plan.input_slices))} slices, "
          f"predicted {plan.latency:.4f} s")
    for b, slices in zip(plan.batch_slices, plan.input_slices):
        print(f"  b={b}: {slices}")
    unsliced = float(grid[BATCH, SEQ_LEN // GRANULARITY, 0]) * STAGES
    print(f"one slice of the whole batch: {unsliced:.4f} s ({unsliced / plan.latency:.2f}x slower)")
    print(f"solve: median {statistics.median(times):.3f} s over {args.repeats} runs "
          f"(min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()
