"""TeraPipe's latency model of one pipeline stage, fitted to a profile.

A slice of b sequences, l tokens, after c tokens of context costs

    t(b, l, c) = t0(b, l) + [c > 0] * (a0 + a1*b*l + a2*b*c + a3*b*l*c) + 2 * send(b*l*hidden*bytes)

* t0 is the measured no-context time, interpolated linearly between measured lengths and batch
  sizes (the profile samples them; the paper measured every multiple of the granularity).
* The context term is the paper's linear model, scaled by b because every cost in it is per
  sequence: a2 reading the cached K/V, a3 the attention scores of new against cached tokens, and
  a0/a1 the step from the plain causal kernel to the cached-context path. It is fitted by least
  squares on relative residuals, since the plan cares about every slice alike, short or long,
  with every coefficient >= 0 (each is a cost; noise must not make context cheaper).
* send is latency + bytes / bandwidth, fitted the same way; a slice sends its activations forward
  and its gradients back, hence the 2.

Per stage (for the schedule-exact search, ``stage_compute``): the first stage adds its embedding
and the last its final norm, LM head and loss, each e0 + e1*b*l (fitted to the profile's
``stage_ends``); the forward takes ``forward_fraction`` of a slice's compute (the median measured
share); and ``saved_bytes_per_token`` (first / middle / last) is what the memory model charges per
token alive on a stage. Models fitted to older profiles have none of these: no ends,
``costs.FORWARD_FRACTION``, none. ``message_bytes_per_token`` (``bytes_per_token`` in older model
files) is the p2p message's bytes per token, which ``send`` charges.

Activation recomputation (one mode for every stage): ``recompute_extra[mode]`` is what the rerun
adds to a slice's backward as a multiple of its layers' forward (``recompute_extra``, from the
profile's ``recompute`` rows), and ``recompute_bytes[mode]`` the profile's metered bytes of that
mode (``profile.activation_bytes``). Models fitted before either was measured price "none" alone.

Split backwards (``slice-zb``): ``weight_coef`` holds the W seconds, w0 + w1*b*l, of the stage's
layers ("layers", from the profile's ``weight`` rows) and of the LM head ("last", from the
``stage_ends`` rows); W is weight GEMMs, which do not read the context. ``weight_time`` is a
stage's W; the rest of the backward is B. A model fitted before W was measured has none, and the
cost model then takes Zero Bubble PP's t_W = t_F.

The held-out check refits without a random part of the measured points and reports the relative
error on them (the paper reports < 2%); the model returned is then refitted on every point.
"""
import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .costs import FORWARD_FRACTION, slice_grid

MODEL_FILE_FORMAT = "seqpipe-latency-model/1"
CONTEXT_TERMS = ("a0", "a1*b*l", "a2*b*c", "a3*b*l*c")
# Fields of older model files under their new names ("bytes_per_token" now only names saved activations).
_RENAMED = {"bytes_per_token": "message_bytes_per_token"}


