"""Attention of a sequence slice over its own K/V and the cached K/V of earlier slices, block by block.

The slice's s queries sit at absolute positions [offset, offset + s). They see their own block
causally (a square block: the plain causal kernel) and every earlier slice's block entirely (no
mask). Each block b gives a normalised output O_b and row-wise log-sum-exp L_b; the softmax over
all keys is their merge

    L = log(sum_b exp(L_b)),    O = sum_b exp(L_b - L) * O_b,

which equals SDPA with a bottom-right causal mask over the concatenated K/V, without building
the concatenation or the mask. Backward: softmax attention's gradients for block b depend on the
other blocks only through O and L (dS = P * (dO·V^T - rowsum(dO * O)), P = exp(Q·K_b^T·scale - L)),
so each block's kernel backward, given the merged O and L, yields that block's exact dK_b, dV_b
and share of dQ — the scheme of ring attention (zhuzilin/ring-flash-attention). dK_b/dV_b go
straight to the cached slice's leaves; dQ sums the shares.

Saved for backward: Q, own K/V, the merged O and L, and references to the cached leaves, whose
storage the earlier slices hold anyway. So the K/V bytes a slice saves do not grow with the
number of slices (the concatenating version saved a fresh copy of all earlier K/V per slice).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch.nn.attention.bias import causal_lower_right

from . import kernels
from .cache import KVCache


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Optional[KVCache], layer: int,
           dropout: float = 0.0, starts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of a slice's q (B, nh, s, hd) over k, v (B, n_kv, s, hd) and, inside
    ``cache.slice``, the K/V that earlier slices cached for ``layer``. Returns (B, nh, s, hd).

    ``starts`` [B, s] (packed documents, ``documents.py``): each token's document start; a token
    then sees its own document only. Inside a slice that is block attention per (document segment
    × cached block); without a cache (an unsliced reference) one SDPA with the dense mask.

    ``dropout`` (pass 0 in eval) > 0 with cached slices falls back to one SDPA over the
    concatenated K/V with a bottom-right causal mask, i.e. O(k^2) copies and a mask again: the CPU
    kernel with log-sum-exp rejects dropout ("Currently do not support dropout > 0"), and on CUDA
    each block's backward would need its forward's RNG state. Exact either way, but the masks
    differ from an unsliced run's, as with any change of kernel shapes.
    """
    if q.shape[1] % k.shape[1] or k.shape != v.shape:
        raise ValueError(f"attention: {q.shape[1]} query heads need a whole number of query heads per K/V "
                         f"head, and K {tuple(k.shape)} must match V {tuple(v.shape)}")
    if starts is not None:
        return _attend_documents(q, k, v, cache, layer, dropout, starts)
    cached = cache.record(layer, k, v) if cache is not None else []
    if not cached:
        return _sdpa(q, k, v, dropout, is_causal=True)
    if dropout:
        keys = torch.cat([kv[0] for kv in cached] + [k], dim=KVCache.SEQ_DIM)
        values = torch.cat([kv[1] for kv in cached] + [v], dim=KVCache.SEQ_DIM)
        return _sdpa(q, keys, values, dropout, attn_mask=causal_lower_right(q.shape[2], keys.shape[2]))
    return BlockAttention.apply(kernels.select(q), q, k, v, *[t for kv in cached for t in kv])


def _attend_documents(q, k, v, cache, layer, dropout, starts):
    from . import documents
    offset = cache.offset if cache is not None else 0
    documents.check_starts(starts, offset, q.shape[2])
    cached = cache.record(layer, k, v) if cache is not None else []
    if cache is None or dropout:
        keys = torch.cat([kv[0] for kv in cached] + [k], dim=KVCache.SEQ_DIM)
        values = torch.cat([kv[1] for kv in cached] + [v], dim=KVCache.SEQ_DIM)
        return _sdpa(q, keys, values, dropout, attn_mask=documents.document_mask(starts, offset, keys.shape[2]))
    blocks = documents.segment_blocks(starts, offset, [kv[0].shape[KVCache.SEQ_DIM] for kv in cached])
    return documents.DocumentAttention.apply(kernels.select(q), blocks, q, k, v, *[t for kv in cached for t in kv])


def _sdpa(q, k, v, dropout, **mask):
    gqa = q.shape[1] != k.shape[1]
    if not dropout:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **mask)
    # Dropout masks differ between TP ranks (each holds other heads): megatron's tracker forks.
    with tensor_parallel.get_cuda_rng_tracker().fork():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa, **mask)


class BlockAttention(torch.autograd.Function):
    """apply(kernel, q, k, v, k_0, v_0, k_1, v_1, ...): own block causal, cached blocks 0.. full."""

    @staticmethod
    def forward(ctx, kernel, q, k, v, *cached):
        blocks = [(k, v, True)] + [(cached[i], cached[i + 1], False) for i in range(0, len(cached), 2)]
        out, lse, auxes = None, None, []
        for block_k, block_v, causal in blocks:
            part, part_lse, aux = kernel.forward(q, block_k, block_v, causal)
            auxes.append(aux)
            out, lse = _merge(out, lse, part, part_lse)
        out = out.to(q.dtype)
        ctx.kernel, ctx.auxes = kernel, auxes
        ctx.save_for_backward(q, out, lse, k, v, *cached)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *kv = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, grads = None, []
        for i, aux in enumerate(ctx.auxes):
            block_dq, block_dk, block_dv = ctx.kernel.backward(grad_out, q, kv[2 * i], kv[2 * i + 1], out, lse, aux,
                                                               i == 0)
            # dQ summed in at least fp32: in bf16 the per-block shares would round at every addition.
            dq = block_dq.to(accumulation_dtype(q.dtype)) if dq is None else dq.add_(block_dq)
            grads += [block_dk, block_dv]
        return None, dq.to(q.dtype), *grads


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of ``dtype`` values are taken in: at least fp32 (bf16/fp16 promoted), fp64
    kept, so that a float64 model is float64 throughout and an exact comparison can be tight."""
    return torch.promote_types(dtype, torch.float32)


def _merge(out: Optional[torch.Tensor], lse: Optional[torch.Tensor], part: torch.Tensor,
           part_lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Running softmax merge, in at least fp32, of (out, lse) with one more block's (part, part_lse)."""
    part = part.to(accumulation_dtype(part.dtype))
    if out is None:
        return part, part_lse
    merged = torch.logaddexp(lse, part_lse)  # (B, nh, s)
    return out.mul_((lse - merged).exp_().unsqueeze(-1)).add_(part * (part_lse - merged).exp_().unsqueeze(-1)), merged
