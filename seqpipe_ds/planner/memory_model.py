"""Per-stage memory of a training step: model states plus the activations the schedule keeps alive.

A stage holds, for the whole step,

* its parameters, their gradients and the optimizer's states (``model_state_bytes``): with Adam,
  bytes per parameter as counted by ZeRO (Rajbhandari et al., SC 2020, section 3.1): fp32 keeps a
  4-byte parameter, a 4-byte gradient and 8 bytes of moments; mixed precision (bf16/fp16) keeps a
  2-byte parameter and gradient and K = 12 bytes of fp32 master copy and moments. ZeRO stage 1
  partitions the optimizer part (the moments, and under ZeRO-1 also DeepSpeed's fp32 partition
  copy of an fp32 parameter) over the data-parallel group; stage 0 replicates it;

and, at its peak, the bytes autograd saved for backward for every token alive on it: forwarded
and not yet backwarded. The schedule simulator counts the tokens alive per stage
(``SimResult.peak_alive_tokens``); the bytes per token are measured by the profile
(``SavedTensorMeter`` on one whole sequence of a first, middle and last stage, which the attention
over KV blocks keeps independent of the slicing), or estimated (``analytic_bytes_per_token``) for
a device never profiled.

Activation recomputation (``recompute.RECOMPUTE_MODES``, one mode for every stage) changes what a
token keeps, and adds what a unit's backward holds while it reruns the forward, both measured by
the profile with ``SavedTensorMeter`` per mode (``profile.saved_bytes_per_token``):

* ``bytes_per_token``: what autograd keeps per alive token; with "full" only each layer's input.
* ``transient_bytes_per_token``: during the backward of a unit, per token of that unit, above what
  the unit keeps: the rerun layer's own activations ("full"; "selective" reruns only the attention
  core, which keeps no more than it saved).
* ``context_bytes_per_token``: during that backward, per token of the unit's context: the earlier
  slices' cached K/V of the rerun layer, which the rerun's attention saves ("full" ran the first
  forward without autograd, so nothing had saved them).
* ``cache_bytes_per_token``: per alive token, what seqpipe's KV cache holds that autograd never
  saved: under "full", every layer's K/V. ``SavedTensorMeter`` does not see it, real memory does;
  stock DeepSpeed runs no KV cache (``without_cache``).

A stage's peak is then modelled as alive tokens x (kept + cached) + the largest unit's transient
(its tokens x transient + its context x context bytes): exact when the largest unit's backward
runs at the peak of alive tokens (in 1F1B a backward starts at that peak), an upper bound
otherwise.
"""
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .recompute import check_mode

