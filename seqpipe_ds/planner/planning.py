"""From a fitted latency model to plan-file entries: what ``seqpipe-plan solve`` and ``seqpipe-bench``
plan, as library calls (the commands parse, call these and print).

* ``dp_plan``: TeraPipe's DP over one micro-batch; on the profiled stage's slice times
  (``CostModel.identical_stages``) its latency is the DP's objective.
* ``makespan_plan``: the schedule-exact search (``search.py``) over schedules, micro-batch splits
  and slicings with every stage's own costs (``CostModel.from_latency_model``), under a per-stage
  memory limit when the profile measured the saved bytes per token; with ``recompute_modes``, also
  the activation recomputation (one mode for every stage), each mode's memory from ``stage_memory``.
* ``budget_plans``: stock DeepSpeed's and seqpipe's fastest configurations predicted to fit one
  memory limit (what ``seqpipe-bench --memory-limit`` runs).
* ``entry``: a plan-file entry for either, recording the micro-batches its latency is for, so that
  ``simulate_entry`` (``seqpipe-plan show``) reproduces the latency.
* ``bench_plans``, ``bench_variant``, ``variant_plan`` and ``predict_run``: what ``seqpipe-bench``
  plans, runs and predicts for each of its variants (``seqpipe_ds.benchmark``'s spec).
* ``calibration_variants``, ``calibration_runs``, ``missed_predictions`` and
  ``keep_first_predictions``: its in-engine calibration (``calibrate.py``), and the second one,
  fitted on the calibration variants its timing launch also runs.

Each takes ``documents`` (``documents.PackedDocuments``, the measured document lengths) to plan and
price packed documents: the expected same-document context of every slice instead of the causal one;
plan entries record the distribution, so ``simulate_entry`` prices them the same way again.
"""
from dataclasses import replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..model.presets import options
from ..schedules import SimResult
from ..slicing import SlicePlan, make_plan
from .calibrate import Calibration, Run, misses
from .costs import Candidate, CostModel, simulate_plan
from .documents import DocumentLatencyModel, DocumentLengths, PackedDocuments
from .fit import ModelFile, read_model_file
from .memory_model import MemoryModel, stage_parameters
from .plan_file import PlanEntry, PlanFileError, read_plans, write_plan
from .recompute import RECOMPUTE_MODES, granularity
from .search import (SCHEDULE_NAMES, MemoryByMode, SearchResult, divisors, fastest_fitting, prefer_unsliced,
                     search, stock_candidates)
from .solve import solve


def model_fields(config: Mapping, stages: int, seq_len: int, num_model_layers: Optional[int] = None,
                 name: Optional[str] = None) -> Dict:
    """The plan file's model of a profile's config: its layers x ``stages`` unless given."""
    model = {"num_layers": num_model_layers or config["num_layers"] * stages, "hidden_size": config["hidden_size"],
             "num_attention_heads": config["num_attention_heads"], "seq_length": seq_len,
             "vocab_size": config["vocab_size"]}
    return {**model, **({"name": name} if name else {})}


def cost_model(found: ModelFile, stages: int, update_time: Optional[float] = None,
               identical: bool = False, recompute: str = "none",
               documents: Optional[PackedDocuments] = None) -> CostModel:
    """What runs (``identical`` False) or TeraPipe's DP's reading of the model file, under
    recomputation ``recompute``, with the optimizer step's time replaced when ``update_time`` is
    given, and with ``documents`` for packed documents (``documents.DocumentLatencyModel``). What
    runs carries the file's in-engine calibration when it was made on ``stages`` stages
    (``calibrate.py``)."""
    model = found.model if update_time is None else replace(found.model, update_time=update_time)
    if documents is not None:
        model = DocumentLatencyModel.of(model, documents)
    if identical:
        return CostModel.identical_stages(model, stages, found.config["hidden_size"], recompute)
    costs = CostModel.from_latency_model(model, stages, found.config["hidden_size"], recompute)
    calibration = Calibration.from_dict(found.calibration) if found.calibration else None
    return calibration.apply(costs) if calibration and calibration.stages == stages else costs


