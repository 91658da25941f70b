"""Cluster advisor: which tensor (TP) x pipeline (PP) x data (DP) parallelism, schedule and slicing
to train a model with on a cluster (TeraPipe's third contribution; its repo sweeps the same space
in batch_test.py with an analytic memory model).

For every factorisation TP * PP * DP of the cluster's GPUs with TP inside a node (TP's all-reduces
need the intra-node links), TP dividing the heads, PP at most the layers and DP dividing the global
batch, the schedule-exact search (``search.py``) plans one pipeline replica under the per-GPU memory
limit (``memory_model.py``: mixed-precision model states, ZeRO 0/1, activations per alive token)
with every stage's slice costs from a device latency model plus the communication the
configuration implies:

* compute: a profiled latency model (``seqpipe-plan fit``; then only its TP and layers per stage
  scaled), or a FLOP-rate model of a named GPU (``GPUS``): forward matmuls 24*b*l*h^2 and attention
  4*b*l*(c + l/2)*h FLOPs per layer, split over TP, backward twice the forward, at a rate that
  saturates with the rows of the GEMMs (``efficiency * rows / (rows + half_rows)``: short slices run
  their GEMMs less efficiently), plus a fixed kernel-launch cost per layer and slice;
* TP: per layer, the 2 forward + 2 backward all-reduces of the slice's activations that Megatron's
  tensor parallelism performs (Shoeybi et al. 2019), as ring all-reduces over the intra-node link;
* PP: each slice's activation (and its gradient) crosses to the next stage over the slowest link the
  placement implies (inter-node when a stage boundary crosses nodes, shared by the DP replicas on a
  node);
* DP: the gradient all-reduce of the stage's parameters before the optimizer step (ring).

It ranks the configurations by simulated iteration time, reports TFLOP/s per GPU (the model FLOPs
of Narayanan et al., SC 2021, without recomputation: 72*B*s*L*h^2*(1 + s/(6h) + V/(12*L*h))) and
peak memory, and compares each with the best unsliced (micro-batch-only) pipelining.
"""
import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np

from ..slicing import SlicePlan
from .costs import FORWARD_FRACTION, Candidate, CostModel
from .memory_model import MemoryModel, analytic_bytes_per_token, parse_bytes, stage_parameters
from .search import SCHEDULE_NAMES, NoFit, search


@dataclass(frozen=True)
class GpuSpec:
    """A FLOP-rate device model. Peaks are the vendors' dense 16-bit tensor-core figures; efficiency
    and half_rows are assumptions of this model (Megatron-LM reaches 30-50% of peak end to end),
    to be replaced by a profile where one exists."""
    name: str
    peak_flops: float  # FLOP/s
    memory: float  # bytes
    efficiency: float = 0.5  # fraction of peak a large GEMM reaches
    half_rows: int = 128  # GEMM rows (tokens) at which half of that is reached
    launch_overhead: float = 1.5e-4  # seconds of kernel launches per layer, forward + backward


# NVIDIA datasheets: V100 SXM2 125 TFLOP/s fp16 tensor, A100 SXM 312 bf16, H100/H200 SXM 989 bf16 dense.
GPUS: Dict[str, GpuSpec] = {
    "V100": GpuSpec("V100", 125e12, 16 * 2 ** 30, efficiency=0.45),
    "A100": GpuSpec("A100", 312e12, 80 * 2 ** 30, efficiency=0.55, half_rows=256),
    "H100": GpuSpec("H100", 989e12, 80 * 2 ** 30, efficiency=0.5, half_rows=512, launch_overhead=1e-4),
    "H200": GpuSpec("H200", 989e12, 141 * 2 ** 30, efficiency=0.5, half_rows=512, launch_overhead=1e-4),
}

_CLUSTER_FIELDS = ("nodes", "gpus_per_node", "gpu", "gpu_memory", "intra_node", "inter_node")
_LINK_FIELDS = ("bandwidth", "latency")
_RATE_UNITS = {"b/s": 1, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "kib/s": 2 ** 10, "mib/s": 2 ** 20,
               "gib/s": 2 ** 30, "kbit/s": 1e3 / 8, "mbit/s": 1e6 / 8, "gbit/s": 1e9 / 8}


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s
    latency: float  # s


