"""``seqpipe-bench``: seqpipe against stock DeepSpeed pipelining, side by side in one run.

1. Plans for this machine: profile one stage (adaptively, with its embedding / LM head ends and its
   saved bytes per token), fit the latency model, calibrate it by a short traced in-engine run of
   unsliced 1F1B and 4 and 8 slices (planner/calibrate.py: per stage and direction, the factor and
   the seconds per call by which the engine's forwards and backwards exceed the profile's), then
   plan twice: TeraPipe's DP (dp_results.json, the "<schedule> planned" variants) and the
   schedule-exact search over schedules, micro-batch splits and slicings (makespan_results.json,
   the "makespan planned" variant). Skipped with --plan.
2. One launch of --stages processes that builds stock DeepSpeed pipelining (the global batch as
   micro-batches of 1, its 1F1B schedule) and, for every schedule in --schedules, uniform slicings
   and the planned slicing; it alternates them iteration by iteration after warm-up, then runs one
   measured iteration each: bytes saved for backward per stage (saved-tensor hooks; on CUDA also
   max_memory_allocated) and slice timestamps.
3. One single-process launch of the same work: its time / stages is the bubble-free ideal.
4. The schedule simulator predicts every variant's step time (the calibrated latency model, and the
   profile alone) and per-stage peak activation bytes (bytes per token probed on each stage), printed
   beside the measurements; the timed runs are held out from the calibration. The timing launch also
   runs the calibration's variants, alternating with the timed ones (--recalibrate in-timing, the
   default): a second calibration fitted on those, into latency_model.recalibrated.json, saw the
   machine at the same minutes as the runs it prices (a host whose speed drifts between launches
   moves the first one's predictions). The rows are predicted from it and keep the first
   calibration's prediction beside it (the plans stay those of the first: their files record its
   latencies).
Prints the table, writes bench.json (and with --png the measured and predicted timelines).

--documents trains every variant on packed documents (Megatron's --reset-attention-mask
--reset-position-ids --eod-mask-loss; --data-path, default the embedded corpus): stock DeepSpeed then
attends with the dense document mask, seqpipe with its block attention per document segment, and the
planner and every prediction price each slice's expected same-document context under the document
lengths measured in that data (planner/documents.py; stock's with the dense mask).

The default is small enough for a first contact on a 2-core CPU (a few minutes, progress shown for
every phase). --full is the comparison the README's results come from: hidden 1024, 16 heads,
uniform 4 and 8 slices, 2 warm-up + 5 timed iterations.
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from ..data import ByteTokenizer
from ..model.presets import PRESETS, fill_shape, options
from ..planner.budget import budget, stock_need
from ..planner.calibrate import Calibration, calibrate, store, uncalibrated_copy
from ..planner.documents import EMBEDDED, document_data, measured_documents
from ..planner.fit import fit_profile, fit_summary, read_model_file, write_model_file
from ..planner.memory_model import format_bytes, parse_bytes
from ..planner.plan_file import write_plan
from ..planner.planning import (CALIBRATION_REPEATS, RECALIBRATE_WHEN, bench_plans, bench_variant,
                                calibration_runs, calibration_variants, cost_model, entry, keep_first_predictions,
                                missed_predictions, model_fields, pipeline_entry, predict_run, variant_plan)
from ..planner.recompute import mode_of
from ..schedules import SCHEDULES, Action, Segment

MIB = 2 ** 20
# With --memory-limit: the two sides' picks, timed with the other variants and reported in a table of their own.
BUDGET_VARIANTS = ("stock within the limit", "seqpipe within the limit")

MODEL_FLAGS = ("num-layers", "hidden-size", "num-attention-heads", "vocab-size", "seq-length")
# Without --model-preset: sized for a first run on a 2-core CPU (a few minutes); --full: the README's comparison
# (slices of >= 256 tokens keep the Xeon's GEMMs efficient).
DEFAULT_SHAPE = {"num_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "vocab_size": 384, "seq_length": 1024}
FULL_SHAPE = {**DEFAULT_SHAPE, "hidden_size": 1024, "num_attention_heads": 16}
# Run settings: (default, --full) for the flags left unset.
RUN_SETTINGS = {"uniform": ([4], [4, 8]), "warmup": (1, 2), "repeats": (3, 5)}
# Lines of the launched processes that are progress or results (the rest, DeepSpeed's log, goes to the log file).
_SHOWN = re.compile(r"^(profile|timing|single stage|/.*: \d+ slice shapes)")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    fill_shape(args, FULL_SHAPE if args.full else DEFAULT_SHAPE)
    for name, (default, full) in RUN_SETTINGS.items():
        if getattr(args, name) is None:
            setattr(args, name, full if args.full else default)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.memory_limit and args.plan:
        raise SystemExit("--memory-limit plans both sides from this machine's profile: leave out --plan")
    if args.memory_limit and args.documents:
        raise SystemExit("--memory-limit does not plan packed documents yet: leave out one of them")
    documents = measured_documents(args.data_path, args.seq_length, args.eod) if args.documents else None
    if documents:
        print(f"packed documents: {documents.lengths.describe()}", flush=True)
    plan_file, makespan_file, model_file = ((args.plan, None, args.latency_model) if args.plan
                                            else _make_plan(args, out, documents))
    limited = _budget(args, out, model_file) if args.memory_limit else None
    variants = {**_variants(args, plan_file, makespan_file), **(_budget_variants(limited, out) if limited else {})}
    # The second calibration's traced variants, alternating with the timed ones (--recalibrate in-timing).
    recalibrating = model_file is not None and not args.plan and args.recalibrate == "in-timing"
    calibration = (calibration_variants(args.batch_size, args.seq_length, args.granularity) if recalibrating
                   else {})
    print(f"timing {', '.join(variants)} on {args.stages} stages" + (
        f" (and, traced, the calibration's {', '.join(_slicings(calibration))})" if calibration else "") +
        f", {args.warmup} warm-up + {args.repeats} alternating iterations each, then one measured iteration each",
        flush=True)
    timing = _launch(args, args.stages, variants, out / "timing", measure=True, calibration=calibration)
    print("timing the same work in one process (the bubble-free ideal)", flush=True)
    # With packed documents seqpipe's engine, unsliced: the block attention per document (stock's is the dense mask).
    one_process = {"seq_slices": 1, "schedule": "slice-1f1b"} if args.documents else None
    ideal = _launch(args, 1, {"single stage": bench_variant(args.batch_size, 1, one_process)}, out / "single")
    rows, predictions = _rows(args, variants, timing, ideal, model_file, documents)
    recalibrated = _recalibrate(args, out, model_file, documents, timing, calibration, rows) if calibration else None
    if recalibrated:
        first = rows
        rows, predictions = _rows(args, variants, timing, ideal, recalibrated, documents)
        keep_first_predictions(first, rows)
    budget_rows = {row["variant"]: row for row in rows if row["variant"] in BUDGET_VARIANTS}
    _print_table(args, [row for row in rows if row["variant"] not in BUDGET_VARIANTS], timing["device"])
    result = {"config": vars(args), "device": timing["device"], "rows": rows, "recalibrated": recalibrated}
    if limited:
        result["budget"] = _print_budget(limited, budget_rows)
    with open(out / "bench.json", "w") as f:
        json.dump(result, f, indent=1)
    if args.png:
        _draw_timelines(args, timing["trace"], predictions, args.png, with_prediction=model_file is not None)
    print(f"wrote {out / 'bench.json'}" + (f" and {args.png}" if args.png else ""))
    return 0


def _parser():
    p = argparse.ArgumentParser(prog="seqpipe-bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model-preset", choices=sorted(PRESETS),
                   help="a named model (seqpipe_ds/model/presets.py): its shape and options; the flags below override "
                        "its shape")
    for flag in MODEL_FLAGS:
        p.add_argument(f"--{flag}", type=int,
                       help=f"default: the preset's, else {DEFAULT_SHAPE[flag.replace('-', '_')]}")
    p.add_argument("--batch-size", type=int, default=1, help="global batch (sequences per iteration)")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--full", action="store_true",
                   help="the README's full-size comparison: hidden 1024, 16 heads, uniform 4 and 8, 2 + 5 iterations")
    p.add_argument("--uniform", type=int, nargs="*", help="uniform slice counts to time (default 4; --full: 4 8)")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=sorted(SCHEDULES),
                   help="seqpipe schedules to time, each on every slicing")
    p.add_argument("--plan", help="use this plan file instead of profiling (needs --latency-model for predictions)")
    p.add_argument("--latency-model", help="fitted latency model (seqpipe-plan fit) for predicted times")
    p.add_argument("--granularity", type=int, default=128, help="profile/plan granularity in tokens")
    p.add_argument("--profile-repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, help="warm-up iterations per variant (default 1; --full: 2)")
    p.add_argument("--repeats", type=int, help="timed iterations per variant (default 3; --full: 5)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (OMP_NUM_THREADS)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed for each launch")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--memory-limit", metavar="SIZE",
                   help="per stage, model states + activations (e.g. 200MiB, or 0.85x: that fraction of what stock's "
                        "fastest configuration needs without recomputation): also time the fastest configuration "
                        "each side is predicted to fit (stock: micro-batch size and recomputation of unsliced 1F1B; "
                        "seqpipe: schedule, slicing, micro-batches and recomputation) and report what each gave up")
    p.add_argument("--documents", action="store_true",
                   help="train on packed documents (--reset-attention-mask --reset-position-ids --eod-mask-loss) of "
                        "--data-path; stock DeepSpeed with the dense document mask; plans and predictions priced "
                        "for the documents' measured lengths")
    p.add_argument("--data-path", default=EMBEDDED,
                   help="with --documents: a Megatron .bin/.idx prefix with tokens below --vocab-size (default: the "
                        "embedded corpus, byte-level)")
    p.add_argument("--eod", type=int, default=ByteTokenizer.eod,
                   help="with --documents: the data's end-of-document id (default: the byte-level tokenizer's)")
    p.add_argument("--png", help="write the measured and the predicted per-stage timeline of one variant here")
    p.add_argument("--recalibrate", choices=RECALIBRATE_WHEN, default="in-timing",
                   help="in-timing (default): the timing launch also runs the calibration's traced variants, and the "
                        "rows are predicted from a second calibration fitted on them; never: from the first alone")
    p.add_argument("--png-variant", help="the variant drawn with --png (default: the last schedule's planned run)")
    return p


def _model(args):
    return {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads, "vocab_size": args.vocab_size,
            "max_position_embeddings": args.seq_length, **(options(args.model_preset) if args.model_preset else {}),
            **({"reset_attention_mask": True, "reset_position_ids": True} if args.documents else {})}


def _budget(args, out, model_file):
    """Both sides' fastest configurations predicted to fit --memory-limit (planner/budget.py); seqpipe's
    plan goes into out/budget_results.json."""
    found = read_model_file(model_file)
    if args.memory_limit.lower().endswith("x"):
        need = stock_need(found, args.stages, args.batch_size, args.num_layers)
        limit = float(args.memory_limit[:-1]) * need
        print(f"stock's fastest configuration without recomputation is predicted to need {format_bytes(need)}")
    else:
        limit = parse_bytes(args.memory_limit)
    print(f"planning both sides within {format_bytes(limit)} per stage (model states + activations)", flush=True)
    limited = budget(found, args.stages, args.batch_size, limit, args.num_layers, args.schedules)
    model = model_fields(found.config, args.stages, args.seq_length, args.num_layers)
    write_plan(str(out / "budget_results.json"), entry(model, found.config["tp"], args.stages, 1,
                                                       limited.seqpipe.within, device=found.device))
    for side, pick in (("stock", limited.stock), ("seqpipe", limited.seqpipe)):
        print(f"{side}: {pick.within.describe()}, predicted {pick.within.makespan:.4g} s, peak "
              f"{format_bytes(pick.within.peak)}")
    return limited


def _budget_variants(limited, out):
    """The two picks as bench variants: stock DeepSpeed's engine, and seqpipe's from its plan file."""
    stock, seqpipe = limited.stock.within, limited.seqpipe.within
    plan = {"plan": os.path.abspath(out / "budget_results.json")}
    return {BUDGET_VARIANTS[0]: bench_variant(stock.micro_batch_size, stock.micro_batches, None, stock.recompute),
            BUDGET_VARIANTS[1]: bench_variant(seqpipe.micro_batch_size, seqpipe.micro_batches, plan, seqpipe.recompute)}


def _variants(args, plan_file, makespan_file=None):
    """Stock DeepSpeed runs the batch as micro-batches of one sequence under its 1F1B. Uniform seqpipe
    variants stream the same single sequences (micro-batches of 1), each cut into k slices; the
    planned variant runs the plan's batch and sequence slicing on one micro-batch. The makespan-planned
    variant runs the search's micro-batch split, slicing and schedule (the plan file names it)."""
    variants = {"stock DeepSpeed": bench_variant(1, args.batch_size, None)}
    for schedule in args.schedules:
        for n in args.uniform:
            variants[f"{schedule} uniform {n}"] = bench_variant(1, args.batch_size,
                                                                {"seq_slices": n, "schedule": schedule})
        variants[f"{schedule} planned"] = bench_variant(args.batch_size, 1, {"plan": os.path.abspath(plan_file),
                                                                             "schedule": schedule})
    if makespan_file:
        entry = pipeline_entry(makespan_file, args.stages, args.batch_size)
        variants["makespan planned"] = bench_variant(entry.micro_batch_size,
                                                     args.batch_size // entry.micro_batch_size,
                                                     {"plan": os.path.abspath(makespan_file)})
    return variants


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_launcher(args, nprocs, module_args, log_path):
    """``deepspeed --hostfile`` on localhost, the way users launch; raises with the log's tail on failure.
    Everything goes to the log; progress bars and result lines are also shown here as they come."""
    with tempfile.NamedTemporaryFile("w", suffix=".hostfile", delete=False) as hostfile:
        hostfile.write(f"localhost slots={nprocs}\n")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile.name, "--no_ssh_check",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "--no_local_rank", "--module",
               *module_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    try:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            try:
                _relay(process, log, args.timeout)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    finally:
        os.unlink(hostfile.name)
    if process.returncode != 0:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"launch failed (exit {process.returncode}): {' '.join(command)}\n...{tail}")