@dataclass(frozen=True)
class LatencyModel:
    batch_sizes: List[int]  # measured b, ascending
    lengths: List[List[int]]  # per batch size: measured l (c = 0), ascending
    no_context: List[List[float]]  # per batch size: t0 at those lengths
    context_coef: List[float]  # a0..a3, see CONTEXT_TERMS
    send_coef: List[float]  # [latency, seconds per byte]
    message_bytes_per_token: int  # a p2p message's bytes per token of one sequence: hidden_size * element size
    update_time: float  # optimizer step of the stage
    stage_ends: Dict[str, List[float]] = field(default_factory=dict)  # "first"/"last": [e0, e1] (s, s per token)
    forward_fraction: float = FORWARD_FRACTION  # forward's share of a slice's compute time
    saved_bytes_per_token: Dict[str, float] = field(default_factory=dict)  # "first"/"middle"/"last"
    # Per recomputation mode besides "none": the rerun's backward seconds as a multiple of the layers' forward.
    recompute_extra: Dict[str, float] = field(default_factory=dict)
    # Per recomputation mode ("none" too): its ``profile.saved_bytes_per_token`` (kept, transient, context).
    recompute_bytes: Dict[str, Dict] = field(default_factory=dict)
    weight_coef: Dict[str, List[float]] = field(default_factory=dict)  # "layers"/"last": [w0, w1] of a split W

    def predict(self, b, l, c) -> np.ndarray:
        """Slice times (compute + sends) for arrays of b, l, c; inf outside the measured b and l."""
        return self.compute_time(b, l, c) + 2.0 * self.send_time(b, l)

    def compute_time(self, b, l, c) -> np.ndarray:
        """Forward + backward time of the stage's layers alone (what the profile measures)."""
        b, l, c = (np.asarray(v, dtype=float) for v in np.broadcast_arrays(b, l, c))
        a0, a1, a2, a3 = self.context_coef
        context = np.where(c > 0, a0 + a1 * b * l + a2 * b * c + a3 * b * l * c, 0.0)
        return self._no_context(b, l) + context

    def recompute_time(self, mode: str, b, l, c) -> np.ndarray:
        """What recomputation ``mode`` adds to a slice's backward: the measured multiple of its layers'
        forward (the embedding and the head are never recomputed)."""
        if mode not in self.recompute_extra:
            raise ValueError(f"the latency model has no measured cost of recompute {mode!r}")
        return self.recompute_extra[mode] * self.forward_fraction * self.compute_time(b, l, c)

    def memory_per_token(self, mode: str = "none") -> Dict:
        """The profile's saved bytes of recomputation ``mode`` (``profile.saved_bytes_per_token``'s
        layout; a model fitted before the modes were measured has "none"'s kept bytes alone); empty
        when not measured."""
        if mode == "none":
            return self.recompute_bytes.get("none") or (
                {"kept": self.saved_bytes_per_token} if self.saved_bytes_per_token else {})
        return self.recompute_bytes.get(mode, {})

    def stage_compute(self, b, l, c, first: bool, last: bool) -> np.ndarray:
        """Forward + backward compute of a slice on a stage: the layers plus the stage's own ends."""
        return self.compute_time(b, l, c) + self.ends_time(b, l, first, last)

    def ends_time(self, b, l, first: bool, last: bool) -> np.ndarray:
        """What the first stage's embedding and the last stage's LM head + loss add to a slice."""
        b, l = (np.asarray(v, dtype=float) for v in np.broadcast_arrays(b, l))
        t = np.zeros_like(b * l)
        for end, present in (("first", first), ("last", last)):
            if present and end in self.stage_ends:
                e0, e1 = self.stage_ends[end]
                t = t + e0 + e1 * b * l
        return t

    def weight_time(self, b, l, last: bool) -> Optional[np.ndarray]:
        """The W (weight-gradient) seconds of a slice's split backward on a stage: its layers', plus the
        LM head's on the last stage; None where the profile did not measure it."""
        if "layers" not in self.weight_coef:
            return None
        tokens = np.asarray(b, dtype=float) * np.asarray(l, dtype=float)
        ends = [("layers", True), ("last", last)]
        return sum(self.weight_coef[end][0] + self.weight_coef[end][1] * tokens
                   for end, present in ends if present and end in self.weight_coef)

    def send_time(self, b, l) -> np.ndarray:
        """One activation (or its gradient) of b sequences and l tokens, between neighbour stages."""
        return self.send_coef[0] + self.send_coef[1] * np.asarray(b, dtype=float) * l * self.message_bytes_per_token

    def grid(self, batch_size: int, seq_len: int, granularity: int) -> np.ndarray:
        """``grid[b, l // g, c // g]`` for ``solve``: predicted times, inf where l + c > seq_len."""
        return slice_grid(self.predict, batch_size, seq_len, granularity)

    def _no_context(self, b: np.ndarray, l: np.ndarray) -> np.ndarray:
        # Linear in l for every measured b, then linear in b. Outside the measured ranges the
        # model has nothing to say, which the planner must see as "not allowed", not a guess.
        sizes = np.asarray(self.batch_sizes, dtype=float)
        flat_b, flat_l = b.ravel(), l.ravel()
        per_size = np.stack([np.interp(flat_l, ls, ts) for ls, ts in zip(self.lengths, self.no_context)])
        measured = np.stack([(flat_l >= ls[0]) & (flat_l <= ls[-1]) for ls in self.lengths])
        upper = np.clip(np.searchsorted(sizes, flat_b), 0, sizes.size - 1)
        lower = np.where(sizes[upper] == flat_b, upper, np.maximum(upper - 1, 0))
        span = sizes[upper] - sizes[lower]
        weight = np.divide(flat_b - sizes[lower], span, out=np.zeros_like(flat_b), where=span > 0)
        column = np.arange(flat_b.size)
        t = per_size[lower, column] + weight * (per_size[upper, column] - per_size[lower, column])
        valid = measured[lower, column] & measured[upper, column] & (flat_b >= sizes[0]) & (flat_b <= sizes[-1])
        return np.where(valid, t, np.inf).reshape(b.shape)

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict) -> "LatencyModel":
        data = {_RENAMED.get(name, name): value for name, value in data.items()}
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass(frozen=True)
class FitReport:
    model: LatencyModel
    heldout_mean_error: float  # relative, on points left out of the check fit
    heldout_max_error: float
    heldout_points: int
    send_error: Optional[float]  # mean relative residual of the send fit; None without p2p data


