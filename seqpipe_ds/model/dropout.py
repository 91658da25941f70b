"""Hidden dropout whose masks do not depend on the parallel layout.

Why: a dropout mask drawn from a generator depends on how many numbers that generator gave out
before, so it changes with the pipeline stage a layer lands on (Megatron-LM seeds each pipeline
rank differently, seed + 100 × pp_rank), with the TP rank, and with the shape of the calls: a
sequence cut into slices draws other masks than the whole sequence. Then seqpipe, stock DeepSpeed
pipelining and one process train different models, and a bug cannot be told from a different draw.

Here every mask element is a pure function of

    (seed, global sample number, dropout stream, absolute token position, channel)

through a counter-based hash: integer ops on tensors, identical on CPU and CUDA, no generator
state to carry, nothing to save in a checkpoint. The global sample number is the sample's place in
Megatron's pretraining-sampler order, ``iteration × global batch + (micro-batch × DP + DP rank) ×
micro-batch size + row`` (``seqpipe_ds.data.pipeline_batches`` yields that order), so it encodes
the iteration and the sample's index in the global batch. The stream names the layer and the site
(``stream_id``). So the masks are the same for any PP, TP (with or without sequence parallelism),
DP, slicing, batch slicing, schedule, recomputation and resume.

The engines say which samples run (``samples``, a ContextVar): ``SeqPipeEngine`` per slice, and
``attach`` for DeepSpeed's stock ``PipelineEngine``; a recomputed forward re-enters the key of its
first run (``layers.recomputed``). The absolute position of a slice's first token comes from its
KV cache (``attention.current().offset``).
"""
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state
from torch import nn

from .. import attention

_M32 = 0xFFFFFFFF
_SIGN = 1 << 31


def _int32(value: int) -> int:
    """The int32 with the bits of ``value`` mod 2^32."""
    return ((value & _M32) ^ _SIGN) - _SIGN


_GOLDEN = _int32(0x9E3779B9)  # 2^32 / golden ratio: keeps a zero input from mapping to zero
_C1, _C2 = _int32(0x7FEB352D), _int32(0x846CA68B)


@dataclass(frozen=True)
class Samples:
    """Which samples the running forward holds: ``numbers`` [b] int64, the global sample number of
    each row (Megatron's sampler order), and the run's seed."""
    seed: int
    numbers: torch.Tensor


_CURRENT: ContextVar[Optional[Samples]] = ContextVar("seqpipe_dropout_samples", default=None)


def current() -> Optional[Samples]:
    return _CURRENT.get()


@contextmanager
def samples(key: Optional[Samples]):
    """Runs the enclosed forward with ``key`` (None: no key; dropout in training mode then raises)."""
    token = _CURRENT.set(key)
    try:
        yield key
    finally:
        _CURRENT.reset(token)


def sample_numbers(iteration: int, global_batch: int, micro_batch: int, micro_batch_size: int, dp_rank: int,
                   dp_size: int) -> torch.Tensor:
    """[micro_batch_size] int64: the global sample numbers of a DP rank's micro-batch in Megatron's
    pretraining-sampler order (each step of micro_batch_size × dp_size samples is shared out in
    contiguous per-rank pieces)."""
    first = iteration * global_batch + (micro_batch * dp_size + dp_rank) * micro_batch_size
    return torch.arange(first, first + micro_batch_size, dtype=torch.int64)


def engine_samples(engine, micro_batch: int) -> Samples:
    """The key of micro-batch ``micro_batch`` of the step a DeepSpeed engine is running."""
    numbers = sample_numbers(engine.global_steps, engine.train_batch_size(), micro_batch,
                             engine.train_micro_batch_size_per_gpu(), engine.grid.data_parallel_id,
                             engine.grid.data_parallel_size)
    return Samples(int(getattr(engine.module, "dropout_seed", 0)), numbers)


def attach(engine) -> None:
    """Gives DeepSpeed's stock PipelineEngine the keys: its schedules run each stage's forwards in
    micro-batch order 0, 1, ... within a step (TrainSchedule's 1F1B and InferenceSchedule alike),
    so the n-th training forward of step ``global_steps`` is micro-batch n. (Activation
    recomputation reruns layers, not the module's forward, so it does not count.)"""
    state = {"step": None, "count": 0, "tokens": []}

    def before(module, _inputs):
        if not module.training:
            return
        if state["step"] != engine.global_steps:
            state["step"], state["count"] = engine.global_steps, 0
        state["tokens"].append(_CURRENT.set(engine_samples(engine, state["count"])))
        state["count"] += 1

    def after(module, _inputs, _outputs):
        if state["tokens"]:
            _CURRENT.reset(state["tokens"].pop())

    engine.module.register_forward_pre_hook(before)
    engine.module.register_forward_hook(after, always_call=True)


