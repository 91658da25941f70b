"""Measures what the latency model needs: one stage's forward + backward time per slice shape,
the p2p send time per message size, and the optimizer step.

A slice (b sequences, l tokens, after c tokens of context) is timed as the pipeline runs it: a
context forward of c tokens fills a ``KVCache`` first (untimed, without autograd: only its K/V
matter), then the slice's forward and its backward, which also produces the K/V gradients of the
context. Each point keeps the median of its repeats, after warm-up runs that absorb allocator and
kernel selection costs.

Run in an initialised process group (``bind_device()``, then ``seqpipe_ds.parallel.initialize(tp)``
with a timeout longer than the profile): the TP group of rank 0 measures the stage together,
other ranks wait. p2p is a ping-pong between ranks 0 and 1
(half the round trip), so it needs at least two ranks; with one it is skipped, and the fit then
treats sends as free.
"""
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from ..attention import KVCache
from ..model import GPTConfig, TransformerLayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ProfileSpec:
    num_layers: int  # layers of ONE pipeline stage
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    micro_batch_size: int
    tp: int = 1
    granularity: int = 8
    length_stride: int = 1  # no-context lengths: every stride-th multiple of the granularity (+ seq_length)
    context_samples: int = 32  # random (b, l, c > 0) points for the context term
    batch_sizes: Optional[List[int]] = None  # default 1..micro_batch_size
    warmup: int = 2
    repeats: int = 5
    p2p_sizes: List[int] = field(default_factory=list)  # bytes; default powers of 4 up to one full activation
    dtype: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        if self.seq_length % self.granularity:
            raise ValueError(f"seq_length {self.seq_length} is not a multiple of the granularity {self.granularity}")
        if min(self.length_stride, self.repeats, self.micro_batch_size) < 1 or self.warmup < 0:
            raise ValueError("length_stride, repeats and micro_batch_size must be >= 1, warmup >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.dtype].itemsize


def slice_points(spec: ProfileSpec) -> List[Tuple[int, int, int]]:
    """(b, l, c) to measure: a no-context sweep of l per b, then sampled points with context."""
    g, units = spec.granularity, spec.seq_length // spec.granularity
    sizes = spec.batch_sizes or list(range(1, spec.micro_batch_size + 1))
    lengths = sorted(set(range(1, units + 1, spec.length_stride)) | {units})
    points = [(b, g * u, 0) for b in sizes for u in lengths]
    # Context points only where the no-context table is measured, so the fit sees the context term
    # alone: b among the measured sizes, l anywhere in the measured range.
    rng = np.random.default_rng(spec.seed)
    pairs = [(lu, cu) for lu in range(1, units) for cu in range(1, units - lu + 1)]
    if pairs and spec.context_samples:
        chosen = rng.choice(len(pairs), size=min(spec.context_samples, len(pairs)), replace=False)
        points += [(int(rng.choice(sizes)), g * pairs[i][0], g * pairs[i][1]) for i in sorted(chosen)]
    return points


def default_p2p_sizes(spec: ProfileSpec) -> List[int]:
    largest = spec.micro_batch_size * spec.seq_length * spec.hidden_size * spec.dtype_bytes
    sizes, size = [], 1024
    while size < largest:
        sizes.append(size)
        size *= 4
    return sizes + [largest]


def bind_device() -> None:
    """Gives each local rank its own GPU; call before the process group is created."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def run_profile(spec: ProfileSpec, progress: bool = True) -> Dict:
    """Collective over the process group; the returned profile is complete on rank 0."""
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    profile = {"format": "seqpipe-profile/1", "device": _device_name(device), "torch_version": torch.__version__,
               "config": {**asdict(spec), "dtype_bytes": spec.dtype_bytes}, "compute": [], "p2p": [],
               "optimizer_step": None}
    if parallel_state.get_tensor_model_parallel_world_size() != spec.tp:
        raise ValueError(f"profile asks for TP={spec.tp} but the process group was initialised with TP="
                         f"{parallel_state.get_tensor_model_parallel_world_size()}")
    if rank < spec.tp:
        torch.manual_seed(spec.seed)
        config = GPTConfig(num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                           num_attention_heads=spec.num_attention_heads, vocab_size=spec.vocab_size,
                           max_position_embeddings=spec.seq_length, params_dtype=DTYPES[spec.dtype])
        stage = torch.nn.Sequential(*[TransformerLayer(config, i) for i in range(spec.num_layers)]).to(device)
        sync = _synchronizer(device)
        points = slice_points(spec)
        samples = {point: [] for point in points}
        # Round robin over the points rather than point after point: a machine whose load drifts
        # then skews every point's median alike instead of a few points a lot.
        with tqdm(total=(spec.warmup + spec.repeats) * len(points), desc="slices",
                  disable=not progress or rank != 0) as bar:
            for run in range(spec.warmup + spec.repeats):
                for point in points:
                    elapsed = _time_slice(stage, *point, spec, device, sync)
                    if run >= spec.warmup:
                        samples[point].append(elapsed)
                    bar.update()
        profile["compute"] = [{"b": b, "l": l, "c": c, "time": statistics.median(times), "samples": times}
                              for (b, l, c), times in samples.items()]
        profile["optimizer_step"] = _time_optimizer(stage, spec, sync)
    dist.barrier()
    if dist.get_world_size() >= 2:
        profile["p2p"] = measure_p2p(spec.p2p_sizes or default_p2p_sizes(spec), spec.warmup, spec.repeats, device,
                                     progress and rank == 0)
    return profile


def measure_p2p(sizes: List[int], warmup: int, repeats: int, device: torch.device,
                progress: bool = False) -> List[Dict]:
    """One-way time per message size between ranks 0 and 1 (median of half round trips)."""
    rank, results = dist.get_rank(), []
    sync = _synchronizer(device)
    for size in tqdm(sizes, desc="p2p", disable=not progress):
        buffer = torch.zeros(max(1, size // 4), dtype=torch.float32, device=device)
        times = []
        for i in range(warmup + repeats):
            if rank > 1:
                continue
            sync()
            start = time.perf_counter()
            if rank == 0:
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
            else:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) / 2)
        if rank == 0:
            results.append({"bytes": buffer.numel() * 4, "time": statistics.median(times), "samples": times})
    dist.barrier()
    return results


def _time_slice(stage, b: int, l: int, c: int, spec: ProfileSpec, device, sync: Callable) -> float:
    """One forward + backward of the slice, after an untimed context forward that fills the cache."""
    dtype = DTYPES[spec.dtype]
    cache = KVCache()
    if c:
        with torch.no_grad(), cache.slice(0):
            stage(torch.randn(b, c, spec.hidden_size, device=device, dtype=dtype))
    x = torch.randn(b, l, spec.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    index = cache.num_slices
    sync()
    start = time.perf_counter()
    with cache.slice(index):
        out = stage(x)
    torch.autograd.backward(*cache.backward_args(index, [out], [grad]))
    sync()
    return time.perf_counter() - start


def _time_optimizer(stage: torch.nn.Module, spec: ProfileSpec, sync: Callable) -> float:
    for p in stage.parameters():
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-6)
    times = []
    for i in range(spec.warmup + spec.repeats):
        sync()
        start = time.perf_counter()
        optimizer.step()
        sync()
        if i >= spec.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    # GPU kernels are asynchronous: without a sync the clock would stop at the launch.
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
