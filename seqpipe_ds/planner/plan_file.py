"""Plan files (``dp_results.json``): a JSON list of solved slicings, one per training setting.

Our entries::

    {"model": {"num_layers": 24, "hidden_size": 1024, "num_attention_heads": 16,
               "seq_length": 2048, "vocab_size": 50304, "name": "gpt-350m"},   # name optional
     "global_batch_size": 64, "micro_batch_size": 2, "tp": 1, "pp": 4, "dp": 2,
     "device": "NVIDIA A100-SXM4-40GB",       # where the profile was measured
     "batch_slices": [1, 1], "input_slices": [[1024, 640, 384], [1024, 640, 384]],
     "latency": 1.23, "micro_batches": 4,      # the simulated step of this many micro-batches
     "schedule": "slice-1f1b",                 # optional: the schedule planned for (the hook applies it)
     "recompute": "none",                      # activation recomputation of every stage (none/selective/full)
     "predicted_peak_bytes": [3.1e10, 2.9e10], # optional: per stage, the memory model's peak
     "documents": {"lengths": [...], "counts": [...], "horizon": 2048, ...}}  # optional: see below

``latency`` is the step time ``costs.CostModel`` simulates for ``micro_batches`` micro-batches:
with a schedule, what runs (``from_latency_model``); without one, TeraPipe's DP objective
(``identical_stages``, terapipe order). Files without ``micro_batches`` read as the global batch
over DP and the micro batch for an entry with a schedule and a global batch size, else 1; files
without ``recompute`` read as "none" (planned before recomputation was a plan dimension). The
hook refuses an entry whose recomputation is not the model's. ``documents`` (absent: causal attention
over the whole sequence) says the plan was made for packed documents (Megatron's
``--reset-attention-mask``) of the measured length distribution it records
(``documents.DocumentLengths``); the hook refuses it for a model without the flag, and a causal plan
for a model with it.

A setting is identified by the model, the batch sizes, TP/PP/DP and the device; ``write_plan``
replaces the entry of the same setting.

Files written by the original TeraPipe code are read too. Their entries have ``model_name``,
``batch_size``, ``model_parallel_size``, ``pipeline_length``, ``data_parallel_size``,
``n_nodes``, ``gpus_per_node``, ``latency``, ``batch_slices`` and ``input_slices``. They map to
model ``{"name": model_name}``, micro batch ``batch_size`` (the batch the slices split), TP, PP
and DP from the three sizes, no global batch size and no device (they match any), and ``extra``
keeping the node counts. ``input_slices`` may be one list shared by every batch slice. Such a
name (e.g. "gpt3-1b") says nothing about the layer shapes, so a legacy entry is found only when
the caller names the model explicitly: ``model="gpt3-1b"``, or a config that carries
``name="gpt3-1b"``; the sequence length is then checked through the slices. Rewriting a file
keeps legacy entries in their own format.
"""
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from .recompute import check_mode

MODEL_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size")
_LEGACY_FIELDS = ("model_name", "batch_size", "model_parallel_size", "pipeline_length", "data_parallel_size",
                  "latency", "batch_slices", "input_slices")


class PlanFileError(ValueError):
    """A plan file is missing, unreadable, or has no valid plan for the setting asked for."""


@dataclass(frozen=True)
class PlanEntry:
    model: Dict[str, Any]  # MODEL_FIELDS (+ optional "name"), or only "name" for a legacy entry
    micro_batch_size: int
    tp: int
    pp: int
    dp: int
    batch_slices: List[int]
    input_slices: List[List[int]]  # tokens, one list per batch slice
    latency: float
    global_batch_size: Optional[int] = None
    device: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # legacy fields we carry but do not use
    schedule: Optional[str] = None  # None: the config's schedule (plans of TeraPipe's DP and legacy files)
    predicted_peak_bytes: Optional[List[float]] = None  # per stage: model states + saved activations
    micro_batches: int = 1  # the micro-batches per step that ``latency`` is the simulated time of
    recompute: str = "none"  # the activation recomputation ``latency`` and the peaks were priced with
    documents: Optional[Dict[str, Any]] = None  # packed documents: the length distribution planned for

    @property
    def is_legacy(self) -> bool:
        return not set(MODEL_FIELDS) <= set(self.model)

    @property
    def key(self) -> Tuple:
        model = tuple(sorted(self.model.items())) if self.is_legacy else tuple(self.model[f] for f in MODEL_FIELDS)
        return model, self.global_batch_size, self.micro_batch_size, self.tp, self.pp, self.dp, self.device

    def describe(self) -> str:
        if self.is_legacy:
            model = f"model {self.model.get('name')!r} (TeraPipe format)"
        else:
            model = "model " + ", ".join(f"{f}={self.model[f]}" for f in MODEL_FIELDS)
            if "name" in self.model:
                model += f" ({self.model['name']})"
        extras = [f"global_batch_size={self.global_batch_size}"] if self.global_batch_size is not None else []
        extras += [f"device={self.device!r}"] if self.device is not None else []
        extras += [f"recompute={self.recompute}"] if self.recompute != "none" else []
        extras += ["packed documents"] if self.documents is not None else []
        return ", ".join([model, f"micro_batch_size={self.micro_batch_size}", f"tp={self.tp}", f"pp={self.pp}",
                          f"dp={self.dp}"] + extras)

    def to_json(self) -> Dict[str, Any]:
        if self.is_legacy:
            return {"model_name": self.model.get("name"), "batch_size": self.micro_batch_size,
                    "model_parallel_size": self.tp, "pipeline_length": self.pp, "data_parallel_size": self.dp,
                    **self.extra, "latency": self.latency, "batch_slices": self.batch_slices,
                    "input_slices": self.input_slices}
        optional = {name: getattr(self, name) for name in ("schedule", "predicted_peak_bytes", "documents")
                    if getattr(self, name) is not None}
        return {"model": self.model, "global_batch_size": self.global_batch_size,
                "micro_batch_size": self.micro_batch_size, "tp": self.tp, "pp": self.pp, "dp": self.dp,
                "device": self.device, "batch_slices": self.batch_slices, "input_slices": self.input_slices,
                "latency": self.latency, "micro_batches": self.micro_batches, "recompute": self.recompute,
                **optional, **self.extra}