def _relay(process, log, timeout):
    """Copies the process's output into the log, and its progress and result segments (split at
    carriage returns too, so tqdm bars update in place) to stderr; kills it after ``timeout`` s."""
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    pending = b""
    try:
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            log.write(chunk)
            pending += chunk
            *segments, pending = re.split(rb"(?<=[\r\n])", pending)
            for segment in segments:
                text = segment.decode(errors="replace")
                if _SHOWN.match(text):
                    sys.stderr.write(text)
                    sys.stderr.flush()
        process.wait()
    finally:
        timer.cancel()


def _launch(args, stages, variants, stem, measure=False, warmup=None, repeats=None, calibration=None):
    spec = {"model": _model(args), "stages": stages, "variants": variants, "measure": measure,
            "calibration": calibration or {},
            "warmup": args.warmup if warmup is None else warmup,
            "repeats": args.repeats if repeats is None else repeats, "out": f"{stem}.json"}
    if args.documents:
        spec["documents"] = dict(zip(("prefix", "eod"), document_data(args.data_path, args.eod)))
    with open(f"{stem}.spec.json", "w") as f:
        json.dump(spec, f)
    _run_launcher(args, stages, ["seqpipe_ds.benchmark", f"{stem}.spec.json"], f"{stem}.log")
    with open(f"{stem}.json") as f:
        return json.load(f)


