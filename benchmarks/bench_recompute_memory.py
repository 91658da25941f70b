"""Peak bytes saved for backward of the Llama-style GPT run in sequence slices over the KV cache (one
process, CPU), without recomputation and with full / selective recomputation, and the gradients'
largest relative difference to the run without.

    python benchmarks/bench_recompute_memory.py [--hidden 512 --heads 8 --groups 4 --seq 1024 --layers 4 --slices 4]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import launcher  # noqa: E402  (tests/launcher.py: spawns the process with a timeout)


def measure(hidden, heads, groups, seq, layers, slices):
    import torch

    from common import make_batch, rel_err
    from seqpipe_ds import parallel
    from seqpipe_ds.attention import KVCache
    from seqpipe_ds.memory import SavedTensorMeter
    from seqpipe_ds.model import gpt_pipeline, presets
    batch = make_batch(1, seq, 512, seed=1)
    pieces = [[t.chunk(slices, dim=1) for t in part] for part in batch]
    out = {}
    for granularity in (None, "full", "selective"):
        config = presets.gpt_config("llama2-7b", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                    num_query_groups=groups, ffn_hidden_size=int(8 * hidden / 3 / 64) * 64,
                                    seq_length=seq, vocab_size=512, recompute_granularity=granularity)
        module = gpt_pipeline(config, parallel.initialize(), seed=3)
        meter, cache, losses = SavedTensorMeter(module.parameters()), KVCache(), []
        normalizer = module.loss_fn.normalizer(batch[1])
        with meter.hooks():
            for j in range(slices):  # forwards in order, then backwards in reverse, as the engine runs them
                with cache.slice(j):
                    logits = module(tuple(t[j] for t in pieces[0]))
                losses.append(module.loss_fn(logits, tuple(t[j] for t in pieces[1]), normalizer=normalizer))
            for j in reversed(range(slices)):
                torch.autograd.backward(*cache.backward_args(j, [losses[j]], [None]))
                cache.release(j)
        out[granularity] = meter.peak, {n: p.grad for n, p in module.named_parameters()}
    base = out[None][1]
    return {g: (peak, max(rel_err(grads[k], base[k]) for k in base)) for g, (peak, grads) in out.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--slices", type=int, default=4)
    a = p.parse_args()
    result = launcher.run(measure, 1, timeout=600, hidden=a.hidden, heads=a.heads, groups=a.groups, seq=a.seq,
                          layers=a.layers, slices=a.slices)[0]
    print(f"{a.layers} layers, hidden {a.hidden}, seq {a.seq} in {a.slices} slices:")
    for granularity, (peak, err) in result.items():
        print(f"  recompute {str(granularity):9}: {peak / 2 ** 20:7.1f} MiB saved for backward (peak); "
              f"gradients vs none {err:.1e}")


if __name__ == "__main__":
    main()
