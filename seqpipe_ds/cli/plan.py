"""``seqpipe-plan``: profile a stage, fit the latency model, solve for the best slicing, show a plan.

examples:
    torchrun --nproc_per_node 2 -m seqpipe_ds.cli.plan profile --num-layers 2 --hidden-size 1024 \\
        --num-attention-heads 16 --vocab-size 50304 --seq-length 2048 --micro-batch-size 2 --out prof.json
    seqpipe-plan fit prof.json --out model.json
    seqpipe-plan solve model.json --num-stages 8 --plan-file dp_results.json --dp 2 --memory-limit 40GiB
    seqpipe-plan show dp_results.json --index 0 --latency-model model.json --png plan.png
"""
import argparse
import functools
import json
import sys
import time
from datetime import timedelta
from typing import List, Optional

import numpy as np

from ..model.presets import PRESETS, SHAPE, fill_shape, options
from ..planner import planning, read_plans, write_plan
from ..planner.documents import measured_documents
from ..planner.fit import fit_profile, fit_summary, read_model_file, write_model_file
from ..planner.recompute import RECOMPUTE_MODES
from ..planner.search import SCHEDULE_NAMES
from ..schedules import SCHEDULES
from ..slicing import make_plan

# The model shape a preset fills for `profile`; --num-layers stays explicit (the layers of one stage).
PROFILE_SHAPE = ("hidden_size", "num_attention_heads", "vocab_size", "seq_length")
# Ranks outside the measuring TP group wait in a barrier for the whole profile.
PROFILE_TIMEOUT = timedelta(hours=12)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args) or 0
    except (ValueError, OSError) as e:
        print(f"seqpipe-plan {args.name}: error: {e}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqpipe-plan", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("profile", help="measure one stage's slice times, p2p sends and optimizer step")
    p.set_defaults(command=_profile, name="profile")
    p.add_argument("--model-preset", choices=sorted(PRESETS),
                   help="a named model (seqpipe_ds/model/presets.py): its options and the defaults of --hidden-size, "
                        "--num-attention-heads, --vocab-size and --seq-length")
    p.add_argument("--num-layers", type=int, required=True, help="layers of ONE stage")
    for flag in PROFILE_SHAPE:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, help="required unless --model-preset gives it")
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch that many ranks, or more)")
    p.add_argument("--granularity", type=int, default=8, help="slice lengths are multiples of this (TeraPipe: 8)")
    p.add_argument("--length-stride", type=int, default=1,
                   help="measure every N-th multiple of the granularity without context (the fit interpolates)")
    p.add_argument("--context-samples", type=int, default=32,
                   help="random slices measured with context (with --adaptive: at most this many)")
    p.add_argument("--adaptive", action="store_true",
                   help="measure lengths 1, 2, 4, ... units and bisect only where the straight line is off by more "
                        "than --tolerance; context points in rounds until a round is predicted within it")
    p.add_argument("--tolerance", type=float, default=0.03, help="relative error the adaptive profile accepts")
    p.add_argument("--no-stage-ends", dest="stage_ends", action="store_false",
                   help="skip the embedding (first stage) and LM head + loss (last stage) measurements")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="batch sizes to measure (default 1..micro batch)")
    p.add_argument("--recompute-modes", nargs="*", choices=RECOMPUTE_MODES[1:], default=list(RECOMPUTE_MODES[1:]),
                   help="activation recomputation modes to time and meter besides none (default: all; none given: "
                        "skip them, and solve can then plan without recomputation only)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point; the median is kept")
    p.add_argument("--p2p-sizes", type=int, nargs="+", default=[], help="message sizes in bytes")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("fit", help="fit the latency model to a profile; report held-out error")
    p.set_defaults(command=_fit, name="fit")
    p.add_argument("profile")
    p.add_argument("--out", required=True, help="latency model JSON to write")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of points kept out for the check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-out", help="also save the solver's grid (numpy .npy) for the profiled setting")

    p = sub.add_parser("solve", help="the slicing, schedule and micro-batch split with the least simulated step")
    p.set_defaults(command=_solve, name="solve")
    p.add_argument("model", help="latency model JSON from `fit`")
    p.add_argument("--num-stages", type=int, required=True, help="pipeline stages (PP)")
    p.add_argument("--batch-size", type=int,
                   help="sequences per step on one pipeline (global batch / DP; default: profiled micro batch). "
                        "The search splits it into micro-batches; --objective dp slices it as one micro-batch")
    p.add_argument("--objective", choices=["makespan", "dp"], default="makespan",
                   help="makespan: simulate the schedule that runs with every stage's costs (planner/search.py); "
                        "dp: TeraPipe's objective sum(t) + (stages - 1) max(t), solved exactly")
    p.add_argument("--schedule", choices=["auto", *SCHEDULES], default="auto",
                   help="schedule to plan for (auto: the faster); the plan file records it and the hook applies it")
    p.add_argument("--memory-limit", help="per-stage memory, e.g. 40GiB: parameters, gradients, optimizer states "
                                          "and saved activations at the schedule's peak must fit")
    p.add_argument("--recompute", choices=[*RECOMPUTE_MODES, "auto"], default="none",
                   help="activation recomputation of every stage to plan for (the model must be built with it: "
                        "Megatron's --recompute-granularity); auto: every mode the profile measured, the fastest "
                        "plan that fits wins")
    p.add_argument("--documents", metavar="DATA",
                   help="plan for packed documents (Megatron's --reset-attention-mask --reset-position-ids "
                        "--eod-mask-loss): each slice priced with its expected same-document context under the "
                        "document lengths measured in DATA, a .bin/.idx prefix (--data-path), or 'embedded' (the "
                        "embedded corpus, byte-level); the plan file records them and the hook refuses the plan "
                        "for a model without --reset-attention-mask")
    p.add_argument("--eod", type=int, help="with --documents: the end-of-document id of DATA's tokenizer "
                                           "(default for 'embedded': the byte-level tokenizer's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="for the memory model (default: profiled)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1], default=0, help="for the memory model")
    p.add_argument("--seq-length", type=int, help="default: the profiled one")
    p.add_argument("--granularity", type=int, help="default: the profiled one")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="plan for Megatron sequence parallelism: every slice splits over the profiled TP ranks, "
                        "so the granularity must be a multiple of TP")
    p.add_argument("--update-time", type=float, help="optimizer step time (default: the profiled one)")
    p.add_argument("--plan-file", help="add the plan to this plan file (dp_results.json)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size, for the plan file")
    p.add_argument("--global-batch-size", type=int, help="for the plan file")
    p.add_argument("--num-model-layers", type=int,
                   help="layers of the whole model, for the plan file (default: profiled layers x stages)")
    p.add_argument("--model-name", help="optional model name recorded in the plan file")

    p = sub.add_parser("advise", help="rank TP x PP x DP, schedule and slicing for a model on a cluster")
    p.set_defaults(command=_advise, name="advise")
    p.add_argument("--model-preset", choices=sorted(PRESETS), help="a named model, e.g. gpt3-175b (TeraPipe's)")
    for flag in SHAPE:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, help="Megatron-style shape (overrides the preset)")
    p.add_argument("--cluster", required=True, help="cluster JSON (configs/cluster_terapipe_paper.json)")
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument("--granularity", type=int, default=128, help="slice lengths are multiples of this")
    p.add_argument("--schedule", choices=["auto", *SCHEDULES], default="auto")
    p.add_argument("--zero-stage", type=int, choices=[0, 1], default=0)
    p.add_argument("--local-moves", action="store_true", help="also refine slicings by local moves (slower)")
    p.add_argument("--latency-model", help="a profile of this cluster's GPU (seqpipe-plan fit) instead of the "
                                           "FLOP-rate model; only its TP size is then considered")
    p.add_argument("--top", type=int, default=10, help="rows of the table")
    p.add_argument("--plan-file", help="write the winner's plan here (dp_results.json)")

    p = sub.add_parser("show", help="print a plan file's plans, or one plan's predicted timeline")
    p.set_defaults(command=_show, name="show")
    p.add_argument("plan_file")
    p.add_argument("--index", type=int, help="plan to show (as listed without it)")
    p.add_argument("--latency-model", help="latency model JSON: predicts the slice times for the timeline")
    p.add_argument("--schedule", choices=sorted(SCHEDULES),
                   help="simulate this schedule instead of the plan's (default: the one its latency was simulated "
                        "with; terapipe for TeraPipe's DP plans)")
    p.add_argument("--micro-batches", type=int,
                   help="micro-batches per step (gradient accumulation; default: the plan's)")
    p.add_argument("--png", help="write a Gantt chart of the timeline here")
    return parser


