"""K/V of earlier sequence slices, kept per pipeline stage and batch slice.

TeraPipe's exactness argument: slice j's attention reads the keys/values of slices < j. We keep
each slice's K/V twice: the tensors inside slice i's own autograd graph, and a detached leaf
copy that later slices read. Backward then runs slice by slice in reverse order: the backward
of slice j deposits dK/dV into the leaves of slices < j (their ``.grad``), and the backward of
slice i feeds those gradients into its own K/V tensors together with the gradient of its
output. Every graph is traversed exactly once and the sum of the contributions is the gradient
of the unsliced step.

Attention layers find the cache through ``current()``, so pipeline layers keep DeepSpeed's
one-tensor-in, one-tensor-out interface; outside ``KVCache.slice`` there is no cache and
attention is the ordinary whole-sequence causal attention.
"""
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch

_active: Optional["KVCache"] = None


def current() -> Optional["KVCache"]:
    """The cache of the slice being run, or None for an unsliced forward."""
    return _active


class KVCache:
    """Cached K/V for one stage and one batch slice; tensors are [batch, heads, seq, head_dim]."""

    SEQ_DIM = 2

    def __init__(self, capacity: Optional[int] = None):
        self.capacity = capacity  # max positions (the position-embedding table), or None
        self._own: List[Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = []
        self._leaves: List[Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = []
        self._index: Optional[int] = None

    @property
    def num_slices(self) -> int:
        return len(self._own)

    @contextmanager
    def slice(self, index: int):
        """Runs the forward of sequence slice ``index``; slices must be run in order 0, 1, ..."""
        global _active
        if index != len(self._own):
            raise RuntimeError(f"KV cache: slice {index} run out of order (next expected: {len(self._own)})")
        if _active is not None:
            raise RuntimeError("KV cache: slices cannot nest")
        self._own.append({})
        self._leaves.append({})
        self._index, _active = index, self
        try:
            yield self
        finally:
            self._index, _active = None, None

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Records this slice's K/V of ``layer``; returns K/V of all positions up to this slice."""
        index = self._index
        if index is None:
            raise RuntimeError("KV cache: extend() called outside KVCache.slice()")
        earlier = [leaves[layer] for leaves in self._leaves[:index]]
        if earlier and _without_seq(k.shape) != _without_seq(earlier[0][0].shape):
            raise ValueError(f"KV cache: slice {index} of layer {layer} has K/V of shape {tuple(k.shape)}, which "
                             f"does not fit the cached {tuple(earlier[0][0].shape)} (batch, heads and head_dim "
                             "must match)")
        end = sum(kv[0].shape[self.SEQ_DIM] for kv in earlier) + k.shape[self.SEQ_DIM]
        if self.capacity is not None and end > self.capacity:
            raise ValueError(f"KV cache: slice {index} ends at position {end}, beyond the cache capacity "
                             f"{self.capacity} (max_position_embeddings)")
        self._own[index][layer] = (k, v)
        self._leaves[index][layer] = (k.detach().requires_grad_(), v.detach().requires_grad_())
        if not earlier:
            return k, v
        return (torch.cat([kv[0] for kv in earlier] + [k], dim=self.SEQ_DIM),
                torch.cat([kv[1] for kv in earlier] + [v], dim=self.SEQ_DIM))

    def backward_args(self, index: int, outputs: List[torch.Tensor],
                      grads: List[Optional[torch.Tensor]]) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """Tensors and gradients for ``torch.autograd.backward`` of slice ``index``.

        Adds the slice's own K/V with the gradients that later slices left on its leaves.
        Call after the backward of every later slice of this cache.
        """
        tensors, grad_tensors = list(outputs), list(grads)
        for layer, (k, v) in self._own[index].items():
            k_leaf, v_leaf = self._leaves[index][layer]
            for own, leaf in ((k, k_leaf), (v, v_leaf)):
                if leaf.grad is not None:
                    tensors.append(own)
                    grad_tensors.append(leaf.grad)
        return tensors, grad_tensors

    def release(self, index: int) -> None:
        """Drops slice ``index``'s tensors once its backward is done; empties the cache after slice 0."""
        self._own[index], self._leaves[index] = {}, {}
        if index == 0:
            self._own.clear()
            self._leaves.clear()


def _without_seq(shape: torch.Size) -> Tuple[int, ...]:
    return tuple(shape[:KVCache.SEQ_DIM]) + tuple(shape[KVCache.SEQ_DIM + 1:])
