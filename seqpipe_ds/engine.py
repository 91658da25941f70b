"""``SeqPipeEngine``: DeepSpeed's PipelineEngine plus the instructions that sequence slicing adds.

Only the slice-level data path is new: loading a micro-batch once and handing out views of it,
a KV cache per (micro-batch, batch slice), one loss per slice (scaled by the micro-batch's
normalizer so the slices add up to the unsliced loss), dK/dV fed into the backward of earlier
slices, and p2p of slice-shaped tensors whose shapes both neighbours know from the plan, each
receive posted ahead where ``lowering.receive_posts`` says. Which instruction runs when is the
lowered program of the configured schedule (``schedules``).
Gradient reduction, the optimizer step, loss aggregation and checkpointing are DeepSpeed's own.
"""
import time
from contextlib import contextmanager

import torch
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine

from .attention import KVCache
from .model import dropout, wgrad
from .schedules import Action, get_schedule, instructions as ins, lower
from .schedules.actions import RECV_ACT, RECV_GRAD, STEP
from .slicing import SlicePlan


class SeqPipeEngine(PipelineEngine):

    def __init__(self, *args, slice_plan: SlicePlan, schedule: str = "terapipe", **kwargs):
        super().__init__(*args, **kwargs)
        self.slice_plan = slice_plan
        self.schedule_name = schedule
        self._splits_backward = get_schedule(schedule).splits_backward
        self._capacity = getattr(getattr(self.module, "gpt_config", None), "max_position_embeddings", None)
        self._activation_meta = None  # per tensor sent between stages: (trailing shape, dtype)
        self._meta_sent = False
        # A list makes every slice's forward/backward/W and the step record (Action, start, end) with
        # time.perf_counter(); seqpipe-bench draws its measured timeline from it.
        self.slice_trace = None
        self._step_started = None
        self._reset_slices()

    @property
    def program(self):
        """This stage's lowered program for one training step (``schedules.lower``)."""
        return lower(self.schedule_name, self.num_stages, self.micro_batches, self.slice_plan)[self.stage_id]

    def _reset_slices(self):
        # Every dict is keyed by (micro-batch, batch slice, sequence slice), or (micro-batch, batch slice)
        # for caches, so several micro-batches can be in flight (slice-1f1b).
        self._pending_sends = []  # (work, tensor): the tensor must live until its send completes
        self._posted = {}  # (receive kind, key) -> (buffers, works): receives posted ahead (PostRecvSlice*)
        self._caches = {}
        self._inputs, self._outputs, self._labels, self._losses, self._grads = {}, {}, {}, {}, {}
        self._wgrads = {}  # split backward: the weight-gradient work a unit's B left for its W
        self._normalizers = {}  # micro-batch -> loss normalizer (a scalar each; cleared after the step)

    def _train_schedule(self):
        return ins.ProgramSchedule(self.program, micro_batches=self.micro_batches, stages=self.num_stages,
                                   stage_id=self.stage_id)

    def _exec_load_sliced_micro_batch(self, micro_batch):
        inputs, labels = self._next_batch()
        if self.is_first_stage():
            self._inputs.update(self._split_units(micro_batch, inputs)[1])
        if self.is_last_stage():
            whole, pieces = self._split_units(micro_batch, labels)
            self._labels.update(pieces)
            self._normalizers[micro_batch] = self.module.loss_fn.normalizer(whole)

    def _split_units(self, micro_batch, part):
        """A batch part (a tensor or a tuple of [batch, seq, ...] tensors) on the device, and {key: its slice}."""
        tensors = tuple(t.to(self.device) for t in (part if isinstance(part, (tuple, list)) else (part,)))
        self._check_shape(tensors[0])
        pieces = [self.slice_plan.split(t) for t in tensors]
        units = {(micro_batch, *u): tuple(p[u] for p in pieces) for u in self.slice_plan.units()}
        if len(tensors) == 1:
            return tensors[0], {k: t[0] for k, t in units.items()}
        return tensors, units

    def _check_shape(self, tensor):
        expected = (self.slice_plan.micro_batch_size, self.slice_plan.seq_length)
        if tuple(tensor.shape[:2]) != expected:
            raise ValueError(f"seqpipe: a micro-batch of shape {tuple(tensor.shape[:2])} does not match the "
                             f"configured (micro_batch_size, seq_length) = {expected}")

    def _exec_forward_slice(self, micro_batch, unit):
        self.tput_timer.start()
        key = (micro_batch, *unit)
        cache_key, s = key[:2], unit[1]
        if s == 0:
            self._caches[cache_key] = KVCache(self._capacity)
        # The first stage's inputs are token ids (no gradient to send back); later stages keep
        # theirs until SendSliceGrad.
        inputs = self._inputs.pop(key) if self.is_first_stage() else self._inputs[key]
        with self._traced("F", key), self._caches[cache_key].slice(s), dropout.samples(self._samples(key)):
            outputs = DeepSpeedEngine.forward(self, inputs)
        if not self.is_last_stage():
            self._outputs[key] = outputs
            return
        loss = self.module.loss_fn(outputs, self._labels.pop(key), normalizer=self._normalizers[micro_batch])
        self._losses[key] = loss
        self.total_loss = loss.detach().clone() if self.total_loss is None else self.total_loss + loss.detach()

    def _samples(self, key):
        """The hidden-dropout key of a unit: the global sample numbers of its batch slice's rows."""
        micro_batch, b, _ = key
        whole = dropout.engine_samples(self, micro_batch)
        first = sum(self.slice_plan.batch_slices[:b])
        return dropout.Samples(whole.seed, whole.numbers[first:first + self.slice_plan.batch_slices[b]])

    def _exec_backward_slice(self, micro_batch, unit):
        key = (micro_batch, *unit)
        cache_key, s = key[:2], unit[1]
        if self.is_last_stage():
            tensors, grads = [self._losses.pop(key)], [None]
        else:
            tensors, grads = [_activation(self._outputs.pop(key))], [self._grads.pop(key)]
        tensors, grads = self._caches[cache_key].backward_args(s, tensors, grads)
        # The same bookkeeping as PipelineEngine's backward of a non-last stage: the output
        # hooks DeepSpeedEngine.forward registered do the GAS scaling (last stage) and prologue.
        if self._splits_backward:
            self._wgrads[key] = queue = wgrad.WeightGrads()
            with wgrad.deferring(queue):
                self._accumulating("B", key, torch.autograd.backward, tensors, grads)
        else:
            self._accumulating("B", key, torch.autograd.backward, tensors, grads)
        self._caches[cache_key].release(s)
        if s == 0:
            del self._caches[cache_key]

    def _exec_weight_slice(self, micro_batch, unit):
        key = (micro_batch, *unit)
        self._accumulating("W", key, self._wgrads.pop(key).run)

    def _accumulating(self, kind, key, run, *args):
        """``run(*args)``, traced, as a backward that adds into the parameters' gradients: under bf16
        the low-precision gradients are cleared before and added into the fp32 ones after, as
        PipelineEngine's backward does, so a W's gradients arrive like a B's."""
        if self.using_bf16_optimizer:
            self.optimizer.clear_lp_grads()
        self._running_engine_backward = True
        try:
            with self._traced(kind, key):
                run(*args)
        finally:
            self._running_engine_backward = False
        if self.using_bf16_optimizer and not self._config.bfloat16_config.immediate_grad_update:
            self.optimizer.update_hp_grads(clear_lp_grads=False)

    @contextmanager
    def _traced(self, kind, key):
        if self.slice_trace is None:
            yield
            return
        start = time.perf_counter()
        yield
        self._record(Action(kind, *key), start)

    def _record(self, action, start):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.slice_trace.append((action, start, time.perf_counter()))

    def _exec_reduce_tied_grads(self):
        """DeepSpeed's, the first instruction of the step (``to_instructions``): the traced STEP starts here."""
        self._step_started = time.perf_counter()
        super()._exec_reduce_tied_grads()

    def _exec_optimizer_step(self, lr_kwargs=None):
        """DeepSpeed's, the last instruction of the step: with tracing on, records the STEP from the
        tied-gradient reduction to here (the calibration measures the step from its start)."""
        super()._exec_optimizer_step(lr_kwargs)
        if self.slice_trace is not None:
            self._record(Action(STEP), self._step_started)

    def allreduce_no_retain(self, bucket, dp_group, numel_per_bucket=500000000, dp_world_size=None):
        """DeepSpeed's, except where it cannot change a value: a data-parallel group of one rank
        reducing in the gradients' own dtype, with no pre- and post-scaling pair that rounds. There
        DeepSpeed would flatten every gradient, all-reduce alone and copy back (17-25 ms a step for
        this repo's bench stages, ``benchmarks/results/profile_step_b1_xeon.txt``)."""
        if not reduction_is_identity(self, bucket, dp_world_size):
            super().allreduce_no_retain(bucket, dp_group, numel_per_bucket, dp_world_size)

    def _exec_send_slice_activation(self, micro_batch, unit):
        outputs = self._outputs[(micro_batch, *unit)]
        tensors = _stage_tensors(outputs)
        if not self._meta_sent:
            self._send_tensor_meta(outputs, self.next_stage)
            self._meta_sent = True
        for tensor in tensors:
            self._send(tensor.contiguous(), self.next_stage)

    def _exec_post_recv_slice_activation(self, micro_batch, unit):
        if self._activation_meta is not None:  # else the receive reads the tensor metadata first
            self._posted[RECV_ACT, (micro_batch, *unit)] = self._post_activation(unit)

    def _exec_recv_slice_activation(self, micro_batch, unit):
        key = (micro_batch, *unit)
        if self._activation_meta is None:
            probe = self._recv_tensor_meta(self.prev_stage)
            self._activation_meta = [(tuple(t.shape[2:]), t.dtype) for t in _stage_tensors(probe)]
        received = _wait(self._posted.pop((RECV_ACT, key), None) or self._post_activation(unit))
        received[0].requires_grad_(received[0].is_floating_point())
        self._inputs[key] = received[0] if len(received) == 1 else tuple(received)

    def _post_activation(self, unit):
        """Fresh buffers for the unit's activation (and integer metadata), their receives posted."""
        buffers = []
        for n, (tail, dtype) in enumerate(self._activation_meta):
            # the activation in the model's layout; integer metadata (document starts) as [batch, tokens]
            dims = self._activation_dims(unit) if n == 0 else self.slice_plan.shape(unit)
            buffers.append(torch.empty(dims + tail, dtype=dtype, device=self.device))
        return self._irecv(buffers, self.prev_stage)

    def _irecv(self, buffers, stage):
        """(buffers, their works): a receive from ``stage`` posted into each buffer, in order."""
        source = self.grid.stage_to_global(stage)
        return buffers, [dist.irecv(buffer, source) for buffer in buffers]

    def _activation_dims(self, unit):
        """Leading dims of the tensor passed between stages for ``unit``: (batch, tokens), unless the
        model lays it out otherwise (``module.activation_dims(batch, tokens)``; Megatron's sequence
        parallelism passes (tokens / TP, batch))."""
        dims = getattr(self.module, "activation_dims", None)
        return tuple(dims(*self.slice_plan.shape(unit))) if dims else self.slice_plan.shape(unit)

    def _exec_send_slice_grad(self, micro_batch, unit):
        self._send(_activation(self._inputs.pop((micro_batch, *unit))).grad, self.prev_stage)

    def _send(self, tensor, stage):
        # Non-blocking: with a blocking send the producer waits for its neighbour to reach the
        # matching receive, which ties the stages into lock-step. The lowering orders every
        # send/receive pair consistently on both sides, so blocking (NCCL) semantics are safe too.
        self._pending_sends.append((dist.isend(tensor, self.grid.stage_to_global(stage)), tensor))

    def _exec_post_recv_slice_grad(self, micro_batch, unit):
        key = (micro_batch, *unit)
        self._posted[RECV_GRAD, key] = self._post_grad(key)

    def _exec_recv_slice_grad(self, micro_batch, unit):
        key = (micro_batch, *unit)
        self._grads[key] = _wait(self._posted.pop((RECV_GRAD, key), None) or self._post_grad(key))[0]

    def _post_grad(self, key):
        return self._irecv([torch.empty_like(_activation(self._outputs[key]))], self.next_stage)

    def _exec_schedule(self, pipe_schedule):
        self._reset_slices()
        super()._exec_schedule(pipe_schedule)
        for work, _ in self._pending_sends:
            work.wait()
        if self._posted:
            raise RuntimeError(f"seqpipe: receives posted but never waited for: {sorted(self._posted)}")
        self._reset_slices()

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ins.LoadMicroBatch: _exec_load_sliced_micro_batch,
        ins.ForwardSlice: _exec_forward_slice,
        ins.BackwardSlice: _exec_backward_slice,
        ins.WeightSlice: _exec_weight_slice,
        ins.SendSliceActivation: _exec_send_slice_activation,
        ins.RecvSliceActivation: _exec_recv_slice_activation,
        ins.SendSliceGrad: _exec_send_slice_grad,
        ins.RecvSliceGrad: _exec_recv_slice_grad,
        ins.PostRecvSliceActivation: _exec_post_recv_slice_activation,
        ins.PostRecvSliceGrad: _exec_post_recv_slice_grad,
        ins.ReduceTiedGrads: _exec_reduce_tied_grads,
        ins.OptimizerStep: _exec_optimizer_step,
    }