def fit_profile(profile: Dict, holdout: float = 0.2, seed: int = 0) -> FitReport:
    """Fits the latency model to a profile (see ``profile.py``) and checks it on held-out points."""
    b, l, c, t = _compute_points(profile)
    check = _heldout_mask(b, l, c, holdout, np.random.default_rng(seed))
    send_coef, send_error = _fit_send(profile.get("p2p") or [])
    shared = dict(send_coef=send_coef, message_bytes_per_token=_message_bytes_per_token(profile["config"]),
                  update_time=float(profile.get("optimizer_step") or 0.0),
                  stage_ends={end: _fit_tokens(rows) for end, rows in (profile.get("stage_ends") or {}).items()},
                  forward_fraction=_forward_fraction(profile),
                  saved_bytes_per_token=dict(profile.get("saved_bytes_per_token") or {}),
                  recompute_extra=recompute_extra(profile.get("recompute") or []),
                  recompute_bytes=dict(profile.get("recompute_bytes") or {}),
                  weight_coef=weight_coef(profile))
    trial = _fit_compute(b[~check], l[~check], c[~check], t[~check], shared)
    error = np.abs(trial.compute_time(b[check], l[check], c[check]) - t[check]) / t[check]
    return FitReport(model=_fit_compute(b, l, c, t, shared),
                     heldout_mean_error=float(error.mean()) if error.size else float("nan"),
                     heldout_max_error=float(error.max()) if error.size else float("nan"),
                     heldout_points=int(error.size), send_error=send_error)


def fit_summary(report: FitReport, profile: Dict) -> List[str]:
    """What a fit found, line by line: the model's terms, its held-out error and the adaptive profile's."""
    model = report.model
    lines = [f"no-context table: batch sizes {model.batch_sizes}, {sum(map(len, model.lengths))} lengths",
             # Each term's name starts with its coefficient ("a2*b*c"): the value goes in its place.
             "context term: " + " + ".join(f"{c:.4g}{term[2:]}" for term, c in zip(CONTEXT_TERMS, model.context_coef)),
             "sends: not measured, taken as free" if report.send_error is None else
             f"sends: {model.send_coef[0]:.4g} s + {model.send_coef[1] * 1e9:.4g} s per GB "
             f"(mean relative error {report.send_error:.2%})",
             f"optimizer step: {model.update_time:.4g} s; forward share of a slice: {model.forward_fraction:.2f}"]
    lines += [f"{end} stage adds {e0:.4g} s + {e1 * 1e6:.4g} us per token"
              for end, (e0, e1) in model.stage_ends.items()]
    if model.saved_bytes_per_token:
        lines.append("saved for backward per token: " + ", ".join(f"{kind} stage {v / 1024:.1f} KiB"
                                                                  for kind, v in model.saved_bytes_per_token.items()))
    for mode, extra in model.recompute_extra.items():
        kept = model.memory_per_token(mode).get("kept")
        lines.append(f"recompute {mode}: backward + {extra:.3g} x the layers' forward"
                     + (f", keeps {kept['middle'] / 1024:.1f} KiB per token (middle stage)" if kept else ""))
    lines.append(f"held-out relative error on {report.heldout_points} points: mean {report.heldout_mean_error:.2%}, "
                 f"max {report.heldout_max_error:.2%}")
    adaptive = profile.get("adaptive")
    if adaptive:
        rounds = adaptive["context_round_errors"]
        lines.append(f"adaptive profile: {len(profile['compute'])} slice shapes; length midpoints off the line by "
                     f"{max(adaptive['length_midpoint_errors'], default=0):.2%} at most; context rounds predicted to "
                     + (", ".join(f"{e:.2%}" for e in rounds) if rounds else "- (one round)"))
    return lines


