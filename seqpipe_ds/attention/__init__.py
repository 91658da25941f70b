"""Causal self-attention of a sequence slice over the K/V that earlier slices cached.

- ``cache``: ``KVCache``, the per-(stage, batch slice) store of K/V leaves and their gradients,
  and ``current()``, the cache of the slice being run (a ContextVar set by ``KVCache.slice``);
- ``kernels``: CPU and CUDA attention kernels that return the log-sum-exp, chosen at run time;
- ``blocks``: ``attend``, the entry point, and the block attention that merges per-block
  outputs by their log-sum-exps, with no concatenation and no mask.
"""
from .blocks import BlockAttention, accumulation_dtype, attend
from .cache import KVCache, current

__all__ = ["BlockAttention", "KVCache", "accumulation_dtype", "attend", "current"]
