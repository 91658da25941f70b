"""``seqpipe-bench``: seqpipe against stock DeepSpeed pipelining, side by side in one run.

1. A plan for this machine: profile one stage, fit the latency model, solve (skipped with --plan).
2. One launch of --stages processes that builds stock DeepSpeed pipelining (the global batch as
   micro-batches of 1, its best schedule), uniform slicings and the planned slicing, and
   alternates them iteration by iteration after warm-up.
3. One single-process launch of the same work: its time / stages is the bubble-free ideal.
4. On CPU, a short launch per variant for its peak memory (peak RSS is a per-process figure).
Prints the table, writes bench.json (and with --png a timeline measured from slice timestamps).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from ..slicing import even_split

MODEL_FLAGS = ("num-layers", "hidden-size", "num-attention-heads", "vocab-size", "seq-length")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan_file, model_file = (args.plan, args.latency_model) if args.plan else _make_plan(args, out)
    variants = _variants(args, plan_file)
    print(f"timing {', '.join(variants)} on {args.stages} stages, {args.warmup} warm-up + {args.repeats} "
          "alternating iterations each", flush=True)
    timing = _launch(args, args.stages, variants, out / "timing", trace=args.png is not None)
    ideal = _launch(args, 1, {"single stage": _variant(args.batch_size, 1, None)}, out / "single")
    memory = timing["peak_memory"]
    if timing["device"] == "cpu":
        memory = {name: _launch(args, args.stages, {name: v}, out / f"memory-{i}", repeats=1, warmup=0)
                  ["peak_memory"][name] for i, (name, v) in enumerate(variants.items())}
    rows = _rows(args, variants, timing, ideal, memory, model_file, plan_file)
    _print_table(args, rows, timing["device"])
    with open(out / "bench.json", "w") as f:
        json.dump({"config": vars(args), "device": timing["device"], "rows": rows}, f, indent=1)
    if args.png:
        _draw_trace(timing["trace"], args.png)
    print(f"wrote {out / 'bench.json'}" + (f" and {args.png}" if args.png else ""))
    return 0


def _parser():
    p = argparse.ArgumentParser(prog="seqpipe-bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # The default is sized for a 2-core CPU: slices of >= 256 tokens keep this CPU's GEMMs efficient.
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=384)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1, help="global batch (sequences per iteration)")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--uniform", type=int, nargs="*", default=[2, 4, 8], help="uniform slice counts to time")
    p.add_argument("--plan", help="use this plan file instead of profiling (needs --latency-model for predictions)")
    p.add_argument("--latency-model", help="fitted latency model (seqpipe-plan fit) for predicted times")
    p.add_argument("--granularity", type=int, default=128, help="profile/plan granularity in tokens")
    p.add_argument("--profile-repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (OMP_NUM_THREADS)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed for each launch")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--png", help="write a measured per-stage, per-slice timeline of the planned run here")
    return p


def _model(args):
    return {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads, "vocab_size": args.vocab_size,
            "max_position_embeddings": args.seq_length}


def _variant(micro_batch_size, gradient_accumulation, seqpipe):
    return {"micro_batch_size": micro_batch_size, "gradient_accumulation": gradient_accumulation,
            "seqpipe": seqpipe}


def _variants(args, plan_file):
    variants = {"stock DeepSpeed": _variant(1, args.batch_size, None)}
    for n in args.uniform:
        variants[f"seqpipe uniform {n}"] = _variant(args.batch_size, 1, {"seq_slices": n})
    variants["seqpipe planned"] = _variant(args.batch_size, 1, {"plan": os.path.abspath(plan_file)})
    return variants


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_launcher(args, nprocs, module_args, log_path):
    """``deepspeed --hostfile`` on localhost, the way users launch; raises with the log's tail on failure."""
    with tempfile.NamedTemporaryFile("w", suffix=".hostfile", delete=False) as hostfile:
        hostfile.write(f"localhost slots={nprocs}\n")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile.name, "--no_ssh_check",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "--no_local_rank", "--module",
               *module_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    try:
        with open(log_path, "w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout)
    finally:
        os.unlink(hostfile.name)
    if done.returncode != 0:
        tail = Path(log_path).read_text()[-3000:]
        raise RuntimeError(f"launch failed (exit {done.returncode}): {' '.join(command)}\n...{tail}")


def _launch(args, stages, variants, stem, trace=False, repeats=None, warmup=None):
    spec = {"model": _model(args), "stages": stages, "variants": variants, "trace": trace,
            "warmup": args.warmup if warmup is None else warmup,
            "repeats": args.repeats if repeats is None else repeats, "out": f"{stem}.json"}
    with open(f"{stem}.spec.json", "w") as f:
        json.dump(spec, f)
    _run_launcher(args, stages, ["seqpipe_ds.benchmark", f"{stem}.spec.json"], f"{stem}.log")
    with open(f"{stem}.json") as f:
        return json.load(f)


def _make_plan(args, out):
    """profile (one process, one stage's layers) -> fit -> solve into out/dp_results.json."""
    from . import plan as plan_cli
    if args.num_layers % args.stages:
        raise SystemExit(f"--num-layers {args.num_layers} must divide into --stages {args.stages}")
    profile, model_file, plan_file = out / "profile.json", out / "latency_model.json", out / "dp_results.json"
    batch_sizes = sorted({1, args.batch_size} | {b for b in (2, 4) if b < args.batch_size})
    print(f"profiling one stage ({args.num_layers // args.stages} layers) at granularity {args.granularity}",
          flush=True)
    _run_launcher(args, 1, ["seqpipe_ds.cli.plan", "profile", "--num-layers", str(args.num_layers // args.stages),
                            *[v for flag in MODEL_FLAGS[1:] for v in (f"--{flag}", str(getattr(args, flag.replace("-", "_"))))],
                            "--micro-batch-size", str(args.batch_size), "--batch-sizes", *map(str, batch_sizes),
                            "--granularity", str(args.granularity), "--repeats", str(args.profile_repeats),
                            "--warmup", "1",
                            "--quiet", "--out", str(profile)], out / "profile.log")
    for command in (["fit", str(profile), "--out", str(model_file)],
                    ["solve", str(model_file), "--num-stages", str(args.stages), "--batch-size", str(args.batch_size),
                     "--num-model-layers", str(args.num_layers), "--plan-file", str(plan_file)]):
        if plan_cli.main(command):
            raise SystemExit(f"seqpipe-plan {command[0]} failed")
    return str(plan_file), str(model_file)


def _slicing(args, variant, plan_file):
    """(batch_slices, input_slices) a variant runs, for the table and the prediction."""
    section = variant["seqpipe"]
    if section is None:
        return None
    if "plan" in section:
        from ..planner import read_plans
        entry = next(e for e in read_plans(plan_file) if e.micro_batch_size == args.batch_size and e.pp == args.stages)
        return entry.batch_slices, entry.input_slices
    return [args.batch_size], [even_split(args.seq_length, section["seq_slices"])]


def _predict(args, model_file, slicing):
    """The planner's model of one iteration: sum + (K - 1) * max of slice times + optimizer step."""
    if not model_file:
        return None
    from ..planner.fit import read_model_file
    model = read_model_file(model_file).model
    if slicing is None:  # stock: B micro-batches of one whole sequence, 1F1B
        t = model.plan_slice_times([1], [[args.seq_length]])[0]
        return (args.batch_size + args.stages - 1) * t + model.update_time
    times = model.plan_slice_times(*slicing)
    return sum(times) + (args.stages - 1) * max(times) + model.update_time


def _rows(args, variants, timing, ideal, memory, model_file, plan_file):
    ideal_time = statistics.median(ideal["times"]["single stage"]) / args.stages
    tokens = args.batch_size * args.seq_length
    stock = statistics.median(timing["times"]["stock DeepSpeed"])
    rows = []
    for name, variant in variants.items():
        times = timing["times"][name]
        median = statistics.median(times)
        slicing = _slicing(args, variant, plan_file)
        predicted = _predict(args, model_file, slicing)
        rows.append({"variant": name, "slicing": _describe(args, slicing), "s_per_iter": median,
                     "s_min": min(times), "s_max": max(times), "tokens_per_s": tokens / median,
                     "tokens_per_s_min": tokens / max(times), "tokens_per_s_max": tokens / min(times),
                     "vs_stock": stock / median, "of_ideal": ideal_time / median,
                     "predicted_s": predicted, "prediction_error": None if predicted is None else predicted / median - 1,
                     "peak_memory_mib": memory[name] / 2 ** 20})
    rows.append({"variant": f"ideal (1 process / {args.stages})", "slicing": "no bubble", "s_per_iter": ideal_time,
                 "tokens_per_s": tokens / ideal_time, "vs_stock": stock / ideal_time, "of_ideal": 1.0,
                 "single_stage_s": ideal_time * args.stages})
    return rows


def _describe(args, slicing):
    if slicing is None:
        return f"{args.batch_size} micro-batch(es) of 1 x {args.seq_length}"
    batch_slices, input_slices = slicing
    return " | ".join(f"{b}x{lengths}" for b, lengths in zip(batch_slices, input_slices))


def _print_table(args, rows, device):
    print(f"\nGPT {args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads, seq "
          f"{args.seq_length}, batch {args.batch_size}; {args.stages} stages, {args.threads} thread(s) each; "
          f"device {device}; medians of {args.repeats} alternating iterations")
    header = f"{'variant':<24} {'tokens/s (min-max)':>22} {'x stock':>8} {'of ideal':>9} {'predicted':>16} " \
             f"{'peak MiB':>9}  slicing"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        spread = f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f})" \
            if "tokens_per_s_min" in r else f"{r['tokens_per_s']:.0f}"
        predicted = f"{r['predicted_s']:.3f}s ({r['prediction_error']:+.0%})" if r.get("predicted_s") else "-"
        memory = f"{r['peak_memory_mib']:.0f}" if "peak_memory_mib" in r else "-"
        print(f"{r['variant']:<24} {spread:>22} {r['vs_stock']:>7.2f}x {r['of_ideal']:>8.0%} {predicted:>16} "
              f"{memory:>9}  {r['slicing']}")


def _draw_trace(traces, path):
    from ..planner.gantt import draw_gantt
    from ..planner.timeline import Segment
    name = "seqpipe planned"
    rows = traces[name]
    units = sorted({tuple(unit) for _, _, unit, _, _, _ in rows})
    segments = [Segment(stage, units.index(tuple(unit)), "fwd" if phase == "forward" else "bwd", start, end)
                for stage, _, unit, phase, start, end in rows]
    draw_gantt(segments, path, f"{name}: measured slice forward/backward per stage")


if __name__ == "__main__":
    sys.exit(main())
