"""Peak bytes saved for backward of the unsliced Llama-style GPT (one process, CPU) without and with
DeepSpeed's full recomputation of every transformer layer (activation_checkpoint_interval 1), and
the gradients' largest relative difference between the two.

    python benchmarks/bench_recompute_memory.py [--hidden 512 --heads 8 --groups 4 --seq 1024 --layers 4]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import launcher  # noqa: E402  (tests/launcher.py: spawns the process with a timeout)


def measure(hidden, heads, groups, seq, layers):
    from common import make_batch, rel_err
    from seqpipe_ds import parallel
    from seqpipe_ds.memory import SavedTensorMeter
    from seqpipe_ds.model import gpt_pipeline, presets
    config = presets.gpt_config("llama2-7b", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                num_query_groups=groups, ffn_hidden_size=int(8 * hidden / 3 / 64) * 64, seq_length=seq,
                                vocab_size=512)
    batch = make_batch(1, seq, config.vocab_size, seed=1)
    peaks, grads = [], []
    for interval in (0, 1):
        module = gpt_pipeline(config, parallel.initialize(), seed=3, activation_checkpoint_interval=interval)
        module._precompute_checkpointable_values()  # DeepSpeed's pipeline engine does it at set-up
        meter = SavedTensorMeter(module.parameters())
        with meter.hooks():
            module.loss_fn(module(batch[0]), batch[1]).backward()
        peaks.append(meter.peak)
        grads.append({n: p.grad for n, p in module.named_parameters()})
    return peaks, max(rel_err(grads[1][k], grads[0][k]) for k in grads[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args()
    (plain, recomputed), err = launcher.run(measure, 1, timeout=600, hidden=a.hidden, heads=a.heads, groups=a.groups,
                                            seq=a.seq, layers=a.layers)[0]
    print(f"{a.layers} layers, hidden {a.hidden}, seq {a.seq}: bytes saved for backward {plain / 2 ** 20:.1f} MiB, "
          f"with full recomputation {recomputed / 2 ** 20:.1f} MiB; gradients differ by {err:.1e} (relative)")


if __name__ == "__main__":
    main()
