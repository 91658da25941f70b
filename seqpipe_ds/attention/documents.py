"""Attention of packed documents (Megatron's ``--reset-attention-mask``): a token sees only the earlier
tokens of its own document.

Documents are given by ``starts`` [B, s] int64: for each token of the slice, the absolute position of
the first token of its document (0 everywhere for a sequence without end-of-document tokens;
``seqpipe_ds.data.document_starts`` derives them from the tokens). A query at absolute position p
with start d sees the keys [d, p]. Since a document is contiguous, a slice whose queries sit at
[offset, offset + s) splits per batch row into *segments*, the runs of equal start:

- every segment attends causally to itself, a square block (the plain causal kernel);
- only a segment whose document began before the slice (d < offset, at most the first segment of
  a row) also attends to cached keys, those at [d, offset): the tail of each cached slice that
  overlaps that range, entirely (no mask).

Every other (segment × cached block) pair is never computed. The blocks of one segment are merged
by their log-sum-exps as in ``blocks.py``, and the backward runs each block's kernel backward with
the merged output and log-sum-exp, so the gradients are exact; dK/dV of cached blocks go to the
cached slices' leaves. No mask is materialised, except in ``document_mask``, the dense form that
unsliced references (stock DeepSpeed, one process) and attention dropout use.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from .blocks import _merge, accumulation_dtype

# One block of keys for one segment: (batch row, query start, query end, block index (0: the
# slice's own K/V, i + 1: cached slice i), key start, key end, causal). Ranges are within the slice.
Block = Tuple[int, int, int, int, int, int, bool]


def check_starts(starts: torch.Tensor, offset: int, queries: int) -> None:
    """Raises ValueError unless ``starts`` is [B, queries] integers with 0 <= start <= the token's own
    absolute position."""
    if starts.dim() != 2 or starts.shape[1] != queries or starts.is_floating_point():
        raise ValueError(f"document starts must be an integer tensor [batch, {queries}], got "
                         f"{tuple(starts.shape)} {starts.dtype}")
    positions = torch.arange(offset, offset + queries, device=starts.device)
    if bool(((starts < 0) | (starts > positions)).any()):
        raise ValueError("document starts must lie between 0 and each token's own position: a document cannot "
                         "start after its token")


def document_mask(starts: torch.Tensor, offset: int, keys: int) -> torch.Tensor:
    """(B, 1, s, keys) bool, True where query i (absolute position offset + i) may attend to key j
    (absolute position j): j <= offset + i and j >= its document's start. Megatron's reset
    attention mask is its negation (True = masked)."""
    s = starts.shape[1]
    key_pos = torch.arange(keys, device=starts.device)
    query_pos = torch.arange(offset, offset + s, device=starts.device)
    visible = (key_pos[None, :] <= query_pos[:, None])[None] & (key_pos[None, None, :] >= starts[:, :, None])
    return visible[:, None]


def segment_blocks(starts: torch.Tensor, offset: int, cached_lengths: Sequence[int]) -> List[Block]:
    """The blocks a slice computes: per row and segment its own causal block, and for a segment
    whose document began before ``offset`` the overlap of [start, offset) with each cached slice
    (``cached_lengths``, in position order)."""
    blocks = []
    cached_offsets = [sum(cached_lengths[:i]) for i in range(len(cached_lengths))]
    for b, row in enumerate(starts):
        values, counts = torch.unique_consecutive(row, return_counts=True)
        begin = 0
        for start, count in zip(values.tolist(), counts.tolist()):
            end = begin + count
            blocks.append((b, begin, end, 0, begin, end, True))
            for i, (first, length) in enumerate(zip(cached_offsets, cached_lengths)):
                if start < first + length:  # cached slice i holds keys of this document: [max(start, first), end)
                    blocks.append((b, begin, end, i + 1, max(start, first) - first, length, False))
            begin = end
    return blocks


class DocumentAttention(torch.autograd.Function):
    """apply(kernel, blocks, q, k, v, k_0, v_0, ...): attention of q over the blocks of
    ``segment_blocks``; block index 0 is (k, v), index i + 1 the cached (k_i, v_i)."""

    @staticmethod
    def forward(ctx, kernel, blocks: List[Block], q, k, v, *cached):
        kv = [(k, v)] + [(cached[i], cached[i + 1]) for i in range(0, len(cached), 2)]
        out = torch.empty(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        lse, auxes, merged = None, [], None
        for n, (b, qs, qe, index, ks, ke, causal) in enumerate(blocks):
            block_k, block_v = kv[index]
            part, part_lse, aux = kernel.forward(q[b:b + 1, :, qs:qe], block_k[b:b + 1, :, ks:ke],
                                                 block_v[b:b + 1, :, ks:ke], causal)
            auxes.append(aux)
            merged = _merge(*(merged or (None, None)), part, part_lse)
            if n + 1 == len(blocks) or blocks[n + 1][:3] != (b, qs, qe):  # the segment's last block
                if lse is None:
                    lse = torch.empty(q.shape[:3], dtype=merged[1].dtype, device=q.device)
                out[b:b + 1, :, qs:qe], lse[b:b + 1, :, qs:qe] = merged
                merged = None
        out = out.to(q.dtype)
        ctx.kernel, ctx.blocks, ctx.auxes = kernel, blocks, auxes
        ctx.save_for_backward(q, out, lse, k, v, *cached)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *flat = ctx.saved_tensors
        kv = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        grad_out = grad_out.contiguous()
        acc = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dkv: List[Optional[List[torch.Tensor]]] = [None] * len(kv)  # a block no segment read gets no gradient
        for (b, qs, qe, index, ks, ke, causal), aux in zip(ctx.blocks, ctx.auxes):
            block_k, block_v = kv[index]
            rows, keys = (slice(b, b + 1), slice(None), slice(qs, qe)), (slice(b, b + 1), slice(None), slice(ks, ke))
            block_dq, block_dk, block_dv = ctx.kernel.backward(
                grad_out[rows], q[rows], block_k[keys], block_v[keys], out[rows], lse[rows], aux, causal)
            dq[rows] += block_dq
            if dkv[index] is None:
                dkv[index] = [torch.zeros(block_k.shape, dtype=acc, device=q.device),
                              torch.zeros(block_v.shape, dtype=acc, device=q.device)]
            dkv[index][0][keys] += block_dk
            dkv[index][1][keys] += block_dv
        grads = []
        for pair in dkv:
            grads += [None, None] if pair is None else [t.to(q.dtype) for t in pair]
        return None, None, dq.to(q.dtype), *grads
