"""What layout-invariant hidden dropout costs a training step, beside torch's own dropout.

The README's default GPT (seqpipe-bench's: 4 layers, hidden 512, 8 heads, vocabulary 384, seq 1024,
batch 1) on one process: the
forward and backward of the whole model (embedding to loss) with hidden dropout

- ``off``: p = 0 (no mask at all);
- ``hashed``: p = 0.1 with seqpipe's masks (``seqpipe_ds.model.dropout``: 9 masks of 1024 x 512 per
  step, each hashed from sample, stream, position and channel);
- ``torch``: p = 0.1 with ``torch.nn.functional.dropout`` in the same places (generator draws, what
  the model ran before; not layout-invariant).

Repetitions alternate over the three, medians and min-max are printed, plus each mask's own time.
Usage: python benchmarks/bench_dropout_cost.py [--repeats 7] [--out FILE]
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SEQ = 1024


def build(p: float):
    """seqpipe-bench's default GPT (vocabulary 384: the embedded corpus' byte-level tokenizer, padded)."""
    from seqpipe_ds import parallel
    from seqpipe_ds.cli.bench import DEFAULT_SHAPE
    from seqpipe_ds.model import GPTConfig, gpt_pipeline
    shape = {k: v for k, v in DEFAULT_SHAPE.items() if k != "seq_length"}
    config = GPTConfig(**shape, max_position_embeddings=SEQ, hidden_dropout=p)
    return gpt_pipeline(config, parallel.initialize(), seed=1)


def torch_dropout(module):
    """The same model with torch's generator-drawn dropout in place of every hashed mask."""
    from seqpipe_ds.model.dropout import HiddenDropout
    for layer in module.modules():
        if isinstance(layer, HiddenDropout):
            layer.forward = lambda x, p=layer.p: F.dropout(x, p, training=True)
    return module


def step(module, batch) -> float:
    from seqpipe_ds.model import dropout
    (tokens, positions), labels = batch
    start = time.perf_counter()
    with dropout.samples(dropout.Samples(seed=1, numbers=torch.arange(tokens.shape[0]))):
        module.loss_fn(module((tokens, positions)), labels).backward()
    elapsed = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    return elapsed


def mask_time(repeats: int) -> float:
    from seqpipe_ds.model.dropout import keep_mask
    positions, numbers, times = torch.arange(SEQ), torch.arange(1), []
    for _ in range(repeats):
        start = time.perf_counter()
        keep_mask(1, numbers, 3, positions, 512, 0.1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="write the medians as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokens = torch.randint(0, 257, (1, SEQ + 1))
    batch = ((tokens[:, :-1], torch.arange(SEQ)[None]), (tokens[:, 1:], torch.ones(1, SEQ)))
    variants = {"off": build(0.0), "hashed": build(0.1), "torch": torch_dropout(build(0.1))}
    for module in variants.values():
        step(module, batch)  # warm-up
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, module in variants.items():
            times[name].append(step(module, batch))
    off = statistics.median(times["off"])
    print(f"GPT 4 layers, hidden 512, seq 1024, batch 1, one process, 1 thread; {args.repeats} alternating repeats")
    print(f"{'dropout':<10}{'step s (min-max)':>24}{'x off':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<10}{median:>10.3f} ({min(values):.3f}-{max(values):.3f}){median / off:>8.3f}")
    per_mask = mask_time(args.repeats)
    print(f"one hashed 1024 x 512 mask: {per_mask * 1e3:.1f} ms; 9 per step: {9 * per_mask * 1e3:.0f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({name: statistics.median(v) for name, v in times.items()} | {"mask_s": per_mask}, f, indent=1)


if __name__ == "__main__":
    main()
