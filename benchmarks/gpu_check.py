"""The CUDA check of sliced attention: exactness of a small GPT, and the slicing overhead of a
GPT3-1B layer. ``scripts/gpu_check.sh`` runs it on the GPU machine; ``--device cpu --tiny`` runs
the same code on CPU at toy sizes (the test suite does, so that it cannot rot unseen).

1. Block attention alone (``attend`` inside a cache) against SDPA with a bottom-right causal mask
   over the concatenated K/V, then a small GPT (embedding, 2 layers, tied head, loss) run whole
   and in uneven slices: loss and every parameter gradient, fp32 (rel <= 1e-5) and bf16 (rel <=
   1e-2 on outputs/loss, 5e-2 on gradients, the bounds of the engine's bf16 exactness tests); and
   the same slices with the backward split (``slice-zb``'s B under ``wgrad.deferring``, every W
   after the last B), which on CUDA runs the linear backwards on autograd's device thread; and the
   same GPT on packed documents (``reset_attention_mask`` / ``reset_position_ids``, EOD tokens cut
   slices and rows): whole it attends with SDPA and the dense document mask, sliced per document
   segment and cached block (``attention/documents.py``).
2. One GPT3-1B layer (hidden 2048, 16 heads, seq 2048, bf16; TeraPipe's setting 1 model): summed
   per-slice forward + backward time over the unsliced time for k = 1, 2, 4, 8, 16 slices.

Usage: python benchmarks/gpu_check.py [--device cuda|cpu] [--tiny] [--out FILE]
Exits non-zero when a check fails; the JSON holds every measured error and time either way.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_slicing_overhead as overhead  # noqa: E402

BOUNDS = {"fp32": {"out": 1e-5, "grad": 1e-5}, "bf16": {"out": 1e-2, "grad": 5e-2}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = {  # the small GPT of part 1 and the layer of part 2
    "full": {"gpt": dict(hidden=256, heads=4, seq=512, batch=2, slices=[200, 120, 1, 95, 96]),
             "layer": dict(hidden=2048, heads=16, seq=2048, counts=[1, 2, 4, 8, 16], repeats=5)},
    "tiny": {"gpt": dict(hidden=32, heads=4, seq=24, batch=2, slices=[11, 2, 1, 10]),
             "layer": dict(hidden=128, heads=2, seq=64, counts=[1, 2, 4], repeats=1)},
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_blocks(device, dtype, lengths, heads=4, kv_heads=2, head_dim=64):
    """Worst rel. error of the last slice's output and every gradient, block attention vs masked SDPA."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from seqpipe_ds.attention import KVCache, attend
    g = torch.Generator(device=device).manual_seed(0)
    total = sum(lengths)
    q = torch.randn(1, heads, lengths[-1], head_dim, device=device, generator=g, dtype=dtype)
    k, v = [torch.randn(1, kv_heads, total, head_dim, device=device, generator=g, dtype=dtype) for _ in range(2)]
    grad = torch.randn_like(q)
    ks, vs = list(k.split(lengths, dim=2)), list(v.split(lengths, dim=2))

    cache = KVCache()
    for i in range(len(lengths) - 1):
        with cache.slice(i):
            cache.record(0, ks[i], vs[i])
    own = [t.clone().requires_grad_() for t in (q, ks[-1], vs[-1])]
    with cache.slice(len(lengths) - 1):
        out = attend(*own, cache, 0)
    out.backward(grad)
    cached = [cache.backward_args(i, [], [])[1] for i in range(len(lengths) - 1)]
    got = [out, own[0].grad, torch.cat([c[0] for c in cached] + [own[1].grad], 2),
           torch.cat([c[1] for c in cached] + [own[2].grad], 2)]

    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=causal_lower_right(q.shape[2], total), enable_gqa=True)
    ref.backward(grad)
    want = [ref, ref_in[0].grad, ref_in[1].grad, ref_in[2].grad]
    return {"out": rel_err(got[0].detach(), want[0].detach()),
            "grad": max(rel_err(a, b) for a, b in zip(got[1:], want[1:]))}


