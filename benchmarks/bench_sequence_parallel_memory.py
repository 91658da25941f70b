"""Bytes saved for backward per TP rank with and without Megatron sequence parallelism (TP 2, CPU).

Layers of the Llama-style model (RMSNorm, SwiGLU, GQA, RoPE, no biases), one forward of a whole
sequence per TP rank under seqpipe_ds.memory.SavedTensorMeter; prints the peak per rank.

    python benchmarks/bench_sequence_parallel_memory.py [--hidden 512 --heads 8 --groups 4 --seq 1024 --layers 2]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import launcher  # noqa: E402  (tests/launcher.py: spawns the ranks with a timeout)


def measure(hidden, heads, groups, seq, layers, sequence_parallel):
    import torch

    from seqpipe_ds import parallel
    from seqpipe_ds.memory import SavedTensorMeter
    from seqpipe_ds.model import TransformerLayer, presets
    parallel.initialize(tensor_parallel_size=2)
    config = presets.gpt_config("llama2-7b", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                num_query_groups=groups, ffn_hidden_size=int(8 * hidden / 3 / 64) * 64, seq_length=seq,
                                vocab_size=256, sequence_parallel=sequence_parallel)
    stage = torch.nn.Sequential(*[TransformerLayer(config, i) for i in range(layers)])
    tokens = seq // 2 if sequence_parallel else seq  # (T / TP, B, h) under SP, else (B, T, h)
    x = torch.randn((tokens, 1, hidden) if sequence_parallel else (1, seq, hidden), requires_grad=True)
    meter = SavedTensorMeter(stage.parameters())
    with meter.hooks():
        out = stage(x)
    peak = meter.peak
    out.sum().backward()
    return peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    a = p.parse_args()
    for sp in (False, True):
        peaks = launcher.run(measure, 2, timeout=300, hidden=a.hidden, heads=a.heads, groups=a.groups, seq=a.seq,
                             layers=a.layers, sequence_parallel=sp)
        print(f"sequence_parallel={sp}: bytes saved for backward per TP rank "
              f"{', '.join(f'{b / 2 ** 20:.1f} MiB' for b in peaks)} ({a.layers} layers, hidden {a.hidden}, "
              f"seq {a.seq}, TP 2)")


if __name__ == "__main__":
    main()
