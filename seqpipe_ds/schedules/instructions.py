"""A lowered program as DeepSpeed ``PipeInstruction``s, which ``SeqPipeEngine`` executes.

Each instruction's docstring says what it does to the engine's per-unit buffers; the keys are
(micro-batch, batch slice, sequence slice), so units of several micro-batches can be in flight.
"""
from typing import Sequence

from deepspeed.runtime.pipe.schedule import OptimizerStep, PipeInstruction, PipeSchedule, ReduceGrads, ReduceTiedGrads

from .actions import BACKWARD, FORWARD, LOAD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, STEP, WEIGHT, Action
from .lowering import receive_posts


class SliceInstruction(PipeInstruction):
    """An instruction about one unit: ``micro_batch`` and ``unit`` = (batch slice, sequence slice)."""

    def __init__(self, micro_batch: int, unit):
        super().__init__(micro_batch=micro_batch, unit=tuple(unit))


class LoadMicroBatch(PipeInstruction):
    """First and last stage: read the next micro-batch from the data iterator and keep its views per
    unit: ``inputs[m, unit]`` (first stage, token ids), ``labels[m, unit]`` and the loss normalizer of
    the whole micro-batch (last stage)."""

    def __init__(self, micro_batch: int):
        super().__init__(micro_batch=micro_batch)


class ForwardSlice(SliceInstruction):
    """Runs the stage on ``inputs[key]`` inside the KV cache of (m, batch slice). Non-last stages keep
    the result in ``outputs[key]``; the last stage pops ``labels[key]`` and keeps ``losses[key]``. The
    first stage pops ``inputs[key]`` (token ids need no gradient)."""


class BackwardSlice(SliceInstruction):
    """Backpropagates ``losses[key]`` (last stage) or ``outputs[key]`` with ``grads[key]`` (both popped),
    together with the K/V gradients later slices left in the cache; then releases the slice's cache.
    Under a schedule that splits the backward it computes the input gradients only and keeps the
    linear layers' weight-gradient work in ``wgrads[key]`` (``model.wgrad.WeightGrads``)."""


class WeightSlice(SliceInstruction):
    """Pops ``wgrads[key]`` and runs it: the weight-gradient GEMMs of the unit's linear layers,
    accumulated into the parameters' gradients (the deferred half of a split BackwardSlice)."""


class SendSliceActivation(SliceInstruction):
    """Sends ``outputs[key]`` to the next stage (asynchronously; ``outputs[key]`` stays for backward)."""


class RecvSliceActivation(SliceInstruction):
    """Receives the unit's activation from the previous stage into ``inputs[key]`` (requires grad):
    waits for the receive in ``posted[key]`` (popped), or posts it first where none is."""


class PostRecvSliceActivation(SliceInstruction):
    """Posts the receive of the unit's activation from the previous stage into a fresh buffer, kept
    in ``posted[key]`` for RecvSliceActivation to wait on (``lowering.receive_posts`` says where).
    Before the first activation's tensor metadata has arrived, it posts nothing."""


class PostRecvSliceGrad(SliceInstruction):
    """Posts the receive of the gradient of ``outputs[key]`` from the next stage into a fresh buffer,
    kept in ``posted[key]`` for RecvSliceGrad to wait on."""


class SendSliceGrad(SliceInstruction):
    """Pops ``inputs[key]`` and sends its ``.grad`` to the previous stage (asynchronously)."""


class RecvSliceGrad(SliceInstruction):
    """Receives the gradient of ``outputs[key]`` from the next stage into ``grads[key]``: waits for the
    receive in ``posted[key]`` (popped), or posts it first where none is."""


_SLICE = {FORWARD: ForwardSlice, BACKWARD: BackwardSlice, WEIGHT: WeightSlice, SEND_ACT: SendSliceActivation,
          RECV_ACT: RecvSliceActivation, SEND_GRAD: SendSliceGrad, RECV_GRAD: RecvSliceGrad}
_POST = {RECV_ACT: PostRecvSliceActivation, RECV_GRAD: PostRecvSliceGrad}


def to_instructions(action: Action) -> list:
    if action.kind == LOAD:
        return [LoadMicroBatch(action.micro_batch)]
    if action.kind == STEP:
        return [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]
    return [_SLICE[action.kind](action.micro_batch, action.unit)]


def _posting(receives) -> list:
    return [_POST[r.kind](r.micro_batch, r.unit) for r in receives]


class ProgramSchedule(PipeSchedule):
    """One stage's lowered program, one action per DeepSpeed step, each followed by the posts of the
    receives ``lowering.receive_posts`` places after it (and a first step of posts before it all)."""

    def __init__(self, program: Sequence[Action], micro_batches: int, stages: int, stage_id: int):
        super().__init__(micro_batches=micro_batches, stages=stages, stage_id=stage_id)
        self.program = program
        self.posts = receive_posts(program)

    def steps(self):
        if None in self.posts:
            yield _posting(self.posts[None])
        for action in self.program:
            yield to_instructions(action) + _posting(self.posts.get(action, ()))

    def num_pipe_buffers(self) -> int:
        return 1  # the engine keeps per-unit state itself; DeepSpeed's buffer slots go unused
