"""Sliced attention inside a model stage: K/V bytes saved for backward that do not grow with the
number of slices, and the dropout path (one masked SDPA over the concatenated K/V)."""
import os
import sys

import pytest
import torch

import launcher
from common import assert_close

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SLICES = [1, 4, 16]


def saved_per_slice_count():
    sys.path.insert(0, BENCHMARKS)
    import bench_slicing_overhead as bench
    from seqpipe_ds import parallel
    parallel.initialize(tensor_parallel_size=1)
    torch.manual_seed(0)
    seq, hidden = 64, 128
    stage = bench.build_stage(hidden, seq)
    x = torch.randn(2, seq, hidden)
    grad = torch.randn_like(x)
    return {k: bench.saved_bytes(stage, lambda: bench.run_sliced(stage, x, grad, bench.uniform(seq, k)))
            for k in SLICES}


@pytest.mark.timeout(120)
def test_saved_bytes_do_not_grow_with_slices():
    saved = launcher.run(saved_per_slice_count, 1)[0]
    # A whole stage: 2 layers' activations are ~10x attention's K/V, so the concatenating version's
    # extra K/V copies (k(k-1)/2 slices' worth per layer) showed as +29% at k = 4, +106% at k = 16 here.
    assert saved[1] > 0
    for k in SLICES[1:]:
        assert saved[k] <= 1.10 * saved[1], f"{k} slices save {saved[k]} bytes, unsliced {saved[1]}"


def dropout_fallback():
    from megatron.core import tensor_parallel
    from torch.nn.attention.bias import causal_lower_right

    from seqpipe_ds import parallel
    from seqpipe_ds.attention import KVCache, attend
    parallel.initialize(tensor_parallel_size=1)
    torch.manual_seed(0)
    k0, v0, q1, k1, v1 = [torch.randn(2, 4, n, 8) for n in (5, 5, 3, 3, 3)]
    grad = torch.randn(2, 4, 3, 8)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()

    cache = KVCache()
    with cache.slice(0):
        cache.record(0, k0, v0)
    q, k, v = [t.clone().requires_grad_() for t in (q1, k1, v1)]
    with cache.slice(1):
        out = attend(q, k, v, cache, 0, dropout=0.5)
    out.backward(grad)
    sliced = {"out": out, "dq": q.grad, "dk1": k.grad, "dv1": v.grad,
              **dict(zip(("dk0", "dv0"), cache.backward_args(0, [], [])[1]))}

    tracker.set_states(states)  # the same dropout mask for the reference
    q, k, v = [t.clone().requires_grad_() for t in (q1, torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))]
    with tracker.fork():
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(3, 8),
                                                               dropout_p=0.5)
    ref.backward(grad)
    undropped = torch.nn.functional.scaled_dot_product_attention(q1, k, v, attn_mask=causal_lower_right(3, 8))
    return undropped, sliced, {"out": ref, "dq": q.grad, "dk1": k.grad[:, :, 5:], "dv1": v.grad[:, :, 5:],
                    "dk0": k.grad[:, :, :5], "dv0": v.grad[:, :, :5]}


@pytest.mark.timeout(120)
def test_dropout_falls_back_to_masked_sdpa():
    undropped, sliced, reference = launcher.run(dropout_fallback, 1)[0]
    assert_close({n: t.detach() for n, t in sliced.items()}, {n: t.detach() for n, t in reference.items()},
                 what="dropout")
    assert not torch.allclose(sliced["out"], undropped)  # dropout did drop
