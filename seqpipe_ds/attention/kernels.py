"""Attention kernels that return the log-sum-exp of each query row, and their backwards.

The block merge (``blocks.py``) needs, per block of keys, the normalised output O_b and the
row-wise log-sum-exp L_b of the scaled scores; and a backward that takes the MERGED output and
log-sum-exp, so that each block's gradients are those of the whole softmax (as ring attention
does: zhuzilin/ring-flash-attention, Megatron's context parallelism). torch's SDPA kernels with
log-sum-exp, all taking (B, heads, seq, head_dim):

- CPU: ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward`` (checked on torch 2.13;
  it maps query head h to key/value head h // (q_heads / kv_heads) itself, so grouped-query
  attention needs no expansion there).
- CUDA, fp16/bf16: ``aten::_scaled_dot_product_flash_attention`` (FlashAttention-2).
- CUDA, fp32: ``aten::_scaled_dot_product_efficient_attention`` (xformers' memory-efficient
  kernel), whose log-sum-exp is padded to a multiple of 32 rows (``kAlignLSE`` in its
  kernel_forward.h) and must be handed back in that shape.

The CUDA kernels get K/V expanded to the query heads per call (never stored expanded), and
their key/value gradients are summed back over each group.

Every kernel: ``forward(q, k, v, causal) -> (out, lse, aux)`` with lse (B, heads, s_q) fp32 and
aux whatever the backward needs from that call; ``backward(grad_out, q, k, v, out, lse, aux,
causal) -> (dq, dk, dv)``. ``causal`` is only asked for square blocks (a slice's own K/V).
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F

aten = torch.ops.aten


class CpuFlash:
    name = "cpu-flash"

    @staticmethod
    def forward(q, k, v, causal: bool):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, lse, None

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, aux, causal: bool):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, lse, 0.0, causal)


class _Grouped:
    """K/V with fewer heads than Q: expanded for the kernel call only, gradients summed back."""

    @classmethod
    def forward(cls, q, k, v, causal: bool):
        return cls._forward(q, *_expand(q, k, v), causal)

    @classmethod
    def backward(cls, grad_out, q, k, v, out, lse, aux, causal: bool):
        dq, dk, dv = cls._backward(grad_out, q, *_expand(q, k, v), out, lse, aux, causal)
        return dq, _reduce(dk, k), _reduce(dv, v)


class CudaFlash(_Grouped):
    name = "cuda-flash"

    @staticmethod
    def _forward(q, k, v, causal):
        out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal)
        return out, lse, (cum_q, cum_k, max_q, max_k, rng_state, unused)

    @staticmethod
    def _backward(grad_out, q, k, v, out, lse, aux, causal):
        cum_q, cum_k, max_q, max_k, rng_state, unused = aux
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, rng_state, unused)


class CudaEfficient(_Grouped):
    name = "cuda-efficient"
    LSE_ALIGN = 32

    @staticmethod
    def _forward(q, k, v, causal):
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)
        return out, lse[..., :q.shape[2]], (seed, offset)

    @classmethod
    def _backward(cls, grad_out, q, k, v, out, lse, aux, causal):
        seed, offset = aux
        rows = q.shape[2]
        padded = F.pad(lse, (0, cls.LSE_ALIGN * math.ceil(rows / cls.LSE_ALIGN) - rows))
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, None, out, padded, seed, offset, 0.0, [True, True, True, False], causal)
        return dq, dk, dv


def select(q: torch.Tensor):
    """The kernel for q's device and dtype, chosen at run time."""
    if q.device.type == "cpu":
        return CpuFlash
    if q.device.type == "cuda":
        return CudaFlash if q.dtype in (torch.float16, torch.bfloat16) else CudaEfficient
    raise ValueError(f"block attention has no kernel for device {q.device.type!r}")


def _expand(q, k, v) -> Tuple[torch.Tensor, torch.Tensor]:
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _reduce(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if grad.shape[1] == like.shape[1]:
        return grad
    return grad.unflatten(1, (like.shape[1], -1)).sum(2)  # query heads of one K/V head are adjacent