@dataclass(frozen=True)
class ModelFile:
    """A fitted model with the profile's setting (config, device) that planning needs."""
    model: LatencyModel
    config: Dict  # the profile's ProfileSpec fields
    device: str
    calibration: Optional[Dict] = None  # an in-engine calibration (planner/calibrate.py), if one was stored


def write_model_file(path: str, report: FitReport, profile: Dict) -> None:
    data = {"format": MODEL_FILE_FORMAT, "device": profile.get("device"), "torch_version": profile.get("torch_version"),
            "config": profile["config"], "model": report.model.to_dict(),
            "heldout_mean_error": report.heldout_mean_error, "heldout_max_error": report.heldout_max_error,
            "heldout_points": report.heldout_points, "send_error": report.send_error}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def read_model_file(path: str) -> ModelFile:
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != MODEL_FILE_FORMAT:
        raise ValueError(f"{path} is not a latency model written by `seqpipe-plan fit` (format "
                         f"{data.get('format')!r}, expected {MODEL_FILE_FORMAT!r})")
    return ModelFile(model=LatencyModel.from_dict(data["model"]), config=data["config"], device=data["device"],
                     calibration=data.get("calibration"))


def _compute_points(profile: Dict) -> Tuple[np.ndarray, ...]:
    rows = profile.get("compute") or []
    if not rows:
        raise ValueError("the profile has no compute measurements")
    b, l, c, t = (np.array([row[key] for row in rows], dtype=float) for key in ("b", "l", "c", "time"))
    if (t <= 0).any() or not np.isfinite(t).all():
        raise ValueError("the profile holds non-positive or non-finite times")
    return b, l, c, t