def stream_id(layer_number: Optional[int], site: int) -> int:
    """The dropout stream of a site: the embedding's (layer None) is 0; transformer layer i's
    attention output (site 0) and MLP output (site 1) are 2i + 1 and 2i + 2."""
    return 0 if layer_number is None else 2 * layer_number + 1 + site


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """In place on int32 ``x`` (bits of a uint32): a bijection of the 32-bit words with strong
    avalanche, the "lowbias32" integer hash (constants from Chris Wellons' hash-prospector search,
    2018). Products wrap mod 2^32 (two's-complement int32 multiplication, on CPU and CUDA alike;
    ``tests/test_dropout.py`` checks the bits against Python integers); the masks make the right
    shifts logical."""
    x ^= (x >> 16) & 0xFFFF
    x *= _C1
    x ^= (x >> 15) & 0x1FFFF
    x *= _C2
    x ^= (x >> 16) & 0xFFFF
    return x


def _combine(h: torch.Tensor, value) -> torch.Tensor:
    return _mix_((h ^ value).add_(_GOLDEN))


def keep_mask(seed: int, numbers: torch.Tensor, stream: int, positions: torch.Tensor, channels: int,
              p: float) -> torch.Tensor:
    """(b, t, channels) bool: True where the element is kept, each with probability 1 - p (to 2^-32).

    ``numbers`` [b] are global sample numbers, ``positions`` [t] absolute token positions. The
    hash runs over the small tensors first (a word per sample, then per (sample, position), and
    one per channel), so the full-size work is one xor and one mix."""
    device = positions.device
    numbers = numbers.to(device=device, dtype=torch.int64)
    low, high = ((numbers & _M32) ^ _SIGN) - _SIGN, numbers >> 32
    h = torch.full(numbers.shape, _int32(seed), dtype=torch.int32, device=device)
    for value in (_int32(seed >> 32), _int32(stream), low.to(torch.int32), high.to(torch.int32)):
        h = _combine(h, value)  # [b]
    h = _combine(h[:, None], positions.to(torch.int32)[None, :])  # [b, t]
    per_channel = _mix_(torch.arange(channels, device=device, dtype=torch.int32).add_(_GOLDEN))  # [c]
    word = _mix_(h[:, :, None] ^ per_channel)  # [b, t, c]
    # kept where the word, read unsigned, is >= p · 2^32: flipping the sign bit orders int32 as uint32
    return (word ^ _int32(_SIGN)) >= round(p * 2 ** 32) - _SIGN


class HiddenDropout(nn.Module):
    """Dropout of (B, T, h) activations, or megatron's (T / TP, B, h) under sequence parallelism
    (this TP rank's contiguous share of the slice's tokens), with masks from ``keep_mask``."""

    def __init__(self, p: float, stream: int, sequence_parallel: bool = False):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p, self.stream, self.sequence_parallel = p, stream, sequence_parallel

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={self.stream}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.p:
            return x
        key = current()
        if key is None:
            raise RuntimeError("hidden dropout needs to know which samples run: train through seqpipe_ds.initialize's "
                               "engine, or wrap the forward in seqpipe_ds.model.dropout.samples(...)")
        rows = x.shape[1] if self.sequence_parallel else x.shape[0]
        if key.numbers.shape != (rows,):
            raise ValueError(f"hidden dropout: {tuple(key.numbers.shape)} sample numbers for {rows} rows; key each "
                             "batch slice with its own rows' numbers")
        cache = attention.current()
        first = cache.offset if cache is not None else 0
        tokens = x.shape[0] if self.sequence_parallel else x.shape[1]
        if self.sequence_parallel:
            first += parallel_state.get_tensor_model_parallel_rank() * tokens
        positions = torch.arange(first, first + tokens, device=x.device)
        keep = keep_mask(key.seed, key.numbers, self.stream, positions, x.shape[-1], self.p)
        if self.sequence_parallel:
            keep = keep.transpose(0, 1)
        return x * keep * (1.0 / (1.0 - self.p))