@dataclass(frozen=True)
class Cluster:
    """A cluster description (JSON; configs/cluster_terapipe_paper.json is the paper's)."""
    name: str
    nodes: int
    gpus_per_node: int
    gpu: GpuSpec
    gpu_memory: float  # bytes usable per GPU
    intra_node: Link
    inter_node: Link

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def parse_rate(text) -> float:
    """'25Gbit/s', '150GB/s', or bytes per second as a number."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "b/s"
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z/]+)\s*", str(text))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _RATE_UNITS:
            raise ValueError(f"{text!r} is not a bandwidth (e.g. 25Gbit/s, 150GB/s)")
        value = float(match.group(1))
    if value <= 0:
        raise ValueError(f"bandwidth {text!r} must be positive")
    return value * _RATE_UNITS[unit]


def load_cluster(source) -> Cluster:
    """A cluster from a JSON file path or a dict; ValueError naming what is missing or wrong."""
    if isinstance(source, Mapping):
        data, where = dict(source), "cluster description"
    else:
        where = f"cluster description {source}"
        try:
            with open(source) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: cannot be read ({e})") from None
    missing = [name for name in _CLUSTER_FIELDS if name not in data]
    missing += [f"{link}.{name}" for link in ("intra_node", "inter_node") if isinstance(data.get(link), Mapping)
                for name in _LINK_FIELDS if name not in data[link]]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)} (needs {', '.join(_CLUSTER_FIELDS)}; links need "
                         f"{' and '.join(_LINK_FIELDS)})")
    if data["gpu"] not in GPUS:
        raise ValueError(f"{where}: unknown gpu {data['gpu']!r}; known: {', '.join(GPUS)}")
    nodes, per_node = int(data["nodes"]), int(data["gpus_per_node"])
    if nodes < 1 or per_node < 1:
        raise ValueError(f"{where}: nodes and gpus_per_node must be >= 1")
    # CUDA context, NCCL buffers and allocator slack are not in the memory model: "reserved" keeps them out.
    usable = parse_bytes(data["gpu_memory"]) - parse_bytes(data.get("reserved", "1GiB"), allow_zero=True)
    if usable <= 0:
        raise ValueError(f"{where}: reserved memory leaves nothing of gpu_memory")
    links = {name: Link(parse_rate(data[name]["bandwidth"]), float(data[name]["latency"]))
             for name in ("intra_node", "inter_node")}
    return Cluster(name=str(data.get("name", "cluster")), nodes=nodes, gpus_per_node=per_node, gpu=GPUS[data["gpu"]],
                   gpu_memory=usable, **links)


def _field(model, name, default=None):
    return model.get(name, default) if isinstance(model, Mapping) else getattr(model, name, default)


def _ring_allreduce(nbytes, peers: int, link: Link):
    # 2 (n - 1) / n of the data over each link, 2 (n - 1) latency-bound steps.
    return 0.0 if peers == 1 else 2 * (peers - 1) / peers * nbytes / link.bandwidth + 2 * (peers - 1) * link.latency


def _stage_layers(model, pp: int) -> List[int]:
    layers = _field(model, "num_layers")
    return [layers // pp + (s < layers % pp) for s in range(pp)]


def flop_rate_costs(model, cluster: Cluster, tp: int, pp: int, dp: int, dtype_bytes: int = 2) -> CostModel:
    """Stage costs of one pipeline replica from the GPU's FLOP rate and the cluster's links."""
    h, vocab = _field(model, "hidden_size"), _field(model, "vocab_size")
    gpu, per_stage = cluster.gpu, _stage_layers(model, pp)

    def rate(rows):
        return gpu.peak_flops * gpu.efficiency * rows / (rows + gpu.half_rows)

    def compute(stage, b, l, c):
        b, l, c = (np.asarray(v, dtype=float) for v in (b, l, c))
        rows = b * l
        forward = (24 * rows * h * h + 4 * rows * (c + l / 2) * h) / tp
        layer = (3 * forward / rate(rows) + gpu.launch_overhead
                 + 4 * _ring_allreduce(rows * h * dtype_bytes, tp, cluster.intra_node))
        time = per_stage[stage] * layer
        if stage == pp - 1:  # LM head (vocab-parallel) and the loss
            time = time + 3 * 2 * rows * h * vocab / tp / rate(rows)
        return time

    return _with_links(model, cluster, tp, pp, dp, compute, FORWARD_FRACTION, dtype_bytes)


def profiled_costs(latency_model, profiled_layers: int, model, cluster: Cluster, tp: int, pp: int, dp: int,
                   dtype_bytes: int = 2) -> CostModel:
    """Stage costs from a profile of this device (``seqpipe-plan fit``), measured at one TP size: its
    layers' time scaled to each stage's layers (TP all-reduces included, they ran in the profile),
    its embedding / head ends, its forward share; the cluster's links for sends and DP."""
    per_stage = _stage_layers(model, pp)

    def compute(stage, b, l, c):
        layers = latency_model.compute_time(b, l, c) * per_stage[stage] / profiled_layers
        return layers + latency_model.ends_time(b, l, stage == 0, stage == pp - 1)

    return _with_links(model, cluster, tp, pp, dp, compute, latency_model.forward_fraction, dtype_bytes)


