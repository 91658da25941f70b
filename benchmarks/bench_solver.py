"""Time of ``solve`` on a grid the size of GPT3-175B's plan (seq 2048, granularity 8, batch 2,
96 stages: grid shape (3, 257, 257)).

The grid comes from a latency model with textbook numbers for one 175B layer on TP=4 V100s, not
from a measurement: the solver's time depends on the grid's size and on how many distinct values
it holds (here nearly every entry differs), not on where the numbers came from. A second grid
makes attention 30x dearer, which moves the optimum to uneven slices (long first, short last),
so that the timing does not hinge on the plan being uniform.

Usage: python benchmarks/bench_solver.py [--repeats 7]
"""
import argparse
import statistics
import time

import numpy as np

from seqpipe_ds.planner import LatencyModel, solve

SEQ_LEN, GRANULARITY, BATCH, STAGES = 2048, 8, 2, 96
HIDDEN, HEADS, TP, FP16_BYTES = 12288, 96, 4, 2
PEAK_FLOPS = 75e12  # a V100 at ~60% of its fp16 peak
HBM_BYTES_PER_S = 900e9
LINK_BYTES_PER_S = 12.5e9  # 100 Gb/s between nodes
SOFTMAX_BYTES_PER_SCORE = 10  # unfused attention: scores written, read, masked, normalised


def gpt3_175b_layer_model(attention_scale: float = 1.0) -> LatencyModel:
    flops_per_token = 72 * HIDDEN ** 2 / TP  # forward + backward of the dense layers of one layer
    # One query-key pair: 12 * hidden flops (QK^T and AV, forward + backward), plus the softmax's
    # memory traffic for each of this rank's heads.
    per_pair = attention_scale * (12 * HIDDEN / TP / PEAK_FLOPS +
                                  HEADS / TP * SOFTMAX_BYTES_PER_SCORE / HBM_BYTES_PER_S)
    lengths = np.arange(GRANULARITY, SEQ_LEN + 1, GRANULARITY, dtype=float)
    no_context = []
    for b in (1, 2):
        tokens = b * lengths
        # Short slices leave the GPU under-used: efficiency tokens / (tokens + 128), plus launch costs.
        t0 = 50e-6 + flops_per_token / PEAK_FLOPS * (tokens + 128) + b * lengths ** 2 / 2 * per_pair
        no_context.append([float(v) for v in t0])
    read_cache = 2 * HIDDEN * FP16_BYTES / TP / HBM_BYTES_PER_S  # K and V of one cached token
    return LatencyModel(batch_sizes=[1, 2], lengths=[[int(v) for v in lengths]] * 2, no_context=no_context,
                        context_coef=[20e-6, 0.0, read_cache, per_pair], send_coef=[20e-6, 1 / LINK_BYTES_PER_S],
                        message_bytes_per_token=HIDDEN * FP16_BYTES, update_time=0.0)


def bench(name: str, grid: np.ndarray, repeats: int) -> None:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan = solve(grid, BATCH, SEQ_LEN, STAGES, GRANULARITY)
        times.append(time.perf_counter() - start)
    distinct = np.unique(grid[np.isfinite(grid)]).size
    unsliced = float(grid[BATCH, SEQ_LEN // GRANULARITY, 0]) * STAGES
    print(f"{name}: grid {grid.shape}, {distinct} distinct slice times, {STAGES} stages")
    for b, slices in zip(plan.batch_slices, plan.input_slices):
        print(f"  batch slice of {b}: {len(slices)} slices {slices}")
    print(f"  predicted {plan.latency:.4f} s; one slice of the whole batch {unsliced:.4f} s "
          f"({unsliced / plan.latency:.2f}x)")
    print(f"  solve: median {statistics.median(times):.3f} s over {repeats} runs "
          f"(min {min(times):.3f}, max {max(times):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    bench("textbook GPT3-175B layer", gpt3_175b_layer_model().grid(BATCH, SEQ_LEN, GRANULARITY), args.repeats)
    bench("attention x30", gpt3_175b_layer_model(30.0).grid(BATCH, SEQ_LEN, GRANULARITY), args.repeats)


if __name__ == "__main__":
    main()
