"""Backward split into B (input gradients) and W (weight gradients) for the model's linear layers.

A zero-bubble schedule wants the part of a unit's backward that the previous stage waits for, B,
separately from the weight-gradient GEMMs, W, that nothing needs before the optimizer step, so that W
can fill the pipeline's idle time. While ``deferring(queue)`` is active, the backward of every linear
layer set up by ``install`` (and of the tied LM head, through ``linear``) computes its input gradient
(with megatron-core's TP all-reduce, or under sequence parallelism its reduce-scatter) and its bias
gradient at once, and appends its weight gradient's operands to ``queue``; ``queue.run()`` computes
them later and accumulates them through autograd into the weights. Outside ``deferring`` the
backward is megatron-core's own, unchanged.

Hooks on a deferred weight (``register_hook``, post-accumulate-grad hooks, hooks on its gradient
accumulator) fire in ``run()`` with its gradient. Autograd calls them in B too, with no gradient
(None, ``.grad`` unchanged), as for any function that returns none for a weight (megatron-core's
gradient-accumulation fusion does the same).

The active queue is a module global, not a ContextVar: autograd may run a backward on a device
thread where the caller's ContextVars are not set, and megatron's recomputation reruns layers inside
the backward, whose linear backwards must queue too. It is therefore one per process, which fits one
pipeline stage per process.
"""
import collections
import contextlib
import dataclasses
from typing import Optional

import torch
from megatron.core.parallel_state import get_global_memory_buffer

from .. import memory
from megatron.core.tensor_parallel import layers as mcore_layers
from megatron.core.utils import get_tensor_model_parallel_group_if_none

_active = None  # the WeightGrads the linear backwards queue into, or None: megatron-core's backward


@dataclasses.dataclass
class _Deferred:
    """One linear layer's weight-gradient GEMM: weight.grad += grad_output^T @ input."""
    weight: torch.nn.Parameter
    input: torch.Tensor  # as saved by the forward: under sequence parallelism this rank's (T / TP, ...)
    grad_output: torch.Tensor  # contiguous, 2-D (tokens, out)
    sequence_parallel: bool
    tp_group: Optional[torch.distributed.ProcessGroup]
    accumulation_fusion: bool
    main_grad: Optional[torch.Tensor]
    held: list = dataclasses.field(default_factory=list, repr=False)  # memory.held's handles, dropped with it

    def total_input(self) -> torch.Tensor:
        """The input of every token, 2-D: under sequence parallelism the forward gathered it from the TP
        ranks and kept only this rank's share, so W gathers it again (as megatron-core's backward does)."""
        total = self.input
        if self.sequence_parallel:
            shape = list(total.shape)
            shape[0] *= self.tp_group.size()
            total = get_global_memory_buffer().get_tensor(shape, total.dtype, "mpu")
            torch.distributed.all_gather_into_tensor(total, self.input, group=self.tp_group)
        total = total.contiguous()
        return total.view(-1, total.shape[-1])

    def run(self) -> None:
        if self.accumulation_fusion:
            self._accumulate_into_main_grad()
            return
        grad = self.grad_output.t().matmul(self.total_input())
        torch.autograd.backward([self.weight], [grad])

    def _accumulate_into_main_grad(self) -> None:
        """megatron-core's gradient-accumulation fusion: the GEMM adds into ``main_grad``; where the
        weight tracks ``grad_added_to_main_grad`` (megatron's DDP), a dummy gradient goes through
        autograd so that the hooks on the weight fire, as megatron-core's backward does."""
        weight, main_grad = self.weight, self.main_grad
        weight.main_grad = main_grad
        kernels = {torch.float32: "wgrad_gemm_accum_fp32", torch.float16: "wgrad_gemm_accum_fp16",
                   torch.bfloat16: "wgrad_gemm_accum_fp16"}
        if main_grad.dtype not in kernels:
            raise RuntimeError(f"gradient accumulation fusion does not support main_grad of {main_grad.dtype}")
        getattr(mcore_layers.fused_weight_gradient_mlp_cuda, kernels[main_grad.dtype])(
            self.total_input(), self.grad_output, main_grad)
        if hasattr(weight, "grad_added_to_main_grad"):
            make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
            dummy = make(main_grad.shape, dtype=self.input.dtype, device=main_grad.device)
            weight.grad_added_to_main_grad = True
            torch.autograd.backward([weight], [dummy])