def _with_links(model, cluster, tp, pp, dp, compute, forward_fraction, dtype_bytes) -> CostModel:
    """Adds the sends between stages and the step (DP gradient all-reduce + Adam) to ``compute``."""
    h = _field(model, "hidden_size")
    # Megatron's rank order (TP fastest, then DP, then PP): a stage is tp * dp consecutive GPUs, so some
    # stage boundary crosses nodes as soon as the pipeline spans more than one node.
    crosses = pp > 1 and tp * dp * pp > cluster.gpus_per_node
    link = cluster.inter_node if crosses else cluster.intra_node
    sharing = max(1, min(dp, cluster.gpus_per_node // tp)) if crosses else 1  # replicas on a node share its NIC

    def send(b, l):
        return link.latency + np.asarray(b, dtype=float) * l * h * dtype_bytes * sharing / link.bandwidth

    params = max(stage_parameters(model, pp, tp))
    dp_link = cluster.inter_node if tp * dp > cluster.gpus_per_node else cluster.intra_node
    dp_share = cluster.gpus_per_node if dp_link is cluster.inter_node else 1
    # Adam over fp32 master states streams ~16 bytes per parameter in and out of HBM; taken at 1 TB/s.
    step = _ring_allreduce(params * dtype_bytes * dp_share, dp, dp_link) + params * 32 / 1e12
    return CostModel(stages=pp, compute=compute, send=send, forward_fraction=forward_fraction, step=step,
                      hidden_size=h)


def model_flops(model, global_batch: int) -> float:
    """FLOPs of one training iteration without recomputation (Narayanan et al., SC 2021, eq. 3 with 3
    passes instead of 4)."""
    h, layers, vocab = _field(model, "hidden_size"), _field(model, "num_layers"), _field(model, "vocab_size")
    s = _field(model, "seq_length")
    return 72 * global_batch * s * layers * h * h * (1 + s / (6 * h) + vocab / (12 * layers * h))


@dataclass
class Configuration:
    tp: int
    pp: int
    dp: int
    best: Optional[Candidate]  # the searched plan within memory; None if nothing fits
    unsliced: Optional[Candidate]  # the best micro-batch-only pipelining within memory
    tflops_per_gpu: float = 0.0
    smallest_peak: float = 0.0
    note: str = ""

    @property
    def time(self) -> float:
        return self.best.makespan if self.best else float("inf")


@dataclass
class Advice:
    model: Mapping
    cluster: Cluster
    global_batch: int
    ranked: List[Configuration]  # fitting configurations, fastest first
    rejected: List[Configuration] = field(default_factory=list)  # (TP, PP, DP) that do not fit


def factorisations(model, cluster: Cluster, global_batch: int, tp_sizes: Optional[List[int]] = None) -> List[tuple]:
    """(TP, PP, DP) using every GPU: TP inside a node and dividing the heads (and the vocabulary),
    PP at most the layers, DP dividing the global batch; TP among ``tp_sizes`` if given."""
    heads, layers = _field(model, "num_attention_heads"), _field(model, "num_layers")
    vocab, n = _field(model, "vocab_size"), cluster.gpus
    found = []
    for tp in range(1, cluster.gpus_per_node + 1):
        if cluster.gpus_per_node % tp or heads % tp or vocab % tp or (tp_sizes and tp not in tp_sizes):
            continue
        for pp in range(1, layers + 1):
            if n % (tp * pp) == 0 and global_batch % (n // (tp * pp)) == 0:
                found.append((tp, pp, n // (tp * pp)))
    return found


def advise(model, cluster: Cluster, global_batch: int, granularity: int = 128, schedules=SCHEDULE_NAMES,
           zero_stage: int = 0, costs_for=None, local_moves: bool = False, progress=None,
           tp_sizes: Optional[List[int]] = None) -> Advice:
    """Ranks every admissible (TP, PP, DP); ValueError if none fits the GPUs' memory. ``costs_for(tp, pp,
    dp)`` gives a configuration's CostModel (default: the cluster GPU's FLOP-rate model)."""
    seq = _field(model, "seq_length")
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    if seq % granularity:
        raise ValueError(f"sequence length {seq} is not a multiple of the granularity {granularity}")
    costs_for = costs_for or (lambda tp, pp, dp: flop_rate_costs(model, cluster, tp, pp, dp))
    candidates = factorisations(model, cluster, global_batch, tp_sizes)
    if not candidates:
        raise ValueError(f"no TP x PP x DP of {cluster.gpus} GPUs suits this model and batch {global_batch}: TP must "
                         f"divide {cluster.gpus_per_node} GPUs per node and the heads, DP the global batch")
    configs = []
    for tp, pp, dp in candidates:
        if progress:
            progress(f"TP {tp} x PP {pp} x DP {dp}")
        configs.append(_plan_config(model, cluster, global_batch, tp, pp, dp, granularity, schedules, zero_stage,
                                    costs_for(tp, pp, dp), local_moves))
    ranked = sorted((c for c in configs if c.best), key=lambda c: c.time)
    rejected = [c for c in configs if not c.best]
    if not ranked:
        smallest = min(rejected, key=lambda c: c.smallest_peak)
        raise ValueError(f"no TP x PP x DP factorisation fits {cluster.gpu_memory / 2 ** 30:.1f} GiB per GPU: the "
                         f"smallest peak is {smallest.smallest_peak / 2 ** 30:.1f} GiB (TP {smallest.tp}, PP "
                         f"{smallest.pp}, DP {smallest.dp}; {smallest.note})")
    return Advice(model, cluster, global_batch, ranked, rejected)


def _plan_config(model, cluster, global_batch, tp, pp, dp, granularity, schedules, zero_stage, costs,
                 local_moves) -> Configuration:
    layers_per_stage = [_field(model, "num_layers") // pp + (s < _field(model, "num_layers") % pp) for s in range(pp)]
    memory = MemoryModel.for_stages(stage_parameters(model, pp, tp),
                                    analytic_bytes_per_token(model, tp, layers_per_stage, "bf16"), "bf16",
                                    zero_stage, dp)
    batch, seq = global_batch // dp, _field(model, "seq_length")
    config = Configuration(tp, pp, dp, None, None, smallest_peak=max(memory.static_bytes))
    if max(memory.static_bytes) > cluster.gpu_memory:
        config.note = "model states alone exceed the memory"
        return config
    try:
        result = search(costs, batch, seq, granularity, schedules, memory, cluster.gpu_memory, local_moves=local_moves)
    except NoFit as e:
        config.note, config.smallest_peak = str(e), e.smallest.peak
        return config
    config.best = result.best
    config.unsliced = _best_unsliced(costs, memory, batch, seq, cluster.gpu_memory)
    config.tflops_per_gpu = model_flops(model, global_batch) / result.best.makespan / cluster.gpus / 1e12
    return config


def _unsliced_candidates(costs, memory, batch, seq):
    """Micro-batch-only pipelining: 1F1B (slice-1f1b with one slice) over every micro-batch size."""
    for mb in (m for m in range(1, batch + 1) if batch % m == 0):
        try:
            yield costs.predict("slice-1f1b", batch // mb, SlicePlan((mb,), ((seq,),)), memory, "unsliced 1F1B")
        except ValueError:  # a micro-batch the latency model cannot time (outside a profile's batch sizes)
            continue


def _best_unsliced(costs, memory, batch, seq, limit) -> Optional[Candidate]:
    fitting = [c for c in _unsliced_candidates(costs, memory, batch, seq) if c.peak <= limit]
    return min(fitting, key=lambda c: c.makespan, default=None)


def describe_slicing(candidate: Candidate) -> str:
    lengths = candidate.plan.seq_slices[0]
    same = all(s == lengths for s in candidate.plan.seq_slices)
    shape = f"{len(lengths)} x {lengths[0]}" if len(set(lengths)) == 1 else f"{len(lengths)}: {list(lengths)}"
    groups = f"{len(candidate.plan.batch_slices)} batch slices, " if len(candidate.plan.batch_slices) > 1 else ""
    return groups + (shape if same else "per batch slice")


def table(advice: Advice, top: int = 10) -> str:
    """The ranking as a markdown table."""
    cluster = advice.cluster
    lines = [f"{cluster.name}: {cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu.name}, "
             f"global batch {advice.global_batch}",
             "| TP | PP | DP | schedule | micro-batches | slices per sequence | iteration (s) | TFLOP/s/GPU | "
             "peak GiB | unsliced 1F1B (s) | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in advice.ranked[:top]:
        b = c.best
        unsliced = f"{c.unsliced.makespan:.3f}" if c.unsliced else "does not fit"
        speedup = f"{c.unsliced.makespan / b.makespan:.2f}x" if c.unsliced else "-"
        lines.append(f"| {c.tp} | {c.pp} | {c.dp} | {b.schedule} | {b.micro_batches} x {b.micro_batch_size} | "
                     f"{describe_slicing(b)} | {b.makespan:.3f} | {c.tflops_per_gpu:.1f} | {b.peak / 2 ** 30:.1f} | "
                     f"{unsliced} | {speedup} |")
    return "\n".join(lines)


def best_unsliced_overall(advice: Advice) -> Optional[Configuration]:
    with_unsliced = [c for c in advice.ranked if c.unsliced]
    return min(with_unsliced, key=lambda c: c.unsliced.makespan, default=None)


def launch_flags(advice: Advice, plan_file: str) -> str:
    """The ``deepspeed`` launch and Megatron flags of the winner, and the config section to add."""
    c, model = advice.ranked[0], advice.model
    b = c.best
    return (f"deepspeed --num_nodes {advice.cluster.nodes} --num_gpus {advice.cluster.gpus_per_node} "
            f"examples/pretrain_gpt.py --tensor-model-parallel-size {c.tp} --pipeline-model-parallel-size {c.pp} "
            f"--num-layers {_field(model, 'num_layers')} --hidden-size {_field(model, 'hidden_size')} "
            f"--num-attention-heads {_field(model, 'num_attention_heads')} --seq-length {_field(model, 'seq_length')} "
            f"--micro-batch-size {b.micro_batch_size} --global-batch-size {advice.global_batch} --bf16 "
            f"--deepspeed --deepspeed_config ds_config.json\n"
            f'ds_config.json: "gradient_accumulation_steps": {b.micro_batches}, "seqpipe": {{"enabled": true, '
            f'"seq_length": {_field(model, "seq_length")}, "plan": "{plan_file}"}}')