def stage_memory(found: ModelFile, stages: int, seq_len: int, num_model_layers: Optional[int] = None,
                 precision: Optional[str] = None, zero_stage: int = 0, dp: int = 1,
                 recompute: str = "none") -> Optional[MemoryModel]:
    """Each stage's model states and, under recomputation ``recompute``, its activation bytes: what a
    token keeps and the KV cache holds, the profiled layers' share scaled to the stage's layers; a
    backward's transient (one layer rerun at a time) as measured. None when the profile measured no
    saved bytes; ValueError when it measured none for ``recompute``."""
    config, measured = found.config, found.model.memory_per_token(recompute)
    if not measured:
        if recompute == "none":
            return None
        raise ValueError(f"the profile measured no saved bytes under recompute {recompute!r}: re-profile with "
                         f"--recompute-modes {recompute}")
    layers = num_model_layers or config["num_layers"] * stages
    shape = {**model_fields(config, stages, seq_len, layers), "max_position_embeddings": seq_len,
             **(options(config["model_preset"]) if config.get("model_preset") else {})}
    kept, stage_layers = measured["kept"], -(-layers // stages)
    layer_bytes = kept["middle"] * stage_layers / config["num_layers"]  # the layers' bytes, scaled
    per_token = {kind: layer_bytes + value - kept["middle"] for kind, value in kept.items()}
    context = measured.get("context", 0.0)  # one layer's cached K/V per token, which autograd did not keep
    return MemoryModel.for_stages(stage_parameters(shape, stages, config["tp"]), per_token,
                                  precision or config.get("dtype", "fp32"), zero_stage, dp,
                                  transient=measured.get("transient"), context=context, cache=context * stage_layers,
                                  recompute=recompute)


def measured_modes(found: ModelFile) -> Tuple[str, ...]:
    """The recomputation modes the model file can price: "none", and each mode whose time the
    profile measured and, where it metered bytes at all, its bytes too."""
    model = found.model
    metered = bool(model.memory_per_token("none"))
    return ("none",) + tuple(mode for mode in RECOMPUTE_MODES[1:]
                             if mode in model.recompute_extra and (not metered or model.memory_per_token(mode)))


def memory_by_mode(found: ModelFile, stages: int, seq_len: int, modes: Sequence[str],
                   num_model_layers: Optional[int] = None, precision: Optional[str] = None, zero_stage: int = 0,
                   dp: int = 1) -> Optional[Dict[str, MemoryModel]]:
    """``stage_memory`` of every mode in ``modes``; None when the profile measured no saved bytes."""
    models = {mode: stage_memory(found, stages, seq_len, num_model_layers, precision, zero_stage, dp, mode)
              for mode in modes}
    return None if any(m is None for m in models.values()) else models


def makespan_plan(found: ModelFile, stages: int, batch_size: int, seq_len: int, granularity: int,
                  schedules: Sequence[str] = SCHEDULE_NAMES, memory: Optional[MemoryByMode] = None,
                  memory_limit: Optional[float] = None, update_time: Optional[float] = None,
                  progress: Optional[Callable[[str], None]] = None,
                  recompute_modes: Sequence[str] = ("none",),
                  documents: Optional[PackedDocuments] = None) -> SearchResult:
    """The schedule-exact search under every mode of ``recompute_modes`` (``memory``: one model per
    mode, ``memory_by_mode``), over the micro-batch sizes the profile can time. With an in-engine
    calibration for ``stages`` stages, unsliced 1F1B wins whenever it is predicted within the
    calibration's stated error of the fastest (``search.prefer_unsliced``)."""
    if memory_limit is not None and memory is None:
        raise ValueError("the latency model records no saved bytes per token: re-profile (seqpipe-plan profile) to "
                         "plan under a memory limit")
    result = search(cost_model(found, stages, update_time, documents=documents), batch_size, seq_len, granularity,
                    schedules, memory, memory_limit, micro_batch_sizes=timed_micro_batches(found, batch_size),
                    progress=progress, recompute_modes=recompute_modes)
    calibration = Calibration.from_dict(found.calibration) if found.calibration else None
    return prefer_unsliced(result, calibration.residual) if calibration and calibration.stages == stages else result


def budget_plans(found: ModelFile, stages: int, batch_size: int, memory_limit: Optional[float],
                 num_model_layers: Optional[int] = None, recompute_modes: Optional[Sequence[str]] = None,
                 schedules: Sequence[str] = SCHEDULE_NAMES, precision: Optional[str] = None, zero_stage: int = 0,
                 dp: int = 1, progress: Optional[Callable[[str], None]] = None) -> Tuple[Candidate, Candidate]:
    """(stock DeepSpeed's, seqpipe's) fastest configuration predicted to fit ``memory_limit`` per stage
    at the profiled sequence length and granularity: stock chooses the micro-batch size and the
    recomputation of unsliced 1F1B (``search.stock_candidates``), seqpipe also the schedule and the
    slicing (``search.search``); both under every mode of ``recompute_modes`` (default: every mode
    the profile measured, ``measured_modes``). Each raises ``search.NoFit`` (naming its smallest
    peak) when nothing of that side fits; ValueError when the profile measured no saved bytes for
    some mode."""
    config = found.config
    recompute_modes = recompute_modes or measured_modes(found)
    seq_len, granularity = config["seq_length"], config["granularity"]
    memory = memory_by_mode(found, stages, seq_len, recompute_modes, num_model_layers, precision, zero_stage, dp)
    if memory is None and memory_limit is not None:
        raise ValueError("the latency model records no saved bytes per token: re-profile (seqpipe-plan profile) to "
                         "plan under a memory limit")
    if memory is not None:
        memory[recompute_modes[0]].check_limit(memory_limit)  # model states alone: the same in every mode
    stock = stock_candidates(cost_model(found, stages), memory, batch_size, seq_len, recompute_modes,
                             timed_micro_batches(found, batch_size))
    seqpipe = makespan_plan(found, stages, batch_size, seq_len, granularity, schedules, memory, memory_limit,
                            progress=progress, recompute_modes=recompute_modes)
    return fastest_fitting(stock, memory_limit), seqpipe.best


def timed_micro_batches(found: ModelFile, batch_size: int) -> List[int]:
    """The micro-batch sizes dividing ``batch_size`` that the profile measured up to."""
    return [m for m in divisors(batch_size) if m <= max(found.model.batch_sizes)]


def dp_plan(costs: CostModel, batch_size: int, seq_len: int, granularity: int,
            schedules: Sequence[str] = ("terapipe",)) -> Candidate:
    """TeraPipe's exact DP over one micro-batch of ``batch_size`` sequences on the slowest stage's slice
    times, simulated on the fastest of ``schedules``. With ``cost_model(..., identical=True)`` and
    terapipe its makespan is the DP's objective; with every stage's costs it is the comparison the
    search must win."""
    dp = solve(costs.bottleneck_grid(batch_size, seq_len, granularity), batch_size, seq_len, costs.stages,
               granularity, costs.step)
    plan = make_plan(dp.batch_slices, dp.input_slices, batch_size, seq_len)
    return min((costs.predict(s, 1, plan, source="TeraPipe DP") for s in schedules), key=lambda c: c.makespan)


def entry(model: Dict, tp: int, pp: int, dp: int, plan: Candidate, global_batch_size: Optional[int] = None,
          device: Optional[str] = None, dp_objective: bool = False,
          documents: Optional[PackedDocuments] = None) -> PlanEntry:
    """The plan-file entry of a candidate (planned for packed ``documents``: their lengths). A plan of
    TeraPipe's DP objective records no schedule: the config's applies, and ``simulate_entry`` prices
    it as the DP did."""
    return PlanEntry(model=model, micro_batch_size=plan.micro_batch_size, tp=tp, pp=pp, dp=dp,
                     batch_slices=list(plan.plan.batch_slices), input_slices=[list(s) for s in plan.plan.seq_slices],
                     latency=plan.makespan, global_batch_size=global_batch_size, device=device,
                     schedule=None if dp_objective else plan.schedule, predicted_peak_bytes=plan.peak_bytes,
                     micro_batches=plan.micro_batches, recompute=plan.recompute,
                     documents=documents.lengths.to_dict() if documents else None)


def entry_plan(entry: PlanEntry) -> SlicePlan:
    return make_plan(entry.batch_slices, entry.input_slices, entry.micro_batch_size, sum(entry.input_slices[0]))


def simulate_entry(found: ModelFile, entry: PlanEntry, schedule: Optional[str] = None,
                   micro_batches: Optional[int] = None) -> SimResult:
    """The step a plan-file entry's latency records: its schedule, micro-batches and recomputation
    with every stage's costs, or for an entry without a schedule (TeraPipe's DP, legacy files) the
    DP's objective on the terapipe order. ``schedule`` / ``micro_batches`` simulate it otherwise."""
    documents = PackedDocuments(DocumentLengths.from_dict(entry.documents)) if entry.documents else None
    costs = cost_model(found, entry.pp, identical=entry.schedule is None, recompute=entry.recompute,
                       documents=documents)
    return costs.simulate(schedule or entry.schedule or "terapipe", micro_batches or entry.micro_batches,
                          entry_plan(entry))


def bench_plans(model_file: str, stages: int, batch_size: int, num_layers: int, dp_file: str,
                makespan_file: str, documents: Optional[PackedDocuments] = None) -> Tuple[Candidate, Candidate]:
    """TeraPipe's DP (the batch as one micro-batch) into ``dp_file`` and the schedule-exact search into
    ``makespan_file``, for ``stages`` stages of ``num_layers`` layers in all, at the profiled sequence
    length and granularity, without a memory limit (with ``documents``: for packed documents)."""
    found = read_model_file(model_file)
    config = found.config
    seq_len, granularity = config["seq_length"], config["granularity"]
    dp = dp_plan(cost_model(found, stages, identical=True, documents=documents), batch_size, seq_len, granularity)
    searched = makespan_plan(found, stages, batch_size, seq_len, granularity,
                             memory=stage_memory(found, stages, seq_len, num_layers), documents=documents).best
    model = model_fields(config, stages, seq_len, num_layers)
    for path, plan in ((dp_file, dp), (makespan_file, searched)):
        write_plan(path, entry(model, config["tp"], stages, 1, plan, device=found.device, dp_objective=plan is dp,
                               documents=documents))
    return dp, searched


def pipeline_entry(plan_file: str, stages: int, batch_size: int) -> PlanEntry:
    """The first plan of ``plan_file`` for ``stages`` stages whose micro batch divides ``batch_size``."""
    entries = [e for e in read_plans(plan_file) if e.pp == stages and batch_size % e.micro_batch_size == 0]
    if not entries:
        raise PlanFileError(f"{plan_file} has no plan for {stages} stages and a micro-batch dividing {batch_size}")
    return entries[0]


def bench_variant(micro_batch_size: int, gradient_accumulation: int, seqpipe: Optional[Dict],
                  recompute: str = "none") -> Dict:
    """One variant of ``seqpipe_ds.benchmark``'s spec: micro-batches of ``micro_batch_size`` sequences,
    ``gradient_accumulation`` of them per step, ``seqpipe`` the ds_config section (None: stock
    DeepSpeed) and ``recompute`` a plan's recomputation mode."""
    return {"micro_batch_size": micro_batch_size, "gradient_accumulation": gradient_accumulation,
            "seqpipe": seqpipe, "recompute": granularity(recompute)}


# The calibration run: slice counts of slice-1f1b on micro-batches of one sequence (1: stock's unsliced 1F1B),
# those whose slices are at least the granularity (the shortest slice the profile times and the planner picks).
CALIBRATION_SLICES = (1, 4, 8)
# Its timed iterations per slicing, each traced: a unit's time is its median over them (calibrate.py).
CALIBRATION_REPEATS = 3


def calibration_variants(batch_size: int, seq_length: int, granularity_tokens: int) -> Dict[str, Dict]:
    """The in-engine calibration run's variants: slice-1f1b with each of ``CALIBRATION_SLICES`` whose
    slices are at least ``granularity_tokens``, on up to two micro-batches of one sequence; and where
    ``batch_size`` > 1 the most slices on one micro-batch of the whole batch, so that the fit sees units
    of several sequences and can tell what the engine adds per sequence (calibrate.py)."""
    counts = [k for k in CALIBRATION_SLICES if seq_length // k >= granularity_tokens]
    if not counts:
        raise ValueError(f"no calibration slicing of {seq_length} tokens has slices of at least "
                         f"{granularity_tokens} (the granularity)")
    micro_batches = min(batch_size, 2)
    variants = {f"calibration: {k} slice(s)": bench_variant(1, micro_batches,
                                                            {"seq_slices": k, "schedule": "slice-1f1b"})
                for k in counts}
    if batch_size > 1:
        variants[f"calibration: {counts[-1]} slice(s) of {batch_size}"] = bench_variant(
            batch_size, 1, {"seq_slices": counts[-1], "schedule": "slice-1f1b"})
    return variants


def calibration_runs(variants: Mapping[str, Mapping], timing: Mapping, stages: int, batch_size: int,
                     seq_length: int) -> List[Run]:
    """The traced runs of a launch's calibration variants (``seqpipe_ds.benchmark``'s result, ``"timed_traces"``)."""
    return [Run(*variant_plan(variant, stages, batch_size, seq_length), timing["timed_traces"][name],
                timing["times"][name]) for name, variant in variants.items()]


# seqpipe-bench's second calibration: fitted on the calibration variants the timing launch also runs
# (alternating with the timed ones), or none.
RECALIBRATE_WHEN = ("in-timing", "never")


def missed_predictions(model_file: str, rows: Sequence[Mapping]) -> List[str]:
    """The timed rows whose prediction (``predicted_s``) is further from their measured ``s_per_iter``
    than the model file's calibration states."""
    found = read_model_file(model_file)
    if found.calibration is None:
        raise ValueError(f"{model_file} has no calibration to check")
    return misses(Calibration.from_dict(found.calibration),
                  {row["variant"]: (row["predicted_s"], row["s_per_iter"]) for row in rows if row.get("predicted_s")})


def keep_first_predictions(first: Sequence[Mapping], rows: Sequence[Dict]) -> None:
    """Records in ``rows`` (predicted from a second calibration) the first calibration's prediction of
    each variant and its error against the measured step (``first_calibration_predicted_s``, ``_error``)."""
    predicted = {row["variant"]: row.get("predicted_s") for row in first}
    for row in rows:
        if predicted.get(row["variant"]):
            row["first_calibration_predicted_s"] = predicted[row["variant"]]
            row["first_calibration_error"] = predicted[row["variant"]] / row["s_per_iter"] - 1


def variant_plan(variant: Mapping, stages: int, batch_size: int, seq_length: int) -> Tuple[str, SlicePlan, int]:
    """(schedule, slicing of one micro-batch, micro-batches) a bench variant runs; stock DeepSpeed's
    1F1B is slice-1f1b with one slice per micro-batch."""
    section, micro_batches = variant["seqpipe"], variant["gradient_accumulation"]
    if section is None:  # one unit of the whole micro-batch
        size = variant["micro_batch_size"]
        return "slice-1f1b", make_plan([size], 1, size, seq_length), micro_batches
    if "plan" in section:
        planned = pipeline_entry(section["plan"], stages, batch_size)
        return section.get("schedule") or planned.schedule or "terapipe", entry_plan(planned), micro_batches
    plan = make_plan(1, section["seq_slices"], variant["micro_batch_size"], seq_length)
    return section["schedule"], plan, micro_batches


def predict_run(found: Optional[ModelFile], stages: int, schedule: str, micro_batches: int, plan: SlicePlan,
                saved_bytes_per_token: Sequence[float], recompute: str = "none",
                documents: Optional[PackedDocuments] = None,
                weight_bytes_per_token: Optional[Sequence[float]] = None) -> SimResult:
    """The simulated step of what a bench variant runs (``variant_plan``) under recomputation
    ``recompute``, with every stage's costs (nominal token costs without a model file; ``documents``:
    packed documents, their ``dense_mask()`` for stock DeepSpeed), and per stage the peak saved bytes
    from the measured bytes per token (a split backward's W buffers by ``weight_bytes_per_token``)."""
    costs = cost_model(found, stages, recompute=recompute, documents=documents).costs(plan) if found else None
    return simulate_plan(schedule, stages, micro_batches, plan, costs, saved_bytes_per_token, weight_bytes_per_token)
