"""Block attention over the KV cache equals SDPA with a bottom-right causal mask over the
concatenated K/V, in value and in the gradients of Q, the slice's own K/V and every cached block."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from common import rel_err
from seqpipe_ds.attention import KVCache, attend, current

HEAD_DIM = 8
# bf16: the block merge rounds each block's output to bf16 before merging it in fp32, SDPA rounds
# once; measured rel. errors against bf16 SDPA are 2e-3..4e-3 (bf16's epsilon is 7.8e-3).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

CASES = {  # name: (slice lengths, batch, query heads, K/V heads)
    "uniform": ([6, 6, 6, 6], 1, 4, 4),
    "uneven": ([11, 2, 7, 4], 2, 4, 4),
    "single tokens": ([1] * 9, 2, 4, 4),
    "long after short": ([1, 3, 17], 3, 4, 4),
    "tp2 heads": ([5, 9, 4], 2, 2, 2),  # a 4-head model's share on one of two TP ranks
    "gqa 2 groups": ([7, 5, 6], 2, 4, 2),
    "gqa 1 kv head": ([3, 1, 8, 2], 2, 4, 1),
}


def _tensors(lengths, batch, heads, kv_heads, dtype, seed):
    """Per slice: q (B, nh, s, hd), k, v (B, n_kv, s, hd) and an output gradient (B, nh, s, hd)."""
    g = torch.Generator().manual_seed(seed)

    def rand(h, s):
        return torch.randn(batch, h, s, HEAD_DIM, generator=g).to(dtype)

    return [(rand(heads, s), rand(kv_heads, s), rand(kv_heads, s), rand(heads, s)) for s in lengths]


def _reference(q, ks, vs, grad):
    """SDPA of q over the concatenation of ks/vs with a bottom-right causal mask; out and grads."""
    q = q.clone().requires_grad_()
    ks = [k.clone().requires_grad_() for k in ks]
    vs = [v.clone().requires_grad_() for v in vs]
    keys, values = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(q.shape[2], keys.shape[2]),
                                         enable_gqa=q.shape[1] != keys.shape[1])
    out.backward(grad)
    return out.detach(), q.grad, [k.grad for k in ks], [v.grad for v in vs]


def _blocks(slices, j):
    """Slice j through attend() after slices < j were cached; out and the grads of q, own and cached K/V."""
    cache = KVCache()
    for i, (_, k, v, _) in enumerate(slices[:j]):
        with cache.slice(i):
            cache.record(0, k, v)
    q, k, v, grad = [t.clone().requires_grad_() for t in slices[j]]
    with cache.slice(j):
        out = attend(q, k, v, cache, 0)
    out.backward(grad)
    # backward_args(i) pairs slice i's own K/V with the gradients that slice j left on its leaves.
    cached = [cache.backward_args(i, [], [])[1] for i in range(j)]
    return out.detach(), q.grad, [g[0] for g in cached] + [k.grad], [g[1] for g in cached] + [v.grad]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_blocks_equal_masked_sdpa_over_concatenation(case, dtype):
    lengths, batch, heads, kv_heads = CASES[case]
    slices = _tensors(lengths, batch, heads, kv_heads, dtype, seed=len(case))
    for j in range(1, len(lengths)):
        got = _blocks(slices, j)
        want = _reference(slices[j][0], [s[1] for s in slices[:j + 1]], [s[2] for s in slices[:j + 1]],
                          slices[j][3])
        assert len(got[2]) == len(want[2]) == j + 1
        for name, a, b in [("out", got[0], want[0]), ("dq", got[1], want[1]),
                           *[(f"dk{i}", a, b) for i, (a, b) in enumerate(zip(got[2], want[2]))],
                           *[(f"dv{i}", a, b) for i, (a, b) in enumerate(zip(got[3], want[3]))]]:
            assert a.dtype == b.dtype and a.shape == b.shape, f"{case} slice {j} {name}"
            error = rel_err(a, b)
            assert error <= TOLERANCE[dtype], f"{case} slice {j} {name}: relative error {error}"


@pytest.mark.timeout(60)
def test_first_slice_and_no_cache_are_the_causal_kernel():
    q, k, v, _ = _tensors([10], 2, 4, 2, torch.float32, seed=3)[0]
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(attend(q, k, v, None, 0), want)
    cache = KVCache()
    with cache.slice(0):
        assert torch.equal(attend(q, k, v, cache, 0), want)


@pytest.mark.timeout(60)
def test_cache_handle_and_offset():
    cache, other = KVCache(capacity=12), KVCache()
    k = torch.zeros(1, 2, 5, HEAD_DIM)
    assert current() is None
    with cache.slice(0):
        assert current() is cache and cache.offset == 0
        cache.record(0, k, k)
        cache.record(1, k, k)
    assert current() is None
    with other.slice(0):  # several caches alive at once, one slice running at a time
        assert current() is other
    with cache.slice(1):
        assert cache.offset == 5
        assert len(cache.record(0, k[:, :, :3], k[:, :, :3])) == 1
        with pytest.raises(ValueError, match="other layers"):
            cache.record(1, k, k)
    with pytest.raises(RuntimeError, match="out of order"):
        with cache.slice(3):
            pass
    with pytest.raises(RuntimeError, match="cannot nest"):
        with cache.slice(2), other.slice(1):
            pass
    assert current() is None  # reset even when the body raised
    with pytest.raises(RuntimeError, match=r"slices \[2\] recorded no K/V for layer 0"), cache.slice(3):
        cache.record(0, k, k)
    full = KVCache(capacity=12)
    for i in range(2):
        with full.slice(i):
            full.record(0, k, k)
    with pytest.raises(ValueError, match="position 15, beyond the cache capacity 12"), full.slice(2):
        full.record(0, k, k)
    with pytest.raises(RuntimeError, match="outside"):
        cache.record(0, k, k)


@pytest.mark.timeout(60)
def test_bad_shapes_are_rejected():
    q = torch.zeros(1, 3, 4, HEAD_DIM)
    k = torch.zeros(1, 2, 4, HEAD_DIM)
    with pytest.raises(ValueError, match="query heads"):
        attend(q, k, k, None, 0)
    cache = KVCache()
    with cache.slice(0):
        cache.record(0, k, k)
    with pytest.raises(ValueError, match="does not fit"), cache.slice(1):
        cache.record(0, k[:, :1], k[:, :1])