def _profile(args) -> None:
    import torch.distributed as dist

    from ..parallel import destroy, initialize
    from ..planner.profile import ProfileSpec, bind_device, run_profile

    fill_shape(args, {}, PROFILE_SHAPE)
    missing = [f"--{name.replace('_', '-')}" for name in PROFILE_SHAPE if getattr(args, name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --model-preset)")
    # The profile options are named after ProfileSpec's fields.
    spec = ProfileSpec(**{name: getattr(args, name) for name in ProfileSpec.__dataclass_fields__})
    bind_device()
    initialize(tensor_parallel_size=args.tp, timeout=PROFILE_TIMEOUT)
    try:
        profile = run_profile(spec, progress=not args.quiet)
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(profile, f, indent=1)
            p2p = f"{len(profile['p2p'])} p2p sizes" if profile["p2p"] else "no p2p (one rank)"
            print(f"{args.out}: {len(profile['compute'])} slice shapes, {p2p}, optimizer step "
                  f"{profile['optimizer_step']:.4g} s on {profile['device']}")
    finally:
        destroy()


def _fit(args) -> None:
    with open(args.profile) as f:
        profile = json.load(f)
    report = fit_profile(profile, holdout=args.holdout, seed=args.seed)
    write_model_file(args.out, report, profile)
    print("\n".join(fit_summary(report, profile)))
    print(f"wrote {args.out}")
    if args.grid_out:
        config = profile["config"]
        np.save(args.grid_out,
                report.model.grid(config["micro_batch_size"], config["seq_length"], config["granularity"]))
        print(f"wrote {args.grid_out}")


def _check_sequence_parallel(tp: int, granularity: int) -> None:
    """Every slice length is a multiple of the granularity; under SP each must also divide by TP."""
    if tp < 2:
        raise ValueError("--sequence-parallel needs tensor parallelism (the profile's tp is 1), as in Megatron")
    if granularity % tp:
        raise ValueError(f"--sequence-parallel splits every slice over {tp} TP ranks: the granularity {granularity} "
                         f"must be a multiple of {tp}")


def _solve(args) -> None:
    found = read_model_file(args.model)
    config = found.config
    batch = args.batch_size or config["micro_batch_size"]
    seq_len = args.seq_length or config["seq_length"]
    granularity = args.granularity or config["granularity"]
    if args.sequence_parallel:
        _check_sequence_parallel(config.get("tp", 1), granularity)
    if args.objective == "dp" and (args.memory_limit or args.schedule != "auto" or args.recompute == "auto"):
        raise ValueError("--objective dp plans TeraPipe's objective only: --memory-limit, --schedule and --recompute "
                         "auto need --objective makespan")
    documents = measured_documents(args.documents, seq_len, args.eod) if args.documents else None
    if documents:
        print(f"packed documents: {documents.lengths.describe()}")
    start = time.perf_counter()
    if args.objective == "dp":
        costs = planning.cost_model(found, args.num_stages, args.update_time, identical=True, recompute=args.recompute,
                                    documents=documents)
        best = planning.dp_plan(costs, batch, seq_len, granularity)
        print(f"{args.num_stages} stages, batch {batch}, sequence {seq_len}, granularity {granularity}, recompute "
              f"{args.recompute} (TeraPipe's objective, solved in {time.perf_counter() - start:.3f} s)")
        _print_slices(list(best.plan.batch_slices), [list(s) for s in best.plan.seq_slices])
        try:
            unsliced = costs.predict("terapipe", 1, make_plan(1, 1, batch, seq_len)).makespan
            versus = f"unsliced: {unsliced:.6g} s ({unsliced / best.makespan:.2f}x)"
        except ValueError:  # the whole batch as one slice is beyond the profiled batch sizes
            versus = "unsliced: not predictable (beyond the profiled batch sizes)"
        print(f"predicted iteration: {best.makespan:.6g} s; {versus}")
    else:
        best = _search(args, found, batch, seq_len, granularity, start, documents)
    if args.plan_file:
        model = planning.model_fields(config, args.num_stages, seq_len, args.num_model_layers, args.model_name)
        entry = planning.entry(model, config["tp"], args.num_stages, args.dp, best, args.global_batch_size,
                               found.device, dp_objective=args.objective == "dp", documents=documents)
        write_plan(args.plan_file, entry)
        print(f"wrote to {args.plan_file}: {entry.describe()}")


def _search(args, found, batch, seq_len, granularity, start, documents):
    """The schedule-exact search under the memory limit; prints what it found."""
    from ..planner.memory_model import format_bytes, parse_bytes
    limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    modes = planning.measured_modes(found) if args.recompute == "auto" else (args.recompute,)
    memory = planning.memory_by_mode(found, args.num_stages, seq_len, modes, args.num_model_layers, args.precision,
                                     args.zero_stage, args.dp)
    schedules = SCHEDULE_NAMES if args.schedule == "auto" else [args.schedule]
    result = planning.makespan_plan(found, args.num_stages, batch, seq_len, granularity, schedules, memory, limit,
                                    args.update_time, progress=lambda what: print(f"  searching {what}", flush=True),
                                    recompute_modes=modes, documents=documents)
    best = result.best
    print(f"{args.num_stages} stages, batch {batch}, sequence {seq_len}, granularity {granularity}: "
          f"{result.evaluated} candidates simulated in {time.perf_counter() - start:.2f} s"
          + (f", {result.fitting} fit {format_bytes(limit)}" if limit else ""))
    print(f"best: {best.schedule}, recompute {best.recompute}, {best.micro_batches} micro-batch(es) of "
          f"{best.micro_batch_size} (source: {best.source})")
    _print_slices(list(best.plan.batch_slices), [list(s) for s in best.plan.seq_slices])
    print(f"predicted iteration (simulated): {best.makespan:.6g} s")
    if best.peak_bytes:
        print("predicted peak per stage: " + ", ".join(format_bytes(b) for b in best.peak_bytes))
    try:  # the comparison the search must win
        simulated = planning.dp_plan(planning.cost_model(found, args.num_stages, args.update_time,
                                                         recompute=best.recompute, documents=documents),
                                     batch, seq_len, granularity, schedules).makespan
        print(f"TeraPipe's DP plan, simulated the same way: {simulated:.6g} s ({simulated / best.makespan:.3f}x)")
    except ValueError as e:
        print(f"TeraPipe's DP plan: not comparable here ({e})")
    return best


def _show(args) -> None:
    entries = read_plans(args.plan_file)
    if args.index is None and len(entries) != 1:
        print(f"{args.plan_file}: {len(entries)} plans (choose one with --index)")
        for i, entry in enumerate(entries):
            print(f"  [{i}] {entry.describe()}: latency {entry.latency:.6g} s")
        return
    index = args.index or 0
    if not 0 <= index < len(entries):
        raise ValueError(f"--index {index} is out of range: {args.plan_file} has {len(entries)} plans")
    entry = entries[index]
    print(f"[{index}] {entry.describe()}")
    _print_slices(entry.batch_slices, entry.input_slices)
    print(f"recorded latency: {entry.latency:.6g} s ({entry.micro_batches} micro-batch(es), recompute "
          f"{entry.recompute})")
    if not args.latency_model:
        if args.png:
            raise ValueError("--png needs --latency-model (the slice times come from it)")
        return
    result = planning.simulate_entry(read_model_file(args.latency_model), entry, args.schedule, args.micro_batches)
    schedule = args.schedule or entry.schedule or "terapipe (TeraPipe's objective)"
    print(f"{schedule}, {args.micro_batches or entry.micro_batches} micro-batch(es): simulated per-stage programs")
    for stage in range(entry.pp):
        print(f"stage {stage:>3}: " + "  ".join(f"{s.action} {s.start:.4g}-{s.end:.4g}"
                                               for s in result.stage_segments(stage)))
    print(f"timeline makespan: {result.makespan:.6g} s")
    if args.png:
        from ..planner.gantt import draw_gantt
        draw_gantt([(f"{entry.describe()}, {schedule}\nmakespan {result.makespan:.4g} s", result.segments)],
                   args.png)
        print(f"wrote {args.png}")


def _advise(args) -> None:
    from ..planner import advise as advisor
    fill_shape(args, {})
    missing = [f"--{name.replace('_', '-')}" for name in SHAPE if getattr(args, name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --model-preset)")
    model = {name: getattr(args, name) for name in SHAPE}
    model.update({"max_position_embeddings": args.seq_length,
                  **(options(args.model_preset) if args.model_preset else {})})
    cluster = advisor.load_cluster(args.cluster)
    schedules = SCHEDULE_NAMES if args.schedule == "auto" else [args.schedule]
    start = time.perf_counter()
    costs_for, tp_sizes, device = None, None, f"FLOP rate of {cluster.gpu.name}"
    if args.latency_model:
        found = read_model_file(args.latency_model)
        tp_sizes, device = [found.config["tp"]], f"profile of {found.device} at TP {found.config['tp']}"
        costs_for = functools.partial(advisor.profiled_costs, found.model, found.config["num_layers"], model, cluster,
                                      dtype_bytes=found.config.get("dtype_bytes", 2))
    advice = advisor.advise(model, cluster, args.global_batch_size, args.granularity, schedules, args.zero_stage,
                            costs_for, args.local_moves, lambda what: print(f"  planning {what}", flush=True),
                            tp_sizes)
    print(f"{len(advice.ranked)} configurations fit, {len(advice.rejected)} do not "
          f"({time.perf_counter() - start:.1f} s); device model: {device}")
    print(advisor.table(advice, args.top))
    unsliced = advisor.best_unsliced_overall(advice)
    best = advice.ranked[0]
    if unsliced:
        print(f"best unsliced (micro-batch-only 1F1B): TP {unsliced.tp} x PP {unsliced.pp} x DP {unsliced.dp}, "
              f"{unsliced.unsliced.makespan:.3f} s; the winner is {unsliced.unsliced.makespan / best.time:.2f}x faster")
    for c in advice.rejected:
        print(f"does not fit: TP {c.tp} x PP {c.pp} x DP {c.dp}: {c.note.splitlines()[0][:160]}")
    if args.plan_file:
        entry = planning.entry({**{name: getattr(args, name) for name in SHAPE},
                                **({"name": args.model_preset} if args.model_preset else {})},
                               best.tp, best.pp, best.dp, best.best, args.global_batch_size, cluster.gpu.name)
        write_plan(args.plan_file, entry)
        print(f"wrote to {args.plan_file}: {entry.describe()}")
        print("launch:\n" + advisor.launch_flags(advice, args.plan_file))


def _print_slices(batch_slices: List[int], input_slices: List[List[int]]) -> None:
    for b, slices in zip(batch_slices, input_slices):
        print(f"  batch slice of {b}: {len(slices)} sequence slices {slices}")


if __name__ == "__main__":
    sys.exit(main())