def read_plans(path: str) -> List[PlanEntry]:
    return [_parse(item, index, path) for index, item in enumerate(_load(path))]


def write_plan(path: str, entry: PlanEntry) -> None:
    """Adds ``entry`` to the file (created if missing), replacing the entry of the same setting."""
    items = _load(path) if os.path.exists(path) else []
    keys = [_parse(item, index, path).key for index, item in enumerate(items)]
    if entry.key in keys:
        items[keys.index(entry.key)] = entry.to_json()
    else:
        items.append(entry.to_json())
    directory = os.path.dirname(os.path.abspath(path))
    # Written aside and renamed, so that a crash never leaves a half-written plan file behind.
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as out:
        json.dump(items, out, indent=2)
        out.write("\n")
    os.replace(out.name, path)


def find_plan(path: str, *, model: Union[str, Mapping[str, Any], Any], micro_batch_size: int, tp: int, pp: int,
              dp: int, seq_length: int, global_batch_size: Optional[int] = None,
              device: Optional[str] = None) -> PlanEntry:
    """The plan of one setting, checked against the micro batch and the sequence length.

    ``model`` is a name (matches ``model.name`` or a legacy ``model_name``), or a mapping / object
    (e.g. ``GPTConfig``) with num_layers, hidden_size, num_attention_heads and vocab_size, and
    optionally ``name``. ``global_batch_size`` and ``device`` narrow the search when given; an
    entry that does not record them matches any.
    """
    entries = read_plans(path)
    name, shape = _model_query(model, seq_length)
    sizes = dict(micro_batch_size=micro_batch_size, tp=tp, pp=pp, dp=dp)
    matches = [e for e in entries
               if _model_matches(e, name, shape, seq_length) and all(getattr(e, k) == v for k, v in sizes.items())
               and _optional_matches(e.global_batch_size, global_batch_size) and _optional_matches(e.device, device)]
    asked = _describe_query(name, shape, {**sizes, "seq_length": seq_length, "global_batch_size": global_batch_size,
                                          "device": device})
    if not matches:
        listing = "".join(f"\n  [{i}] {e.describe()}" for i, e in enumerate(entries)) or " nothing"
        raise PlanFileError(f"plan file {path} has no plan for {asked}. It contains:{listing}\n"
                            "Solve one with `seqpipe-plan solve ... --plan-file` for this setting.")
    if len(matches) > 1:
        listing = "".join(f"\n  {e.describe()}" for e in matches)
        raise PlanFileError(f"plan file {path} has {len(matches)} plans for {asked}; give the device or the "
                            f"global batch size to choose one of:{listing}")
    _check_slices(matches[0], seq_length, path)
    return matches[0]


