"""megatron-core's vocab-parallel cross entropy in at least fp32, instead of always fp32.

``VocabParallelCrossEntropy.calculate_logits_max`` (tensor_parallel/cross_entropy.py) starts with
``vocab_parallel_logits.float()``: right for fp16/bf16 logits (promoted), but float64 logits are cast
*down*, so a float64 model computes its loss and the logits' gradient in fp32. Every other step of
the forward and backward works in the dtype of the tensor it gets. The replacement promotes to at
least fp32 (``torch.promote_types(dtype, float32)``): the same for fp16, bf16 and fp32 logits, and a
float64 model stays float64 through its loss, which the float64 exactness tests need (a sliced step
sums the per-token losses in another order than the unsliced one; in fp32 that differs at 1e-7).
"""
import torch
from megatron.core.tensor_parallel import cross_entropy

from ._common import is_marked, mark, warn_if_unverified

VERIFIED = ("0.16",)  # megatron-core versions this was checked against


@mark
def calculate_logits_max(vocab_parallel_logits):
    logits = vocab_parallel_logits.to(torch.promote_types(vocab_parallel_logits.dtype, torch.float32))
    return logits, torch.max(logits, dim=-1)[0]


def apply() -> bool:
    target = cross_entropy.VocabParallelCrossEntropy
    if not is_marked(target.calculate_logits_max):
        warn_if_unverified("cross_entropy_dtype", "megatron-core", VERIFIED)
        target.calculate_logits_max = staticmethod(calculate_logits_max)
    return True
