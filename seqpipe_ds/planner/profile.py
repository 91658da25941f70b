"""Measures what the latency and memory models need: one stage's forward + backward time per slice
shape, what the first stage (embedding) and the last stage (final norm, LM head, loss) add, the
bytes each kind of stage saves for backward per token, the p2p send time per message size, and
the optimizer step.

A slice (b sequences, l tokens, after c tokens of context) is timed as the pipeline runs it: a
context forward of c tokens fills a ``KVCache`` first (untimed, without autograd: only its K/V
matter), then the slice's forward and its backward, which also produces the K/V gradients of the
context. Each point keeps the median of its repeats, after warm-up runs that absorb allocator and
kernel selection costs. The forward's own time is kept too (the backward/forward split).

Which points: either a fixed sweep (every ``length_stride``-th length, ``context_samples`` random
points with context), or, with ``adaptive``, as few as the fit needs: lengths 1, 2, 4, ... units
first, then the midpoint of every gap whose measured midpoint is more than ``tolerance`` off the
straight line between its ends (bisected until it is not); context points in rounds, each round
first predicted by a fit of the earlier ones, until a round is predicted within ``tolerance``
(or ``context_samples`` are spent). On a noisy machine a point off by no more than the spread of its
own repeats counts as predicted: more points would fit the noise, not the model. The errors seen
are kept in the profile (``adaptive``).

Activation recomputation (``recompute.RECOMPUTE_MODES``; ``recompute_modes``, by default selective
and full): each mode's stage (the same weights) is timed beside the plain one at a few points of
batch 1, round robin (``recompute_rows``: half and the whole sequence without context, half after
half), which the fit turns into the rerun's cost as a multiple of the forward; and every mode's
bytes are metered (``activation_bytes``: kept per token, the transient of a backward, a cached
token's K/V).

Split backwards (``slice-zb``): at the same few points the stage's backward also runs split, B under
``model.wgrad.deferring`` and then its W, and W is timed on its own (``weight``: the stage's layers;
the head's W in ``stage_ends``), which the fit makes linear in the tokens.

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
from ..memory import SavedTensorMeter
from ..model import GPTConfig, TransformerLayer, wgrad
from ..model.layers import FINAL_NORMS, EmbeddingPipe, GPTLoss, OutputLayer, lm_head
from ..model.presets import options
from .recompute import RECOMPUTE_MODES, granularity

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Point = Tuple[int, int, int]  # (b, l, c)


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
    context_samples: int = 32  # random (b, l, c > 0) points for the context term (adaptive: at most)
    batch_sizes: Optional[List[int]] = None  # default 1..micro_batch_size
    warmup: int = 2
    repeats: int = 5
    p2p_sizes: List[int] = field(default_factory=list)  # bytes; default powers of 4 up to one full activation
    dtype: str = "fp32"
    seed: int = 0
    model_preset: Optional[str] = None  # its GPTConfig options (SwiGLU, GQA, ...) apply to the profiled layers
    adaptive: bool = False  # measure only where the fit is not yet within `tolerance` (see the module docstring)
    tolerance: float = 0.03
    stage_ends: bool = True  # also time and meter the embedding (first stage) and the head + loss (last stage)
    recompute_modes: Tuple[str, ...] = ("selective", "full")  # recomputation modes to time and meter besides none

    def __post_init__(self):
        if self.seq_length % self.granularity:
            raise ValueError(f"seq_length {self.seq_length} is not a multiple of the granularity {self.granularity}")
        if min(self.length_stride, self.repeats, self.micro_batch_size) < 1 or self.warmup < 0:
            raise ValueError("length_stride, repeats and micro_batch_size must be >= 1, warmup >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be a fraction in (0, 1), got {self.tolerance}")
        unknown = [m for m in self.recompute_modes if m not in RECOMPUTE_MODES[1:]]
        if unknown:
            raise ValueError(f"recompute modes {unknown}: choose from {', '.join(RECOMPUTE_MODES[1:])} (none is "
                             "always measured)")

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def sizes(self) -> List[int]:
        return self.batch_sizes or list(range(1, self.micro_batch_size + 1))


def slice_points(spec: ProfileSpec) -> List[Point]:
    """The fixed sweep: a no-context sweep of l per b, then sampled points with context."""
    g, units = spec.granularity, spec.seq_length // spec.granularity
    lengths = sorted(set(range(1, units + 1, spec.length_stride)) | {units})
    points = [(b, g * u, 0) for b in spec.sizes for u in lengths]
    return points + context_points(spec, spec.context_samples, np.random.default_rng(spec.seed))


def context_points(spec: ProfileSpec, count: int, rng: np.random.Generator, exclude=()) -> List[Point]:
    """Random (b, l, c > 0) with l + c <= seq_length, b among the measured sizes, none of ``exclude``.
    Context points lie where the no-context table is measured, so the fit sees the context term alone."""
    g, units = spec.granularity, spec.seq_length // spec.granularity
    pairs = [(lu, cu) for lu in range(1, units) for cu in range(1, units - lu + 1)
             if all((g * lu, g * cu) != (l, c) for _, l, c in exclude)]
    if not pairs or not count:
        return []
    chosen = rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)
    return [(int(rng.choice(spec.sizes)), g * pairs[i][0], g * pairs[i][1]) for i in sorted(chosen)]


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


class _Bench:
    """Times points round robin over the repeats (a machine whose load drifts then skews every
    point's median alike instead of a few points a lot), with one shared progress bar. A point is
    a tuple named by ``fields`` in its row."""

    def __init__(self, spec: ProfileSpec, time_point: Callable[[Tuple], Tuple[float, ...]], bar: tqdm,
                 fields: Tuple[str, ...] = ("b", "l", "c")):
        self.spec, self.time_point, self.bar, self.fields = spec, time_point, bar, fields
        self.rows: Dict[Tuple, Dict] = {}

    def measure(self, points: List[Point], phase: str) -> None:
        points = [p for p in dict.fromkeys(points) if p not in self.rows]
        runs = self.spec.warmup + self.spec.repeats
        self.bar.set_description(f"profile: {phase}")
        self.bar.total = (self.bar.total or 0) + runs * len(points)
        self.bar.refresh()
        samples = {p: [] for p in points}
        for run in range(runs):
            for point in points:
                elapsed = self.time_point(point)
                if run >= self.spec.warmup:
                    samples[point].append(elapsed)
                self.bar.update()
        for point, times in samples.items():  # (total, forward[, weight]) per repeat
            names = ("time", "forward", "weight")[:len(times[0])]
            parts = {name: statistics.median(t[k] for t in times) for k, name in enumerate(names)}
            self.rows[point] = {**dict(zip(self.fields, point)), **parts, "samples": [t[0] for t in times]}

    def time(self, point: Point) -> float:
        return self.rows[point]["time"]

    def spread(self, point: Point) -> float:
        """(max - min) / median of the point's repeats: how far apart this machine's own runs are."""
        samples = self.rows[point]["samples"]
        return (max(samples) - min(samples)) / self.rows[point]["time"]


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
        stage, ends = stage_modules(spec, device)
        ends = ends if spec.stage_ends else None
        sync = _synchronizer(device)
        with tqdm(total=0, desc="profile", unit="run", disable=not progress or rank != 0) as bar:
            bench = _Bench(spec, lambda p: _time_slice(stage, *p, spec, device, sync), bar)
            if spec.adaptive:
                profile["adaptive"] = _adaptive(spec, bench)
            else:
                bench.measure(slice_points(spec), "slices")
            profile["compute"] = list(bench.rows.values())
            stages = {"none": stage, **{mode: stage_modules(spec, device, mode)[0] for mode in spec.recompute_modes}}
            if spec.recompute_modes:
                profile["recompute"] = recompute_rows(spec, stages, device, sync, bar)
            profile["weight"] = weight_rows(spec, stage, device, sync, bar)
            if ends is not None:
                profile["stage_ends"] = ends.profile(spec, sync, bar)
                profile["recompute_bytes"] = {mode: activation_bytes(layers, ends, spec.seq_length)
                                              for mode, layers in stages.items()}
                profile["saved_bytes_per_token"] = profile["recompute_bytes"]["none"]["kept"]
            bar.set_description("profile: optimizer step")
            params = list(stage.parameters()) + (list(ends.parameters()) if ends is not None else [])
            profile["optimizer_step"] = _time_optimizer(params, spec, sync)
    dist.barrier()
    if dist.get_world_size() >= 2:
        profile["p2p"] = measure_p2p(spec.p2p_sizes or default_p2p_sizes(spec), spec.warmup, spec.repeats, device,
                                     progress and rank == 0)
    return profile


def stage_modules(spec: ProfileSpec, device, recompute: str = "none") -> Tuple[torch.nn.Module, "StageEnds"]:
    """One stage's transformer layers under recomputation ``recompute`` (the same weights for every
    mode), and the ends the first and last stages add (TP from parallel_state)."""
    torch.manual_seed(spec.seed)
    config = GPTConfig(num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                       num_attention_heads=spec.num_attention_heads, vocab_size=spec.vocab_size,
                       max_position_embeddings=spec.seq_length, params_dtype=DTYPES[spec.dtype],
                       recompute_granularity=granularity(recompute),
                       **(options(spec.model_preset) if spec.model_preset else {}))
    stage = torch.nn.Sequential(*[TransformerLayer(config, i) for i in range(spec.num_layers)]).to(device)
    return stage, StageEnds(config, device)


def recompute_points(spec: ProfileSpec) -> List[Point]:
    """Where recomputation is timed: batch 1, half and the whole sequence without context, and half
    after half (the rerun's share of a slice is what the fit needs, not a table of it)."""
    g, units = spec.granularity, spec.seq_length // spec.granularity
    half = g * max(1, units // 2)
    return list(dict.fromkeys([(1, half, 0), (1, spec.seq_length, 0)]
                              + ([(1, spec.seq_length - half, half)] if units > 1 else [])))


def recompute_rows(spec: ProfileSpec, stages: Dict[str, torch.nn.Module], device, sync: Callable,
                   bar: tqdm) -> List[Dict]:
    """Each mode's stage (``stages``, "none" among them) timed at ``recompute_points``, all modes
    round robin so that a drifting machine skews them alike; rows carry their mode."""
    bench = _Bench(spec, lambda p: _time_slice(stages[p[0]], *p[1:], spec, device, sync), bar,
                   fields=("recompute", "b", "l", "c"))
    bench.measure([(mode, *point) for point in recompute_points(spec) for mode in stages], "recomputation")
    return list(bench.rows.values())


def weight_rows(spec: ProfileSpec, stage: torch.nn.Module, device, sync: Callable, bar: tqdm) -> List[Dict]:
    """The stage's layers with the backward split, at ``recompute_points``: rows with the total, the
    forward and the W (``weight``) seconds."""
    bench = _Bench(spec, lambda p: _time_slice(stage, *p, spec, device, sync, split=True), bar)
    bench.measure(recompute_points(spec), "split backward (B, W)")
    return list(bench.rows.values())


def _adaptive(spec: ProfileSpec, bench: _Bench) -> Dict:
    """Adaptive point selection (module docstring); returns the errors that ended each phase."""
    g, units = spec.granularity, spec.seq_length // spec.granularity
    lengths = sorted({min(units, 2 ** i) for i in range(units.bit_length() + 1)})
    bench.measure([(b, g * u, 0) for b in spec.sizes for u in lengths], "lengths 1, 2, 4, ...")
    gaps = [(b, lo, hi) for b in spec.sizes for lo, hi in zip(lengths, lengths[1:]) if hi - lo > 1]
    length_errors = []
    while gaps:
        bench.measure([(b, g * ((lo + hi) // 2), 0) for b, lo, hi in gaps], f"{len(gaps)} length midpoints")
        split = []
        for b, lo, hi in gaps:
            mid = (lo + hi) // 2
            ends = bench.time((b, g * lo, 0)), bench.time((b, g * hi, 0))
            line = ends[0] + (ends[1] - ends[0]) * (mid - lo) / (hi - lo)
            error = abs(line - bench.time((b, g * mid, 0))) / bench.time((b, g * mid, 0))
            length_errors.append(error)
            if error > max(spec.tolerance, bench.spread((b, g * mid, 0))):
                split += [(b, l, h) for l, h in ((lo, mid), (mid, hi)) if h - l > 1]
        gaps = split
    from .fit import fit_compute  # the fit's own model judges whether more context points are needed
    rng = np.random.default_rng(spec.seed)
    per_round = max(8, spec.context_samples // 4)
    context_errors = []
    while True:
        done = [p for p in bench.rows if p[2] > 0]
        new = context_points(spec, min(per_round, spec.context_samples - len(done)), rng, exclude=done)
        if not new:
            break
        if len(done) >= 8:
            points = np.array(list(bench.rows), dtype=float)  # (points, 3): b, l, c
            trial = fit_compute(*points.T, [row["time"] for row in bench.rows.values()])
        bench.measure(new, f"{len(done) + len(new)} context points")
        if len(done) >= 8:
            predicted = trial.compute_time(*np.array(new, dtype=float).T)
            measured = np.array([bench.time(p) for p in new])
            context_errors.append(float(np.mean(np.abs(predicted - measured) / measured)))
            if context_errors[-1] <= max(spec.tolerance, float(np.median([bench.spread(p) for p in new]))):
                break
    return {"length_midpoint_errors": length_errors, "context_round_errors": context_errors}


class StageEnds(torch.nn.Module):
    """What the first stage adds before its layers (embedding) and the last after them (final norm,
    LM head, loss), as ``gpt_pipeline`` builds them."""

    def __init__(self, config: GPTConfig, device):
        super().__init__()
        self.config = config
        self.embedding = EmbeddingPipe(config).to(device)
        self.final_norm = FINAL_NORMS[config.normalization](config).to(device)
        self.output = OutputLayer(config).to(device) if config.untie_embeddings_and_output_weights else None
        self.loss = GPTLoss()

    def first(self, tokens, positions):
        return self.embedding((tokens, positions))

    def last(self, hidden, labels):
        hidden = self.final_norm(hidden)
        logits = self.output(hidden) if self.output is not None else lm_head(self.embedding, hidden)
        return self.loss(logits, (labels, torch.ones_like(labels, dtype=hidden.dtype)))

    def profile(self, spec: ProfileSpec, sync, bar: tqdm) -> Dict[str, List[Dict]]:
        """fwd + bwd time of each end at a few (b, l): the fit makes it linear in the tokens b * l."""
        g, units = spec.granularity, spec.seq_length // spec.granularity
        shapes = [(b, g * u) for b in sorted({spec.sizes[0], spec.sizes[-1]})
                  for u in sorted({1, units // 2 or 1, units})]
        bar.set_description("profile: embedding and LM head + loss")
        runs = spec.warmup + spec.repeats
        bar.total += 2 * runs * len(shapes)
        rows = {"first": [], "last": []}
        for end in rows:
            for b, l in shapes:
                times = []
                for run in range(runs):
                    elapsed = self._time(end, b, l, sync)
                    if run >= spec.warmup:
                        times.append(elapsed)
                    bar.update()
                rows[end].append({"b": b, "l": l, "time": statistics.median(t for t, _ in times),
                                  "weight": statistics.median(w for _, w in times)})
        return rows

    def inputs(self, b: int, l: int):
        device = self.embedding.word_embeddings.weight.device
        tokens = torch.randint(0, self.config.vocab_size, (b, l), device=device)
        hidden = torch.randn(b, l, self.config.hidden_size, device=device, dtype=self.config.params_dtype,
                             requires_grad=True)
        return tokens, torch.arange(l, device=device).expand(b, l), hidden

    def _time(self, end: str, b: int, l: int, sync) -> Tuple[float, float]:
        """(forward + backward, W) seconds, the backward split (B, then the deferred W): the head's W
        is its weight GEMM; the embedding has none."""
        tokens, positions, hidden = self.inputs(b, l)
        queue = wgrad.WeightGrads()
        sync()
        start = time.perf_counter()
        with wgrad.deferring(queue):
            if end == "first":
                out = self.first(tokens, positions)
                out.backward(torch.ones_like(out))
            else:
                self.last(hidden, tokens).backward()
        sync()
        weight_start = time.perf_counter()
        queue.run()
        sync()
        end_time = time.perf_counter()
        return end_time - start, end_time - weight_start


def saved_bytes_per_token(stage, ends: StageEnds, seq_length: int) -> Dict[str, float]:
    """Bytes saved for backward per token of one whole sequence, on a first, middle and last stage
    (the memory model's activation input; ``memory.SavedTensorMeter`` counts them)."""
    return activation_bytes(stage, ends, seq_length)["kept"]


def activation_bytes(stage, ends: StageEnds, seq_length: int) -> Dict:
    """What ``SavedTensorMeter`` counts for the stage's recomputation mode, per token
    (``memory_model.MemoryModel``'s inputs), on one whole sequence run as a slice of the KV cache as
    the engine runs it:

    * ``kept`` (first / middle / last stage): saved after the forward;
    * ``transient`` (per stage kind): how far the backward's peak rises above that (a recomputed
      layer's own activations while its rerun is backwarded);
    * ``context``: the middle stage's sequence run as two halves, what the second half's backward
      rises further per token of the first: the cached K/V of the rerun layer, saved only by the
      rerun (a layer recomputed whole ran its first forward without autograd).
    """
    tokens, positions, hidden = ends.inputs(1, seq_length)
    parameters = list(stage.parameters()) + list(ends.parameters())
    runs = {"first": lambda: stage(ends.first(tokens, positions)), "middle": lambda: stage(hidden),
            "last": lambda: ends.last(stage(hidden), tokens)}
    kept, transient = {}, {}
    for kind, run in runs.items():
        meter = SavedTensorMeter(parameters)
        with meter.hooks():
            forward = _metered_backward(meter, [seq_length], lambda x: run())
        kept[kind], transient[kind] = forward / seq_length, (meter.peak - forward) / seq_length
    half = seq_length // 2
    meter = SavedTensorMeter(parameters)
    with meter.hooks():
        forward = _metered_backward(meter, [seq_length - half, half], stage, hidden)
    context = (meter.peak - forward - half * transient["middle"]) / (seq_length - half)
    return {"kept": kept, "transient": transient, "context": max(0.0, context)}


def _metered_backward(meter: SavedTensorMeter, lengths: List[int], run: Callable, hidden=None) -> int:
    """Runs ``run`` on slices of ``lengths`` tokens of ``hidden`` in one KV cache, then their backwards
    (last first, as a schedule does); returns the meter's peak after the forwards."""
    cache, outputs, start = KVCache(), [], 0
    for index, length in enumerate(lengths):
        with cache.slice(index):
            outputs.append(run(None if hidden is None else hidden[:, start:start + length]))
        start += length
    forward = meter.peak
    for index in reversed(range(len(lengths))):
        out = outputs.pop()
        torch.autograd.backward(*cache.backward_args(index, [out], [torch.ones_like(out)]))
        cache.release(index)
        del out
    return forward


def measure_p2p(sizes: List[int], warmup: int, repeats: int, device: torch.device,
                progress: bool = False) -> List[Dict]:
    """One-way time per message size between ranks 0 and 1 (median of half round trips)."""
    rank, results = dist.get_rank(), []
    sync = _synchronizer(device)
    for size in tqdm(sizes, desc="profile: p2p sends", disable=not progress):
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


def _time_slice(stage, b: int, l: int, c: int, spec: ProfileSpec, device, sync: Callable,
                split: bool = False) -> Tuple[float, ...]:
    """(forward + backward, forward) of the slice, after an untimed context forward that fills the
    cache; ``split``: the backward as B and then W, and W's seconds as a third value."""
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
    sync()
    forward = time.perf_counter() - start
    if not split:
        torch.autograd.backward(*cache.backward_args(index, [out], [grad]))
        sync()
        return time.perf_counter() - start, forward
    queue = wgrad.WeightGrads()
    with wgrad.deferring(queue):
        torch.autograd.backward(*cache.backward_args(index, [out], [grad]))
    sync()
    weight_start = time.perf_counter()
    queue.run()
    sync()
    end = time.perf_counter()
    return end - start, forward, end - weight_start


def _time_optimizer(parameters: List[torch.Tensor], spec: ProfileSpec, sync: Callable) -> float:
    """AdamW over the fullest stage's parameters (layers and, with stage ends, embedding and head)."""
    for p in parameters:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(parameters, lr=1e-6)
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