# Adam: (parameter, gradient, optimizer part) bytes per parameter; the optimizer part is what ZeRO-1 shards.
_STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}
# DeepSpeed's ZeRO-1 optimizer keeps an fp32 copy of its partition even when the parameters are fp32
# (stage_1_and_2.py, single_partition_of_fp32_groups): 4 more sharded bytes.
_ZERO1_FP32_COPY = 4
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20,
          "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text, allow_zero: bool = False) -> float:
    """'40GiB', '16 GB', '512MiB', or a number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{text!r} is not a memory size (e.g. 40GiB, 16GB, 512MiB)")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"memory size {text!r} must be positive")
    return value * _UNITS[unit]


def model_state_bytes(parameters: float, precision: str = "fp32", zero_stage: int = 0, dp: int = 1) -> float:
    """Parameters + gradients + Adam states of ``parameters`` parameters on one rank."""
    if precision not in _STATE_BYTES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(_STATE_BYTES)}")
    if zero_stage not in (0, 1):
        raise ValueError(f"ZeRO stage {zero_stage}: pipeline parallelism allows stage 0 or 1")
    if dp < 1:
        raise ValueError(f"data-parallel size must be >= 1, got {dp}")
    param, grad, optimizer = _STATE_BYTES[precision]
    if zero_stage == 1:
        optimizer = (optimizer + (_ZERO1_FP32_COPY if precision == "fp32" else 0)) / dp
    return parameters * (param + grad + optimizer)


def _field(model, name, default=None):
    return model.get(name, default) if isinstance(model, Mapping) else getattr(model, name, default)


def layer_parameters(model, tp: int = 1) -> int:
    """Parameters of one transformer layer on one TP rank (seqpipe_ds.model.layers' layout)."""
    h, heads = _field(model, "hidden_size"), _field(model, "num_attention_heads")
    head_dim = h // heads
    groups = _field(model, "num_query_groups") or heads
    ffn = _field(model, "ffn_hidden_size") or 4 * h
    bias = _field(model, "add_bias_linear", True)
    norm = 2 * h if _field(model, "normalization", "LayerNorm") == "LayerNorm" else h
    qkv_out = (heads + 2 * groups) * head_dim
    fc1_out = 2 * ffn if _field(model, "swiglu", False) else ffn
    # Column-parallel weights and biases are split over TP; row-parallel biases and norms are not.
    columns = h * qkv_out + h * fc1_out + (qkv_out + fc1_out if bias else 0)
    rows = h * h + ffn * h
    return (columns + rows) // tp + (2 * h if bias else 0) + 2 * norm


def stage_parameters(model, stages: int, tp: int = 1) -> List[int]:
    """Parameters per pipeline stage on one TP rank: layers split evenly (``gpt_pipeline`` partitions
    by TransformerLayer), the embedding on the first stage, the final norm and the output layer (the
    tied embedding module's copy, or the untied output layer) on the last."""
    layers, h = _field(model, "num_layers"), _field(model, "hidden_size")
    vocab = _field(model, "vocab_size")
    if stages < 1 or layers < stages:
        raise ValueError(f"{layers} layers cannot fill {stages} pipeline stages")
    per_layer = layer_parameters(model, tp)
    counts = [per_layer * (layers // stages + (s < layers % stages)) for s in range(stages)]
    positions = _field(model, "max_position_embeddings") or _field(model, "seq_length")
    learned = _field(model, "position_embedding_type", "learned_absolute") == "learned_absolute"
    embedding = vocab * h // tp + (positions * h if learned else 0)
    counts[0] += embedding
    norm = 2 * h if _field(model, "normalization", "LayerNorm") == "LayerNorm" else h
    untied = _field(model, "untie_embeddings_and_output_weights", False)
    # Tied, the last stage builds the whole embedding module again (DeepSpeed's TiedLayerSpec), so
    # it also holds a copy of the position table.
    counts[-1] += norm + (vocab * h // tp if untied else embedding if stages > 1 else 0)
    return counts


def analytic_bytes_per_token(model, tp: int = 1, layers_per_stage: Optional[Sequence[int]] = None,
                             precision: str = "bf16") -> Dict[str, float]:
    """Saved-for-backward bytes per token for a device never profiled, from Korthikanti et al.
    ("Reducing Activation Recomputation in Large Transformer Models", MLSys 2023, section 4.1):
    a layer keeps s*b*h*(34 + 5*a*s/h) bytes at 16-bit, of which 5*a*s/h is the attention matrix that
    a flash kernel does not keep and 24 of the 34 are split over TP ranks (10 + 24/t); 2 of the 10 are
    the 1-byte dropout masks, which our models (dropout 0) do not keep. fp32 doubles the 2-byte parts. The
    last stage also keeps the logits for the loss: 4 * vocab / t bytes (fp32 cross entropy)."""
    h, vocab = _field(model, "hidden_size"), _field(model, "vocab_size")
    scale = 2 if precision == "fp32" else 1
    per_layer = scale * h * (8 + 24 / tp)  # (10 + 24/t) without the dropout masks
    layers = layers_per_stage or [_field(model, "num_layers")]
    return {"first": per_layer * layers[0], "middle": per_layer * max(layers),
            "last": per_layer * layers[-1] + 4 * vocab / tp}


def kinds(stages: int) -> List[str]:
    """The stage kind ("first", "middle", "last") whose saved bytes per token each stage has; a
    single stage is both ends, which "last" (the larger) stands for."""
    return ["last" if s == stages - 1 else "first" if s == 0 else "middle" for s in range(stages)]


@dataclass(frozen=True)
class MemoryModel:
    """Per stage: bytes held all step (model states) and the activation bytes of one recomputation
    mode (the module's docstring); the per-token lists left empty are zero."""
    static_bytes: List[float]
    bytes_per_token: List[float]
    transient_bytes_per_token: List[float] = field(default_factory=list)
    context_bytes_per_token: List[float] = field(default_factory=list)
    cache_bytes_per_token: List[float] = field(default_factory=list)
    recompute: str = "none"

    def __post_init__(self):
        check_mode(self.recompute)
        stages = len(self.static_bytes)
        for name in ("bytes_per_token", "transient_bytes_per_token", "context_bytes_per_token",
                     "cache_bytes_per_token"):
            values = getattr(self, name)
            if values and len(values) != stages:
                raise ValueError(f"MemoryModel.{name} has {len(values)} stages, static_bytes {stages}")

    @classmethod
    def for_stages(cls, stage_params: Sequence[int], bytes_per_token: Mapping[str, float], precision: str = "fp32",
                   zero_stage: int = 0, dp: int = 1, transient: Optional[Mapping[str, float]] = None,
                   context: float = 0.0, cache: float = 0.0, recompute: str = "none") -> "MemoryModel":
        """``bytes_per_token`` and ``transient`` per stage kind (``kinds``); ``context`` and ``cache``
        bytes per token alike on every stage."""
        stage_kinds = kinds(len(stage_params))
        return cls([model_state_bytes(p, precision, zero_stage, dp) for p in stage_params],
                   [float(bytes_per_token[kind]) for kind in stage_kinds],
                   [float(transient[kind]) for kind in stage_kinds] if transient else [],
                   [float(context)] * len(stage_kinds), [float(cache)] * len(stage_kinds), recompute)

    def without_cache(self) -> "MemoryModel":
        """The same stages without seqpipe's KV cache: stock DeepSpeed's engine."""
        return replace(self, cache_bytes_per_token=[])

    def activation_peaks(self, peak_alive_tokens: Sequence[int],
                         units: Sequence[Tuple[int, int]] = ()) -> List[float]:
        """Per stage, what ``SavedTensorMeter`` counts at the peak: the alive tokens' saved bytes, plus
        the largest transient of ``units``' backwards ((tokens, context tokens) of each unit)."""
        return [tokens * _at(self.bytes_per_token, s) + self._transient(s, units)
                for s, tokens in enumerate(peak_alive_tokens)]

    def peaks(self, peak_alive_tokens: Sequence[int], units: Sequence[Tuple[int, int]] = ()) -> List[float]:
        """Per stage: model states + activations at the schedule's peak, with the KV cache's bytes."""
        return [static + active + tokens * _at(self.cache_bytes_per_token, s)
                for s, (static, active, tokens) in enumerate(zip(
                    self.static_bytes, self.activation_peaks(peak_alive_tokens, units), peak_alive_tokens))]

    def _transient(self, stage: int, units: Sequence[Tuple[int, int]]) -> float:
        per_token, per_context = _at(self.transient_bytes_per_token, stage), _at(self.context_bytes_per_token, stage)
        return max((tokens * per_token + context * per_context for tokens, context in units), default=0.0)

    def check_limit(self, limit: Optional[float]) -> None:
        """ValueError if the model states alone exceed the limit on some stage."""
        if limit is None:
            return
        worst = max(range(len(self.static_bytes)), key=lambda s: self.static_bytes[s])
        if self.static_bytes[worst] > limit:
            raise ValueError(f"memory limit {format_bytes(limit)} is below the parameters, gradients and optimizer "
                             f"states alone ({format_bytes(self.static_bytes[worst])} on stage {worst}): more "
                             "pipeline stages, tensor parallelism or ZeRO-1 with data parallelism are needed")


def _at(values: Sequence[float], stage: int) -> float:
    return values[stage] if values else 0.0


def format_bytes(value: float) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if value >= _UNITS[unit.lower()]:
            return f"{value / _UNITS[unit.lower()]:.2f} {unit}"
    return f"{value:.0f} B"
