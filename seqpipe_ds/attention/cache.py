"""K/V of earlier sequence slices, kept per pipeline stage and (micro-batch, batch slice).

TeraPipe's exactness argument: slice j's attention reads the keys/values of slices < j. Each
slice's K/V exists twice, sharing storage: the tensors inside slice i's own autograd graph, and a
detached leaf (``detach()``, no copy) that later slices read. Backward runs slice by slice in
reverse order: the backward of slice j deposits dK/dV into the leaves of slices < j (their
``.grad``), and the backward of slice i feeds those gradients into its own K/V together with the
gradient of its output. Every graph is traversed exactly once, and the contributions add up to
the gradient of the unsliced step.

Attention finds the cache of the slice being run through ``current()``, a ContextVar that
``KVCache.slice`` sets and resets, so pipeline layers keep DeepSpeed's one-tensor-in,
one-tensor-out interface while several caches (micro-batches in flight) live side by side.
Outside ``KVCache.slice`` there is no cache, and attention is the whole-sequence causal kernel.
"""
import functools
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Dict, List, Optional, Tuple

import torch

KV = Tuple[torch.Tensor, torch.Tensor]

# The cache whose slice forward is running in this thread/context; None for an unsliced forward.
_ACTIVE: ContextVar[Optional["KVCache"]] = ContextVar("seqpipe_active_kv_cache", default=None)


def current() -> Optional["KVCache"]:
    """The cache of the slice being run, or None for an unsliced forward."""
    return _ACTIVE.get()


class KVCache:
    """Cached K/V for one stage and one batch slice; tensors are (B, kv_heads, seq, head_dim)."""

    SEQ_DIM = 2

    def __init__(self, capacity: Optional[int] = None):
        self.capacity = capacity  # max positions (the position-embedding table), or None
        self._own: List[Dict[int, Optional[KV]]] = []  # per slice, per layer: K/V inside the slice's graph
        self._leaves: List[Dict[int, KV]] = []  # per slice, per layer: detached leaves later slices read
        self._lengths: List[Optional[int]] = []  # per slice: its token count, known once a layer recorded
        self._index: Optional[int] = None
        self._replaying = False  # inside replay(): a recomputed forward

    @property
    def num_slices(self) -> int:
        return len(self._own)

    @property
    def offset(self) -> int:
        """Positions cached before the running slice: the absolute position of its first token."""
        index = self._running()
        if None in self._lengths[:index]:
            raise RuntimeError(f"KV cache: an earlier slice than {index} recorded no K/V, its length is unknown")
        return sum(self._lengths[:index])

    @contextmanager
    def slice(self, index: int):
        """Runs the forward of sequence slice ``index``; slices must be run in order 0, 1, ..."""
        if index != len(self._own):
            raise RuntimeError(f"KV cache: slice {index} run out of order (next expected: {len(self._own)})")
        if _ACTIVE.get() is not None:
            raise RuntimeError("KV cache: slices cannot nest")
        self._own.append({})
        self._leaves.append({})
        self._lengths.append(None)
        self._index = index
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            self._index = None

    def replayer(self):
        """For activation recomputation: ``with cache.replayer()():`` later re-enters the slice
        running now (see ``replay``)."""
        return functools.partial(self.replay, self._running())

    @contextmanager
    def replay(self, index: int):
        """The recomputed forward of slice ``index`` (activation recomputation, inside its backward):
        attention reads the earlier slices' leaves as in the first run and records nothing. Where
        the first run computed K/V under no_grad (the whole layer recomputed), it left no graph for
        ``backward_args`` to feed; the recomputed K/V then receive, by a hook, the gradients later
        slices left on its leaves. (K/V computed outside the recomputed part keep their graph.)"""
        token = _ACTIVE.set(self)
        previous = self._index, self._replaying
        self._index, self._replaying = index, True
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            self._index, self._replaying = previous

    def record(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> List[KV]:
        """Records the running slice's K/V of ``layer``; returns the cached (K, V) leaves of every
        earlier slice of that layer, in position order (empty for slice 0)."""
        index = self._running()
        missing = [i for i, leaves in enumerate(self._leaves[:index]) if layer not in leaves]
        if missing:
            raise RuntimeError(f"KV cache: slices {missing} recorded no K/V for layer {layer}")
        earlier = [leaves[layer] for leaves in self._leaves[:index]]
        if self._replaying:
            if self._own[index][layer] is None:  # else backward_args feeds the first run's graph
                for own, leaf in zip((k, v), self._leaves[index][layer]):
                    if leaf.grad is not None:
                        own.register_hook(functools.partial(torch.add, leaf.grad))
            return earlier
        if earlier and _without_seq(k.shape) != _without_seq(earlier[0][0].shape):
            raise ValueError(f"KV cache: slice {index} of layer {layer} has K/V of shape {tuple(k.shape)}, which "
                             f"does not fit the cached {tuple(earlier[0][0].shape)} (batch, heads and head_dim "
                             "must match)")
        length = k.shape[self.SEQ_DIM]
        if self._lengths[index] not in (None, length):
            raise ValueError(f"KV cache: layer {layer} records {length} positions for slice {index}, other layers "
                             f"{self._lengths[index]}")
        end = sum(kv[0].shape[self.SEQ_DIM] for kv in earlier) + length
        if self.capacity is not None and end > self.capacity:
            raise ValueError(f"KV cache: slice {index} ends at position {end}, beyond the cache capacity "
                             f"{self.capacity} (max_position_embeddings)")
        self._lengths[index] = length
        # None: computed under no_grad without a graph (a recomputed layer's first run, or evaluation)
        self._own[index][layer] = None if not (torch.is_grad_enabled() or k.requires_grad) else (k, v)
        self._leaves[index][layer] = (k.detach().requires_grad_(k.is_floating_point()),
                                      v.detach().requires_grad_(v.is_floating_point()))
        return earlier

    def backward_args(self, index: int, outputs: List[torch.Tensor],
                      grads: List[Optional[torch.Tensor]]) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """Tensors and gradients for ``torch.autograd.backward`` of slice ``index``.

        Adds the slice's own K/V with the gradients that later slices left on its leaves.
        Call after the backward of every later slice of this cache.
        """
        tensors, grad_tensors = list(outputs), list(grads)
        for layer, own_kv in self._own[index].items():
            if own_kv is None:  # recomputed: replay() hands the gradients to the recomputed K/V
                continue
            for own, leaf in zip(own_kv, self._leaves[index][layer]):
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
            self._lengths.clear()

    def _running(self) -> int:
        if self._index is None:
            raise RuntimeError("KV cache: used outside KVCache.slice()")
        return self._index


def _without_seq(shape: torch.Size) -> Tuple[int, ...]:
    return tuple(shape[:KVCache.SEQ_DIM]) + tuple(shape[KVCache.SEQ_DIM + 1:])
