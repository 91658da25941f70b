"""The data-parallel all-reduce that ``SeqPipeEngine`` leaves out: only where DeepSpeed's own could not
change a value (one rank, the gradients' dtype, no rounding scale pair). The exactness matrices run it
against stock DeepSpeed at one rank (skipped) and at two (DeepSpeed's); here, the decision itself."""
from types import SimpleNamespace

import pytest
import torch

from seqpipe_ds.engine import SeqPipeEngine, reduction_is_identity


def _engine(comm=torch.float32, average=True, postscale=True, predivide=1.0):
    """A SeqPipeEngine with only what the reduction reads; DeepSpeed's all-reduce of a bucket recorded."""
    engine = object.__new__(SeqPipeEngine)
    engine._config = SimpleNamespace(communication_data_type=comm)
    engine.gradient_average = average
    engine.postscale_gradients = lambda: postscale
    engine.gradient_predivide_factor = lambda: predivide
    engine.reduced = []
    # what DeepSpeedEngine.allreduce_no_retain hands each bucket to
    engine.allreduce_and_copy = lambda bucket, group, world: engine.reduced.append(bucket)
    return engine


BUCKET = [torch.ones(3), torch.ones(2, 2)]


@pytest.mark.parametrize("engine, world, identity", [
    (_engine(), 1, True),
    (_engine(postscale=False, predivide=3.0), 1, True),  # prescaling divides by the world size: 1
    (_engine(average=False, predivide=3.0), 1, True),  # a sum: no scaling at all
    (_engine(), 2, False),
    (_engine(comm=torch.bfloat16), 1, False),  # cast to bf16 and back rounds
    (_engine(predivide=3.0), 1, False),  # * (1/3) then * 3 rounds
])
def test_a_reduction_is_left_out_only_where_it_cannot_change_a_value(engine, world, identity):
    assert reduction_is_identity(engine, BUCKET, world) is identity
    SeqPipeEngine.allreduce_no_retain(engine, BUCKET, dp_group=None, dp_world_size=world)
    assert engine.reduced == ([] if identity else [BUCKET])


def test_the_scale_pair_left_to_deepspeed_does_round():
    """Why predivide != 1 is not an identity at one rank: x * (1/3) * 3 != x for some float32 x."""
    x = torch.arange(1, 1001, dtype=torch.float32) / 7
    assert not torch.equal(x.mul(1.0 / 3.0).mul(3.0), x)