def _heldout_mask(b, l, c, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Random points to check on. Never a length at either end of its batch size's no-context
    range (the interpolation needs both ends), nor so many context points that the check fit
    would have fewer than it needs."""
    interior = np.zeros(b.size, dtype=bool)
    for size in np.unique(b):
        plain = (b == size) & (c == 0)
        interior |= plain & (l > l[plain].min()) & (l < l[plain].max())
    context = np.flatnonzero(c > 0)
    keep = max(0, context.size - len(CONTEXT_TERMS))
    chosen = [rng.choice(interior.nonzero()[0], size=int(round(fraction * interior.sum())), replace=False),
              rng.choice(context, size=min(keep, int(round(fraction * context.size))), replace=False)]
    mask = np.zeros(b.size, dtype=bool)
    mask[np.concatenate(chosen)] = True
    return mask


def fit_compute(b, l, c, t) -> LatencyModel:
    """The compute part alone (no sends, ends or step), for the adaptive profile's checks."""
    return _fit_compute(*(np.asarray(v, dtype=float) for v in (b, l, c, t)),
                        dict(send_coef=[0.0, 0.0], message_bytes_per_token=0, update_time=0.0))


def _fit_compute(b, l, c, t, shared: Dict) -> LatencyModel:
    plain = c == 0
    sizes = np.unique(b[plain])
    lengths, no_context = [], []
    for size in sizes:
        rows = plain & (b == size)
        order = np.argsort(l[rows])
        lengths.append([int(v) for v in l[rows][order]])
        no_context.append([float(v) for v in t[rows][order]])
    base = LatencyModel(batch_sizes=[int(s) for s in sizes], lengths=lengths, no_context=no_context,
                        context_coef=[0.0] * len(CONTEXT_TERMS), **shared)
    ctx = ~plain
    if ctx.sum() < len(CONTEXT_TERMS):
        raise ValueError(f"the profile has {int(ctx.sum())} measurements with context; the context model "
                         f"({' + '.join(CONTEXT_TERMS)}) needs at least {len(CONTEXT_TERMS)}")
    bc, lc, cc, tc = b[ctx], l[ctx], c[ctx], t[ctx]
    residual = tc - base.compute_time(bc, lc, cc)
    if not np.isfinite(residual).all():
        raise ValueError("measurements with context lie outside the measured no-context lengths or batch sizes")
    features = np.stack([np.ones_like(bc), bc * lc, bc * cc, bc * lc * cc], axis=1)
    coef = _relative_nnls(features, residual, tc)
    return LatencyModel(batch_sizes=base.batch_sizes, lengths=lengths, no_context=no_context,
                        context_coef=[float(v) for v in coef], **shared)


def _fit_tokens(rows: List[Dict]) -> List[float]:
    """[e0, e1] of e0 + e1 * b * l fitted to a stage end's measured times."""
    tokens, t = (np.array([row["b"] * row["l"] if key == "tokens" else row[key] for row in rows], dtype=float)
                 for key in ("tokens", "time"))
    if tokens.size < 2 or np.unique(tokens).size < 2:
        raise ValueError("a stage end needs measurements at >= 2 token counts")
    return [float(v) for v in _relative_lstsq(np.stack([np.ones_like(tokens), tokens], axis=1), t, t)]


def weight_coef(profile: Dict) -> Dict[str, List[float]]:
    """[w0, w1] of the W seconds, w0 + w1 * b * l, of the layers and of the last stage's head, fitted
    to the profile's split-backward rows, each >= 0 (empty for a profile without them)."""
    rows = {"layers": profile.get("weight") or [], "last": (profile.get("stage_ends") or {}).get("last") or []}
    return {end: [max(0.0, v) for v in _fit_tokens([{**row, "time": row["weight"]} for row in found])]
            for end, found in rows.items() if found and all("weight" in row for row in found)}


def recompute_extra(rows: List[Dict]) -> Dict[str, float]:
    """Per recomputation mode (besides "none"), what it adds to a slice's time as a multiple of the
    plain slice's forward: the median over the points timed in both (``profile.recompute_rows``),
    at least 0 (a rerun is never free; a negative median is noise)."""
    plain = {(r["b"], r["l"], r["c"]): r for r in rows if r["recompute"] == "none"}
    ratios: Dict[str, List[float]] = {}
    for row in rows:
        base = plain.get((row["b"], row["l"], row["c"]))
        if row["recompute"] != "none" and base is not None:
            ratios.setdefault(row["recompute"], []).append((row["time"] - base["time"]) / base["forward"])
    return {mode: max(0.0, float(np.median(values))) for mode, values in ratios.items()}


def _forward_fraction(profile: Dict) -> float:
    shares = [row["forward"] / row["time"] for row in profile.get("compute") or [] if "forward" in row]
    return float(np.median(shares)) if shares else FORWARD_FRACTION


def _fit_send(rows: List[Dict]) -> Tuple[List[float], Optional[float]]:
    if not rows:
        return [0.0, 0.0], None
    size, t = (np.array([row[key] for row in rows], dtype=float) for key in ("bytes", "time"))
    coef = _relative_lstsq(np.stack([np.ones_like(size), size], axis=1), t, t)
    error = np.abs(coef[0] + coef[1] * size - t) / t
    return [float(v) for v in coef], float(error.mean())


def _relative_nnls(features: np.ndarray, target: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``_relative_lstsq`` with every coefficient >= 0: each context term is a cost, and on a noisy
    machine an unconstrained fit can make slices with context cheaper than without, or negative
    (then no plan can be solved). Columns are normalised first, as NNLS is not scale invariant."""
    from scipy.optimize import nnls
    weighted = features / scale[:, None]
    norms = np.linalg.norm(weighted, axis=0)
    norms[norms == 0] = 1.0
    coef, _ = nnls(weighted / norms, target / scale)
    return coef / norms


def _relative_lstsq(features: np.ndarray, target: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Least squares on errors relative to ``scale`` (the measured times)."""
    coef, *_ = np.linalg.lstsq(features / scale[:, None], target / scale, rcond=None)
    return coef


def _message_bytes_per_token(config: Dict) -> int:
    return int(config["hidden_size"]) * int(config.get("dtype_bytes", 4))