def gpt_step(module, batch, lengths=None, split=False):
    """Loss and parameter gradients of one step, whole (lengths None) or slice by slice; ``split``:
    each slice's backward as B, its W queued and run after every B."""
    from seqpipe_ds.attention import KVCache
    from seqpipe_ds.model import wgrad
    module.zero_grad(set_to_none=True)
    inputs, labels = batch
    if lengths is None:
        loss = module.loss_fn(module(inputs), labels)
        loss.backward()
    else:
        cache, losses = KVCache(), []
        normalizer = module.loss_fn.normalizer(labels)
        split = [[t.split(lengths, dim=1) for t in part] for part in batch]
        for j in range(len(lengths)):
            with cache.slice(j):
                logits = module(tuple(t[j] for t in split[0]))
            losses.append(module.loss_fn(logits, tuple(t[j] for t in split[1]), normalizer=normalizer))
        queues = []
        for j in reversed(range(len(lengths))):
            queues.append(wgrad.WeightGrads())
            with wgrad.deferring(queues[-1]) if split else contextlib.nullcontext():
                torch.autograd.backward(*cache.backward_args(j, [losses[j]], [None]))
            cache.release(j)
        for queue in queues:
            queue.run()
        loss = sum(l.detach() for l in losses)
    return loss.detach().float(), {n: p.grad.float() for n, p in module.named_parameters()}


def check_gpt(topology, device, dtype, hidden, heads, seq, batch, slices, split=False, documents=False):
    """``documents``: EOD (token 0) every 7th token of row 0 and at a few places of the others."""
    from seqpipe_ds.data import document_starts
    from seqpipe_ds.model import GPTConfig, gpt_pipeline
    config = GPTConfig(num_layers=2, hidden_size=hidden, num_attention_heads=heads, vocab_size=128,
                       max_position_embeddings=seq, params_dtype=dtype, reset_attention_mask=documents,
                       reset_position_ids=documents)
    module = gpt_pipeline(config, topology, seed=7).to(device)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(1, 128, (batch, seq + 1), generator=g)
    positions, loss_mask = torch.arange(seq).expand(batch, seq), torch.ones(batch, seq)
    inputs = (data[:, :-1], positions)
    if documents:
        data[0, 6::7] = 0
        data[1:, [1, 2, seq // 2, seq - 3]] = 0
        starts = document_starts(data[:, :-1], 0)
        loss_mask = (data[:, :-1] != 0).float()
        inputs = (data[:, :-1], positions - starts, starts)
    batch = tuple(tuple(t.contiguous().to(device) for t in part) for part in (inputs, (data[:, 1:], loss_mask)))
    loss, grads = gpt_step(module, batch)
    s_loss, s_grads = gpt_step(module, batch, slices, split)
    return {"out": rel_err(s_loss, loss), "grad": max(rel_err(s_grads[n], grads[n]) for n in grads),
            "tensors": len(grads)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU smoke test)")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    sizes = SIZES["tiny" if args.tiny else "full"]
    from seqpipe_ds import parallel
    topology = parallel.initialize(tensor_parallel_size=1)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "checks": {}, "bounds": BOUNDS}
    try:
        start = time.perf_counter()
        for name, dtype in DTYPES.items():
            report["checks"][f"blocks {name}"] = check_blocks(device, dtype, sizes["gpt"]["slices"])
            report["checks"][f"gpt {name}"] = check_gpt(topology, device, dtype, **sizes["gpt"])
            report["checks"][f"gpt split {name}"] = check_gpt(topology, device, dtype, **sizes["gpt"], split=True)
            report["checks"][f"gpt documents {name}"] = check_gpt(topology, device, dtype, **sizes["gpt"],
                                                                  documents=True)
        report["check_seconds"] = time.perf_counter() - start
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        layer = sizes["layer"]
        report["layer"] = {**{k: v for k, v in layer.items()}, "dtype": "bf16", "layers": 1,
                           "slices": overhead.measure(layer["hidden"], layer["seq"], layer["counts"], layer["repeats"],
                                                      layers=1, heads=layer["heads"], sync=sync, dtype=torch.bfloat16,
                                                      device=device, profile=False)}
    finally:
        parallel.destroy()
    failed = [f"{name}: {kind} {errors[kind]:.2e} > {BOUNDS[name.split()[-1]][kind]:.0e}"
              for name, errors in report["checks"].items() for kind in ("out", "grad")
              if not errors[kind] <= BOUNDS[name.split()[-1]][kind]]
    report["failed"] = failed
    for name, errors in report["checks"].items():
        print(f"{name:19s} out {errors['out']:.2e}  grad {errors['grad']:.2e}")
    print(f"layer hidden {layer['hidden']}, {layer['heads']} heads, seq {layer['seq']}, bf16: k, time_ratio, seconds")
    for k, r in report["layer"]["slices"].items():
        print(f"  {k:>3} {r['time_ratio']:6.3f} {r['seconds']:8.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print("FAILED: " + "; ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
