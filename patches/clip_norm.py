"""Gradient clipping of DeepSpeed's fp32 path (no ZeRO, no bf16/fp16) with the true global norm.

WHY: ``DeepSpeedEngine.clip_fp32_gradients`` calls ``deepspeed.runtime.utils.clip_grad_norm_``, which
counts a parameter that is not tensor-parallel only where ``mpu.get_model_parallel_rank() == 0``. In a
pipeline engine the mpu is DeepSpeed's ``PipelineParallelGrid``, whose "model parallel" group spans
pipeline x tensor ranks of one data-parallel replica (``ds_model_proc_group``), so that rank is 0 on the
first stage's TP rank 0 only: on every later stage the replicated parameters (LayerNorms, row-parallel
biases, ...) are left out of the norm. It also ignores ``ds_pipe_replicated``, so a tied TP-sharded weight
(the word embedding that the first and last stage share) is counted twice. The clipping coefficient is then
not the single-process one, and neither is the update. Upstream: deepspeedai/DeepSpeed#1839 (open since
2022: "clip_grad_norm_ ... uses get_model_parallel_rank() instead of bwc_tensor_model_parallel_rank()").
Measured on the tests' tiny GPT (tests/test_clip_norm.py, max norm 0.05), first step: true norm 1.8827, stock
1.8571 at PP=2 and 1.7242 at PP=4; after 3 steps the parameters are 0.13 (relative) away from one process and
the losses 2.5e-5. ``engine.get_global_grad_norm()`` is ``None`` on that path in stock DeepSpeed.

The fix counts each parameter once: on TP rank 0 if it is replicated across TP, on every TP rank if it is
TP-sharded (``tensor_model_parallel``/``model_parallel``), on every pipeline stage, and a tied copy
(``ds_pipe_replicated``, set by ``PipelineModule`` on every holder but the first) not at all; the squares
are summed over the mpu's model-parallel group. It also records the norm for ``get_global_grad_norm()``.

The other optimizer paths already count this way and are left alone (read in DeepSpeed 0.19.8, checked by
the same test): ZeRO-1/2 (``stage_1_and_2.get_grad_norm_direct``: TP rank from
``bwc_tensor_model_parallel_rank``, skips ``ds_pipe_replicated``, sums over the DP partitions and the
model-parallel group) and bf16 (``BF16_Optimizer.get_grads_for_norm`` filters the same way,
``get_global_norm_of_tensors`` sums over the model-parallel group).

Versions: #1839 describes the code of March 2022 (DeepSpeed 0.6); 0.19.8 still has it (read and measured).
The patch is verified on 0.19 and applied with a warning on any other version (older ones were not checked).
``"seqpipe": {"stock_clip_norm": true}`` in the DeepSpeed config keeps DeepSpeed's own computation (for
side-by-side comparisons with stock). Models with MoE layers keep it as well: their expert gradients differ
between data-parallel ranks, which DeepSpeed's DP averaging accounts for and this counting does not.
"""
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

from .. import config as seqpipe_config
from ._common import is_marked, mark, warn_if_unverified

VERIFIED = ("0.19",)  # deepspeed versions this was checked against
EPS = 1e-6  # added to the norm before dividing, as DeepSpeed's clip_grad_norm_ does (runtime/utils.py)


def counts_once(param, tp_rank: int) -> bool:
    """Whether this rank's copy of `param` enters the global norm (every parameter is counted exactly once)."""
    if getattr(param, "ds_pipe_replicated", False):
        return False  # a tied copy; the first stage holding the tied module counts it
    return tp_rank == 0 or is_model_parallel_parameter(param)


def global_grad_norm(params, mpu) -> torch.Tensor:
    """L2 norm of the whole model's gradient, identical on every rank of the mpu's model-parallel group."""
    tp_rank = bwc_tensor_model_parallel_rank(mpu)
    # In at least fp32 (float64 gradients keep float64, as in a float64 exactness run).
    dtype = torch.promote_types(params[0].grad.dtype, torch.float32) if params else torch.float32
    squares = [p.grad.detach().to(dtype).norm() ** 2 for p in params if counts_once(p, tp_rank)]
    device = get_accelerator().current_device_name()
    total = torch.stack(squares).sum().to(device) if squares else torch.zeros((), dtype=dtype, device=device)
    if mpu is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mpu.get_model_parallel_group())
    return total.sqrt()


def _fixed(stock):

    @mark
    def clip_fp32_gradients(self):
        if self.has_moe_layers or seqpipe_config.parse(self._config._param_dict).stock_clip_norm:
            return stock(self)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params, self.mpu)
        # Same coefficient as DeepSpeed's clip_grad_norm_, from the true norm; every local copy is
        # scaled (tied copies included) so that they stay equal.
        coef = (self.gradient_clipping() / (norm + EPS)).clamp(max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.device))
        self._global_grad_norm = norm.item()

    return clip_fp32_gradients


def apply():
    """Install the fixed ``DeepSpeedEngine.clip_fp32_gradients``; True if it is in place."""
    current = DeepSpeedEngine.clip_fp32_gradients
    if is_marked(current):
        return True
    warn_if_unverified("clip_norm", "deepspeed", VERIFIED)
    DeepSpeedEngine.clip_fp32_gradients = _fixed(current)
    return True