class WeightGrads:
    """One unit's deferred weight gradients, in the order its backward queued them."""

    def __init__(self):
        self._queue = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def nbytes(self) -> int:
        """Bytes the queue keeps alive: the saved inputs and the output gradients, each storage once."""
        storages = {}
        for item in self._queue:
            for tensor in (item.input, item.grad_output):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def append(self, item: _Deferred) -> None:
        # A saved-tensor meter counts the operands as what the unit holds until its W (memory.held).
        item.held = memory.held(item.input, item.grad_output)
        self._queue.append(item)

    def run(self) -> None:
        """Computes every queued weight gradient and accumulates it into its weight, one
        ``torch.autograd.backward`` on the leaf parameter each, in queue order: every hook on the
        weight fires as in a plain backward, and each GEMM and addition is the one the plain backward
        makes. Releases each item's tensors as it goes; the queue is empty afterwards."""
        while self._queue:
            self._queue.popleft().run()


@contextlib.contextmanager
def deferring(queue: WeightGrads):
    """Within this block (on any thread), the installed linear layers' backwards queue their weight
    gradients into ``queue``. Nests: the previous queue, or none, is active again on exit."""
    global _active
    previous, _active = _active, queue
    try:
        yield queue
    finally:
        _active = previous


class DeferrableLinear(mcore_layers.LinearWithGradAccumulationAndAsyncCommunication):
    """megatron-core's linear function (its forward) whose backward can queue W."""

    @staticmethod
    def forward(ctx, input, weight, *args):
        # W accumulates into the parameter object itself: under saved-tensor hooks (activation
        # offloading, a memory meter) ctx.saved_tensors hands back another tensor for it, whose .grad
        # is not the parameter's.
        ctx.parameter = weight
        return mcore_layers.LinearWithGradAccumulationAndAsyncCommunication.forward(ctx, input, weight, *args)

    @staticmethod
    @mcore_layers.custom_bwd
    def backward(ctx, grad_output):
        queue = _active
        if queue is None:
            return mcore_layers.LinearWithGradAccumulationAndAsyncCommunication.backward(ctx, grad_output)
        if ctx.grad_output_buffer is not None:
            raise RuntimeError("defer_embedding_wgrad_compute's own deferral cannot be combined with wgrad.deferring")
        input, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight)
        if ctx.sequence_parallel:  # this rank's tokens of the summed input gradient
            scattered = torch.empty(input.shape, dtype=input.dtype, device=input.device)
            torch.distributed.reduce_scatter_tensor(scattered, grad_input, group=ctx.tp_group)
            grad_input = scattered
        elif ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=ctx.tp_group)
        grad_output = grad_output.contiguous()
        grad_output = grad_output.view(-1, grad_output.shape[-1])
        queue.append(_Deferred(ctx.parameter, input, grad_output, ctx.sequence_parallel, ctx.tp_group,
                               ctx.gradient_accumulation_fusion, ctx.main_grad))
        grad_bias = grad_output.sum(dim=0) if ctx.use_bias else None
        return grad_input, None, grad_bias, None, None, None, None, None, None


def linear(input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
           sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None):
    """megatron-core's ``linear_with_grad_accumulation_and_async_allreduce`` (the parallel linear
    layers' ``_forward_impl``), with the deferrable backward; a frozen weight takes megatron's frozen path."""
    if not weight.requires_grad:
        return mcore_layers.linear_with_frozen_weight(
            input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, tp_group=tp_group,
            grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit)
    if tp_group is None and (allreduce_dgrad or sequence_parallel):
        tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    return DeferrableLinear.apply(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                                  sequence_parallel, grad_output_buffer, wgrad_deferral_limit, tp_group)


def install(layer):
    """Makes a megatron-core ColumnParallelLinear / RowParallelLinear defer its W under ``deferring``;
    returns the layer."""
    if not isinstance(layer, (mcore_layers.ColumnParallelLinear, mcore_layers.RowParallelLinear)):
        raise TypeError(f"wgrad.install takes megatron-core's parallel linear layers, not {type(layer).__name__}")
    if layer.config.defer_embedding_wgrad_compute:
        raise ValueError("wgrad.install: defer_embedding_wgrad_compute defers the weight gradient its own way")
    layer._forward_impl = linear
    return layer
