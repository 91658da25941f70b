"""How steady this machine's speed is: the same fixed matmul loop (50 products of 512 x 512, one
thread) timed ten times in a row, then the slowest over the fastest.

Why: benchmark ratios are only as good as the machine holds still. On the 2-core AMD EPYC VM of
2026-12-02 the same loop took 0.40-0.86 s, switching between two speeds within seconds, so a
benchmark's identical variants spread up to 20% in one run. Run it before and after a benchmark and
report it beside the ratios.

    python benchmarks/host_speed.py [--rounds 4]
"""
import argparse
import time

import torch


def loop_times(loops: int = 10, products: int = 50, size: int = 512):
    torch.set_num_threads(1)
    a = torch.randn(size, size)
    times = []
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(products):
            a @ a
        times.append(time.perf_counter() - start)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    for _ in range(args.rounds):
        times = loop_times()
        print(" ".join(f"{t:.3f}" for t in times), f"s; slowest / fastest {max(times) / min(times):.2f}")


if __name__ == "__main__":
    main()