def _load(path: str) -> List[Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PlanFileError(f"plan file {path} does not exist; create it with `seqpipe-plan solve ... "
                            f"--plan-file {path}`") from None
    except json.JSONDecodeError as e:
        raise PlanFileError(f"plan file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") \
            from None
    except OSError as e:
        raise PlanFileError(f"plan file {path} cannot be read: {e.strerror}") from None
    if not isinstance(data, list):
        raise PlanFileError(f"plan file {path} must hold a JSON list of plans, not a {type(data).__name__}")
    return data


def _parse(item: Any, index: int, path: str) -> PlanEntry:
    try:
        if "model_name" in item and "model" not in item:
            return _parse_legacy(item)
        entry = PlanEntry(model=dict(item["model"]), micro_batch_size=int(item["micro_batch_size"]),
                          tp=int(item["tp"]), pp=int(item["pp"]), dp=int(item["dp"]),
                          batch_slices=[int(b) for b in item["batch_slices"]],
                          input_slices=[[int(l) for l in ls] for ls in item["input_slices"]],
                          latency=float(item["latency"]),
                          global_batch_size=_optional_int(item.get("global_batch_size")),
                          device=item.get("device"), schedule=_schedule(item.get("schedule")),
                          predicted_peak_bytes=None if item.get("predicted_peak_bytes") is None
                          else [float(b) for b in item["predicted_peak_bytes"]],
                          recompute=check_mode(item.get("recompute") or "none"), documents=item.get("documents"))
        return replace(entry, micro_batches=int(item.get("micro_batches") or _older_micro_batches(entry)))
    except (KeyError, TypeError, ValueError) as e:
        raise PlanFileError(f"plan file {path}: entry [{index}] is malformed ({type(e).__name__}: {e}); each entry "
                            f"needs model, micro_batch_size, tp, pp, dp, batch_slices, input_slices and latency "
                            f"(or the TeraPipe fields {', '.join(_LEGACY_FIELDS)})") from None


def _older_micro_batches(entry: PlanEntry) -> int:
    """A file written before entries recorded their micro-batches: the search's step ran the global
    batch over DP; TeraPipe's DP plans one micro-batch."""
    if entry.schedule is None or entry.global_batch_size is None:
        return 1
    return entry.global_batch_size // (entry.dp * entry.micro_batch_size)


def _parse_legacy(item: Mapping[str, Any]) -> PlanEntry:
    batch_slices = [int(b) for b in item["batch_slices"]]
    slices = item["input_slices"]
    if slices and all(isinstance(s, (int, float)) for s in slices):
        slices = [slices] * len(batch_slices)  # one sequence slicing shared by every batch slice
    known = set(_LEGACY_FIELDS)
    return PlanEntry(model={"name": item["model_name"]}, micro_batch_size=int(item["batch_size"]),
                     tp=int(item["model_parallel_size"]), pp=int(item["pipeline_length"]),
                     dp=int(item["data_parallel_size"]), batch_slices=batch_slices,
                     input_slices=[[int(l) for l in ls] for ls in slices], latency=float(item["latency"]),
                     extra={k: v for k, v in item.items() if k not in known})


def _schedule(name: Any) -> Optional[str]:
    from ..schedules import SCHEDULES  # the registry is the one list of names
    if name is not None and name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r} (available: {', '.join(SCHEDULES)})")
    return name


def _optional_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def _model_query(model: Any, seq_length: int) -> Tuple[Optional[str], Optional[Dict[str, int]]]:
    """(name, shape) asked for; shape None when only a name is given."""
    if isinstance(model, str):
        return model, None
    get = model.get if isinstance(model, Mapping) else lambda f, default=None: getattr(model, f, default)
    shape = {f: get(f) for f in MODEL_FIELDS if f != "seq_length"}
    missing = [f for f, v in shape.items() if v is None]
    if missing:
        raise TypeError(f"find_plan: model lacks {', '.join(missing)}; pass a name or a config with "
                        f"{', '.join(f for f in MODEL_FIELDS if f != 'seq_length')}")
    return get("name"), {**{f: int(v) for f, v in shape.items()}, "seq_length": int(seq_length)}


def _describe_query(name: Optional[str], shape: Optional[Dict[str, int]], fields: Dict[str, Any]) -> str:
    model = f"model {name!r}" if shape is None else "model " + ", ".join(f"{f}={v}" for f, v in shape.items())
    return ", ".join([model] + [f"{k}={v!r}" for k, v in fields.items() if v is not None])


def _model_matches(entry: PlanEntry, name: Optional[str], shape: Optional[Dict[str, int]], seq_length: int) -> bool:
    if entry.is_legacy:  # records no sequence length: the slices are checked against it instead
        return name is not None and entry.model.get("name") == name
    if shape is None:
        return name is not None and entry.model.get("name") == name and entry.model["seq_length"] == seq_length
    return all(entry.model[f] == v for f, v in shape.items())


def _optional_matches(recorded: Any, asked: Any) -> bool:
    return asked is None or recorded is None or recorded == asked


def _check_slices(entry: PlanEntry, seq_length: int, path: str) -> None:
    problems = []
    if any(b < 1 for b in entry.batch_slices) or sum(entry.batch_slices) != entry.micro_batch_size:
        problems.append(f"batch_slices {entry.batch_slices} do not split the micro batch of "
                        f"{entry.micro_batch_size} into positive parts")
    if len(entry.input_slices) != len(entry.batch_slices):
        problems.append(f"{len(entry.input_slices)} lists of input_slices for {len(entry.batch_slices)} batch slices")
    for i, slices in enumerate(entry.input_slices):
        if any(l < 1 for l in slices) or sum(slices) != seq_length:
            problems.append(f"input_slices[{i}] {slices} do not split the sequence of {seq_length} tokens into "
                            "positive parts")
    if problems:
        raise PlanFileError(f"plan file {path}: the plan for {entry.describe()} is invalid: " + "; ".join(problems))
