"""What cutting a sequence into slices costs one pipeline stage: time and bytes saved for backward.

One stage (2 GPT layers, batch 1, seq 2048) runs the sequence as k = 1, 2, 4, 8, 16 uniform
slices the way the engine does: every slice's forward inside its ``KVCache.slice``, then the
backwards in reverse, each fed the dK/dV that later slices left on its cached K/V. Per k:

- ``time_ratio``: summed per-slice forward + backward time over the unsliced time. Repetitions
  alternate over k, so that drift of the machine hits every k alike, and each k keeps its
  fastest: on a shared 2-core machine other processes only ever add time (load averages of 9
  were seen here), so the minimum is the estimate least disturbed by them;
- ``saved_mib``: bytes saved for backward over all slices of one run (all forwards run before
  the first backward, so the peak is the sum), counted by ``seqpipe_ds.memory.SavedTensorMeter``:
  once per storage, parameters excluded;
- ``accumulate_share``: the share of the run spent in autograd's gradient accumulation
  (``AccumulateGrad``: parameter gradients of every slice after the first, and the dK/dV that
  each later slice adds to a cached slice's leaves), from torch.profiler on one extra run.

Usage: python benchmarks/bench_slicing_overhead.py [--out FILE] [--hidden 512 1024] [--slices 1 2 4 8 16]
Prints a table and writes {"<hidden>": {"<k>": {"time_ratio": r, "saved_mib": m, ...}}} to FILE.
"""
import argparse
import json
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

HEAD_DIM = 64
MIB = 2 ** 20


def build_stage(hidden: int, seq: int, layers: int = 2, heads: Optional[int] = None, dtype=torch.float32,
                device="cpu") -> torch.nn.Module:
    """``layers`` GPT layers (default: hidden / 64 heads) of one pipeline stage; needs megatron's groups."""
    from seqpipe_ds.model import GPTConfig, TransformerLayer
    config = GPTConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads or hidden // HEAD_DIM,
                       vocab_size=128, max_position_embeddings=seq, params_dtype=dtype)
    return torch.nn.Sequential(*[TransformerLayer(config, i) for i in range(layers)]).to(device)


def run_sliced(stage: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, lengths: Sequence[int]) -> None:
    """Forward + backward of x (B, T, h) in slices of ``lengths``, in the engine's order."""
    from seqpipe_ds.attention import KVCache
    cache = KVCache()
    outputs = []
    for j, part in enumerate(x.split(list(lengths), dim=1)):
        with cache.slice(j):  # a received activation is a leaf of its own per slice
            outputs.append(stage(part.detach().requires_grad_()))
    for j, part_grad in reversed(list(enumerate(grad.split(list(lengths), dim=1)))):
        torch.autograd.backward(*cache.backward_args(j, [outputs[j]], [part_grad]))
        cache.release(j)


def uniform(seq: int, k: int) -> List[int]:
    return [seq // k + (i < seq % k) for i in range(k)]


def saved_bytes(stage: torch.nn.Module, fn: Callable[[], None]) -> int:
    """Peak bytes that ``fn`` holds saved for backward (distinct storages, parameters excluded)."""
    from seqpipe_ds.memory import SavedTensorMeter
    meter = SavedTensorMeter(stage.parameters())
    with meter.hooks():
        fn()
    return meter.peak


def accumulate_share(fn: Callable[[], None]) -> float:
    """Share of ``fn``'s time spent in autograd's AccumulateGrad nodes."""
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - start
    # The profiler records an AccumulateGrad event inside each AccumulateGrad node: count the outer one only.
    accumulate = sum(e.cpu_time_total for e in prof.events() if "AccumulateGrad" in e.name
                     and not (e.cpu_parent is not None and "AccumulateGrad" in e.cpu_parent.name)) / 1e6
    return accumulate / wall


def measure(hidden: int, seq: int, counts: Sequence[int], repeats: int, layers: int = 2, heads: Optional[int] = None,
            sync: Callable[[], None] = lambda: None, dtype=torch.float32, device="cpu",
            profile: bool = True) -> Dict[str, Dict[str, float]]:
    torch.manual_seed(0)
    stage = build_stage(hidden, seq, layers, heads, dtype, device)
    x = torch.randn(1, seq, hidden, dtype=dtype, device=device)
    grad = torch.randn_like(x)

    def run(k):
        # As at a step's start: the first slice's gradient is stored, later slices' are added.
        stage.zero_grad(set_to_none=True)
        run_sliced(stage, x, grad, uniform(seq, k))

    times = {k: [] for k in counts}
    for rep in range(repeats + 1):  # round 0 warms up allocator and kernel choices
        for k in counts:
            sync()
            start = time.perf_counter()
            run(k)
            sync()
            if rep:
                times[k].append(time.perf_counter() - start)
    base = min(times[counts[0]])
    results = {}
    for k in counts:
        entry = {"time_ratio": min(times[k]) / base, "seconds": min(times[k]),
                 "saved_mib": saved_bytes(stage, lambda: run(k)) / MIB}
        if profile:
            entry["accumulate_share"] = accumulate_share(lambda: run(k))
        results[str(k)] = entry
    return results


def table(results: Dict[str, Dict[str, Dict[str, float]]], seq: int) -> str:
    lines = [f"one stage: 2 GPT layers, batch 1, seq {seq}, {torch.get_num_threads()} thread(s); time_ratio = "
             "summed slice forward+backward / unsliced (fastest of the repetitions)",
             f"{'hidden':>6} {'k':>3} {'seconds':>8} {'time_ratio':>10} {'saved_mib':>10} {'accumulate':>10}"]
    for hidden, per_k in results.items():
        for k, r in per_k.items():
            share = f"{100 * r['accumulate_share']:9.1f}%" if "accumulate_share" in r else f"{'-':>10}"
            lines.append(f"{hidden:>6} {k:>3} {r['seconds']:8.3f} {r['time_ratio']:10.3f} {r['saved_mib']:10.1f} "
                         f"{share}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--slices", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.slices[0] != 1:
        raise ValueError("--slices must start with 1: ratios are taken against the unsliced run")
    torch.set_num_threads(args.threads)
    from seqpipe_ds import parallel
    parallel.initialize(tensor_parallel_size=1)
    try:
        results = {str(h): measure(h, args.seq, args.slices, args.repeats) for h in args.hidden}
    finally:
        parallel.destroy()
    print(table(results, args.seq))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
