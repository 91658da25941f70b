"""Token-level pipeline schedules, as DeepSpeed ``PipeSchedule``s: generators of instructions.

A unit of work is one (batch slice, sequence slice) of one micro-batch. Slices of the same batch
slice must run in order on every stage (slice j attends to the K/V of slices < j on that stage),
and their backwards in reverse order (slice j's backward produces the dK/dV of slices < j).
"""
from deepspeed.runtime.pipe.schedule import (OptimizerStep, PipeInstruction, PipeSchedule, ReduceGrads,
                                             ReduceTiedGrads)

from .slicing import SlicePlan


class SliceInstruction(PipeInstruction):
    """An instruction about one unit: micro-batch ``micro_batch``, ``unit`` = (batch slice, seq slice)."""

    def __init__(self, micro_batch: int, unit):
        super().__init__(micro_batch=micro_batch, unit=tuple(unit))


class LoadMicroBatch(PipeInstruction):
    """First and last stages read the whole micro-batch; the units are views of it."""

    def __init__(self, micro_batch: int):
        super().__init__(micro_batch=micro_batch)


class ForwardSlice(SliceInstruction):
    pass


class BackwardSlice(SliceInstruction):
    pass


class SendSliceActivation(SliceInstruction):
    pass


class RecvSliceActivation(SliceInstruction):
    pass


class SendSliceGrad(SliceInstruction):
    pass


class RecvSliceGrad(SliceInstruction):
    pass


class TeraPipeSchedule(PipeSchedule):
    """TeraPipe's order: per micro-batch, the forwards of all units in order, then their backwards
    in reverse (GPipe over slices). Stage s runs unit n while stage s+1 runs unit n-1."""

    def __init__(self, micro_batches: int, stages: int, stage_id: int, plan: SlicePlan):
        super().__init__(micro_batches=micro_batches, stages=stages, stage_id=stage_id)
        self.plan = plan

    def steps(self):
        first, last = self.stage_id == 0, self.stage_id == self.stages - 1
        units = self.plan.units()
        for m in range(self.micro_batches):
            if first or last:
                yield [LoadMicroBatch(m)]
            for unit in units:
                yield ([] if first else [RecvSliceActivation(m, unit)]) + [ForwardSlice(m, unit)] + \
                      ([] if last else [SendSliceActivation(m, unit)])
            for unit in reversed(units):
                yield ([] if last else [RecvSliceGrad(m, unit)]) + [BackwardSlice(m, unit)] + \
                      ([] if first else [SendSliceGrad(m, unit)])
        yield [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]

    def num_pipe_buffers(self) -> int:
        return 1  # the engine keeps per-unit state itself; DeepSpeed's buffer slots go unused


SCHEDULES = {"terapipe": TeraPipeSchedule}