def reduction_is_identity(engine, bucket, dp_world_size):
    """Whether DeepSpeed's dense all-reduce of ``bucket`` (``DeepSpeedEngine.allreduce_bucket``) leaves
    every value as it is: one rank, no cast to another communication dtype and back, and no
    ``1 / predivide`` then ``predivide / 1`` scaling, which rounds."""
    if dp_world_size != 1 or any(t.dtype != engine.communication_data_type for t in bucket):
        return False
    return not (engine.gradient_average and engine.postscale_gradients() and engine.gradient_predivide_factor() != 1.0)


def _stage_tensors(outputs):
    """The tensors a stage passes on: one activation, or a tuple of the activation (the one that gets a
    gradient) and integer per-token metadata [batch, tokens] such as document starts."""
    tensors = (outputs,) if torch.is_tensor(outputs) else tuple(outputs) if isinstance(outputs, (tuple, list)) else ()
    if not tensors or not all(torch.is_tensor(t) for t in tensors) or any(t.is_floating_point() for t in tensors[1:]):
        raise TypeError("seqpipe: pipeline stages must pass one tensor to the next stage, or a tuple of one "
                        f"activation and integer metadata tensors, got {type(outputs).__name__}")
    return tensors


def _wait(posted):
    """The buffers of posted receives, once every one has completed."""
    buffers, works = posted
    for work in works:
        work.wait()
    return buffers


def _activation(outputs):
    """The activation of what a stage passes on (the first tensor of a tuple)."""
    return outputs if torch.is_tensor(outputs) else outputs[0]