def _make_plan(args, out, documents):
    """profile (one stage's layers and both ends, and p2p) -> fit -> TeraPipe's DP into
    out/dp_results.json and the schedule-exact search into out/makespan_results.json."""
    if args.num_layers % args.stages:
        raise SystemExit(f"--num-layers {args.num_layers} must divide into --stages {args.stages}")
    profile, model_file = out / "profile.json", out / "latency_model.json"
    plan_file, makespan_file = out / "dp_results.json", out / "makespan_results.json"
    for stale in (plan_file, makespan_file, out / "budget_results.json"):  # plan files add entries: start afresh
        stale.unlink(missing_ok=True)
    batch_sizes = sorted({1, args.batch_size} | {b for b in (2, 4) if b < args.batch_size})
    print(f"profiling one stage ({args.num_layers // args.stages} layers, embedding and LM head) at granularity "
          f"{args.granularity}, adaptively", flush=True)
    # Two processes when pipelined: the second waits while the first measures, then they time p2p sends.
    shape = [v for flag in MODEL_FLAGS[1:] for v in (f"--{flag}", str(getattr(args, flag.replace("-", "_"))))]
    _run_launcher(args, min(2, args.stages), ["seqpipe_ds.cli.plan", "profile",
                            "--num-layers", str(args.num_layers // args.stages), *shape,
                            "--micro-batch-size", str(args.batch_size), "--batch-sizes", *map(str, batch_sizes),
                            *(["--model-preset", args.model_preset] if args.model_preset else []),
                            "--granularity", str(args.granularity), "--repeats", str(args.profile_repeats),
                            "--warmup", "1", "--adaptive", "--out", str(profile),
                            # recomputation modes only where they are planned (--memory-limit)
                            *([] if args.memory_limit else ["--recompute-modes"])], out / "profile.log")
    print("seqpipe-plan fit, then TeraPipe's DP and the schedule-exact search", flush=True)
    with open(profile) as f:
        measured = json.load(f)
    report = fit_profile(measured)
    write_model_file(str(model_file), report, measured)
    print("\n".join(fit_summary(report, measured)))
    _calibrate(args, out / "calibration", str(model_file), documents)
    for name, found in zip(("TeraPipe's DP", "schedule-exact search"),
                           bench_plans(str(model_file), args.stages, args.batch_size, args.num_layers, str(plan_file),
                                       str(makespan_file), documents)):
        print(f"{name}: {found.describe()}, predicted {found.makespan:.4g} s")
    return str(plan_file), str(makespan_file), str(model_file)


def _calibrate(args, stem, model_file, documents):
    """The traced in-engine run (planning.calibration_variants); its per-stage terms go into the model file."""
    variants = calibration_variants(args.batch_size, args.seq_length, args.granularity)
    print(f"calibrating in the engine: slice-1f1b as {', '.join(_slicings(variants))} (of micro-batches of one "
          f"sequence, or of {args.batch_size}); one warm-up + {CALIBRATION_REPEATS} traced iterations each",
          flush=True)
    timing = _launch(args, args.stages, {}, stem, warmup=1, repeats=CALIBRATION_REPEATS, calibration=variants)
    _fit_calibration(args, model_file, documents, variants, timing)


def _slicings(calibration_variants):
    return [name.split(": ")[1] for name in calibration_variants]


def _fit_calibration(args, model_file, documents, variants, timing):
    """Fits the traced ``variants`` of a launch's result ``timing`` into ``model_file``."""
    runs = calibration_runs(variants, timing, args.stages, args.batch_size, args.seq_length)
    calibration = calibrate(cost_model(read_model_file(model_file), args.stages, documents=documents), runs)
    store(model_file, calibration)
    print(f"engine over profile per unit, forward / backward: {calibration.describe()}")


def _recalibrate(args, out, model_file, documents, timing, variants, rows):
    """The second calibration's model file: the timing launch's traced calibration ``variants`` fitted."""
    missed = missed_predictions(model_file, rows)
    residual = Calibration.from_dict(read_model_file(model_file).calibration).residual
    print(f"the first calibration's predictions: {len(missed)} timed run(s) off by more than its stated error "
          f"({residual:.1%})" + (f": {', '.join(missed)}" if missed else "") +
          "; calibrating again on the timing launch's traced calibration variants", flush=True)
    second = out / "latency_model.recalibrated.json"
    uncalibrated_copy(model_file, str(second))
    _fit_calibration(args, str(second), documents, variants, timing)
    return str(second)


def _rows(args, variants, timing, ideal, model_file, documents):
    ideal_time = statistics.median(ideal["times"]["single stage"]) / args.stages
    tokens = args.batch_size * args.seq_length
    stock = statistics.median(timing["times"]["stock DeepSpeed"])
    found = read_model_file(model_file) if model_file else None
    profile_only = replace(found, calibration=None) if found else None
    rows, predictions = [], {}
    for name, variant in variants.items():
        times = timing["times"][name]
        median = statistics.median(times)
        schedule, plan, micro_batches = variant_plan(variant, args.stages, args.batch_size, args.seq_length)
        recompute = mode_of(variant["recompute"])
        attention = documents.dense_mask() if documents and variant["seqpipe"] is None else documents
        predictions[name] = simulated = predict_run(found, args.stages, schedule, micro_batches, plan,
                                                    timing["saved_bytes_per_token"], recompute, attention,
                                                    timing.get("weight_bytes_per_token"))
        predicted = simulated.makespan if found else None
        uncalibrated = predict_run(profile_only, args.stages, schedule, micro_batches, plan,
                                   timing["saved_bytes_per_token"], recompute, attention).makespan if found else None
        saved = timing["saved_peak_bytes"][name]
        states = timing["model_state_bytes"][name]
        row = {"variant": name, "schedule": "1f1b (stock)" if variant["seqpipe"] is None else schedule,
               "slicing": _describe(variant, plan, micro_batches), "s_per_iter": median,
               "s_min": min(times), "s_max": max(times), "tokens_per_s": tokens / median,
               "tokens_per_s_min": tokens / max(times), "tokens_per_s_max": tokens / min(times),
               "vs_stock": stock / median, "of_ideal": ideal_time / median,
               "predicted_s": predicted, "prediction_error": None if predicted is None else predicted / median - 1,
               "profile_only_error": None if uncalibrated is None else uncalibrated / median - 1,
               "recompute": recompute,
               "peak_mib": max(a + b for a, b in zip(states, saved)) / MIB,
               "stage_model_state_mib": [b / MIB for b in states],
               "peak_activation_mib": max(saved) / MIB, "stage_peak_activation_mib": [b / MIB for b in saved],
               "predicted_peak_activation_mib": max(simulated.peak_activation_bytes) / MIB,
               "stage_predicted_peak_activation_mib": [b / MIB for b in simulated.peak_activation_bytes]}
        if timing.get("cuda_peak_memory"):
            row["cuda_peak_memory_mib"] = timing["cuda_peak_memory"][name] / MIB
        rows.append(row)
    rows.append({"variant": f"ideal (1 process / {args.stages})", "slicing": "no bubble", "s_per_iter": ideal_time,
                 "tokens_per_s": tokens / ideal_time, "vs_stock": stock / ideal_time, "of_ideal": 1.0,
                 "single_stage_s": ideal_time * args.stages})
    return rows, predictions


def _print_budget(limited, rows):
    """The two picks side by side: measured speed, peak measured / predicted, what each gave up; the
    bench.json "budget" section."""
    limit_mib = limited.limit / MIB
    stock = rows[BUDGET_VARIANTS[0]]
    print(f"\nWithin {limit_mib:.0f} MiB per stage (model states + activations, fullest stage); peak = measured model "
          "states + peak bytes saved for backward / predicted by the memory model")
    header = f"{'side':<26} {'tokens/s (min-max)':>22} {'x stock':>8} {'predicted':>16} {'peak MiB':>16} " \
             f"{'recompute':>10}  configuration; gave up"
    print(header + "\n" + "-" * len(header))
    section = {"limit_mib": limit_mib}
    for side, pick, name in (("stock", limited.stock, BUDGET_VARIANTS[0]), ("seqpipe", limited.seqpipe,
                                                                              BUDGET_VARIANTS[1])):
        row = {**rows[name], "vs_stock": stock["s_per_iter"] / rows[name]["s_per_iter"],
               "predicted_peak_mib": pick.within.peak / MIB, "gave_up": pick.gave_up(),
               "unlimited": pick.unlimited.describe(), "within_limit": rows[name]["peak_mib"] <= limit_mib}
        section[side] = row
        spread = f"{row['tokens_per_s']:.0f} ({row['tokens_per_s_min']:.0f}-{row['tokens_per_s_max']:.0f})"
        predicted = f"{row['predicted_s']:.3f}s ({row['prediction_error']:+.0%})"
        peak = f"{row['peak_mib']:.0f} / {row['predicted_peak_mib']:.0f}"
        print(f"{name:<26} {spread:>22} {row['vs_stock']:>7.2f}x {predicted:>16} {peak:>16} {row['recompute']:>10}  "
              f"{row['slicing']}; gave up {row['gave_up']}")
    return section


def _describe(variant, plan, micro_batches):
    parts = " | ".join(f"{b}x{list(lengths)}" for b, lengths in zip(plan.batch_slices, plan.seq_slices))
    return f"{micro_batches} x ({parts})" if micro_batches > 1 else parts


def _print_table(args, rows, device):
    print(f"\nGPT {args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads, seq "
          f"{args.seq_length}, batch {args.batch_size}; {args.stages} stages, {args.threads} thread(s) each; "
          + (f"packed documents of {args.data_path} (stock: dense mask); " if args.documents else "") +
          f"device {device}; medians of {args.repeats} alternating iterations; activation MiB = peak bytes saved "
          "for backward on the fullest stage, measured / simulated")
    header = f"{'variant':<24} {'tokens/s (min-max)':>22} {'x stock':>8} {'of ideal':>9} {'predicted':>16} " \
             f"{'profile only':>12} " \
             f"{'act. MiB meas/sim':>18}  slicing"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        spread = f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f})" \
            if "tokens_per_s_min" in r else f"{r['tokens_per_s']:.0f}"
        predicted = f"{r['predicted_s']:.3f}s ({r['prediction_error']:+.0%})" if r.get("predicted_s") else "-"
        profile_only = f"{r['profile_only_error']:+.0%}" if r.get("profile_only_error") is not None else "-"
        memory = f"{r['peak_activation_mib']:.0f} / {r['predicted_peak_activation_mib']:.0f}" \
            if "peak_activation_mib" in r else "-"
        print(f"{r['variant']:<24} {spread:>22} {r['vs_stock']:>7.2f}x {r['of_ideal']:>8.0%} {predicted:>16} "
              f"{profile_only:>12} "
              f"{memory:>18}  {r['slicing']}")
    first = [r["first_calibration_error"] for r in rows if "first_calibration_error" in r]
    if first:
        now = [r["prediction_error"] for r in rows if "first_calibration_error" in r]
        print(f"predicted from the second calibration (errors {min(now):+.0%} to {max(now):+.0%}); from the first: "
              f"{min(first):+.0%} to {max(first):+.0%}")


def _draw_timelines(args, traces, predictions, path, with_prediction):
    from ..planner.gantt import draw_gantt
    name = args.png_variant or ("makespan planned" if "makespan planned" in traces else f"{args.schedules[-1]} planned")
    if name not in traces:
        raise SystemExit(f"--png-variant {name!r}: no measured timeline (seqpipe variants: {', '.join(traces)})")
    measured = [Segment(stage, Action(kind, m, b, s), start, end) for stage, kind, m, b, s, start, end in traces[name]]
    panels = [(f"{name}: measured", measured)]
    if with_prediction:
        panels.append((f"{name}: simulated from the latency model", predictions[name].segments))
    draw_gantt(panels, path)


if __name__ == "__main__":
    sys.exit(main())
