"""Where a training step's time goes, per pipeline instruction: stock DeepSpeed against a seqpipe
variant, each stage's process under cProfile, the same model and batch as ``seqpipe-bench``.

    python benchmarks/profile_step.py [--batch-size 1] [--seq-slices 4] [--schedule slice-zb]
                                      [--repeats 10] [--out benchmarks/results/profile_step_b1]

Each variant is its own ``deepspeed --hostfile`` launch on localhost (2 stages, one thread each)
running ``seqpipe_ds.benchmark`` on that one variant; the profiler is on for the timed iterations
only (after one warm-up). A third launch runs stock DeepSpeed's step of the whole model in one
process, seqpipe-bench's bubble-free ideal; its column is halved, the share of one of 2 stages.
Prints, per stage, milliseconds per iteration inside each of the engines' instruction handlers
(``_exec_*``: a receive's time is mostly waiting for the neighbour, so it is the bubble as that
stage sees it) and the operators that took the most time; writes ``<out>.txt``. cProfile adds a
few microseconds to every Python call, so compare the columns, not their totals with
``seqpipe-bench``'s.
"""
import argparse
import cProfile
import json
import os
import pstats
import tempfile

from bench_engine_overhead import MODEL, _machine, launch_two_stages  # this folder is the script's sys.path[0]
from seqpipe_ds.planner.planning import bench_variant

TOP_OPERATORS = 8
STAGES = 2


def _worker(spec_path, profile_path):
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from seqpipe_ds import benchmark

    profiler, calls, original = cProfile.Profile(), [0], PipelineEngine.train_batch

    def train_batch(self, *args, **kwargs):  # profiled after the warm-up iteration
        calls[0] += 1
        if calls[0] > 1:
            profiler.enable()
        try:
            return original(self, *args, **kwargs)
        finally:
            profiler.disable()

    PipelineEngine.train_batch = train_batch
    benchmark.main([spec_path])
    profiler.dump_stats(f"{profile_path}.rank{os.environ['RANK']}")


def _launch(tmp, name, variant, repeats, stages=STAGES):
    spec = {"model": MODEL, "stages": stages, "measure": False, "calibration": {}, "warmup": 1, "repeats": repeats,
            "out": os.path.join(tmp, f"{name}.json"), "variants": {name: variant}}
    spec_path, profile_path = os.path.join(tmp, f"{name}.spec.json"), os.path.join(tmp, f"{name}.prof")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    launch_two_stages(tmp, os.path.abspath(__file__), ["--worker", spec_path, profile_path], processes=stages)
    return [pstats.Stats(f"{profile_path}.rank{rank}") for rank in range(stages)]


def _per_iteration(stats, share=1.0):
    """{label: (ms per iteration, calls per iteration)} of the instruction handlers, the whole
    train_batch and the top operators by their own time; times ``share`` (a stage's share of a
    one-process run)."""
    entries = stats.stats

    def is_step(path, name):  # DeepSpeed's train_batch, not the wrapper that switches the profiler on
        return path.endswith("pipe/engine.py") and name == "train_batch"

    iterations = next(v[1] for (path, _, name), v in entries.items() if is_step(path, name))
    handlers, operators = {}, {}
    for (path, _, name), (_, calls, own, cumulative, _) in entries.items():
        if name.startswith("_exec_") and path.endswith("engine.py") and name != "_exec_schedule":
            # a handler SeqPipeEngine overrides appears twice, its own and DeepSpeed's inside it: the outer one counts
            label = name[len("_exec_"):]
            handlers[label] = max(handlers.get(label, (0.0, 0)), (cumulative, calls))
        elif is_step(path, name):
            handlers["whole step (train_batch)"] = (cumulative, calls)
        elif path == "~":
            operators[_operator(name)] = (own, calls)

    def scale(table):
        return {k: (1e3 * share * s / iterations, c / iterations) for k, (s, c) in table.items()}
    top = dict(sorted(operators.items(), key=lambda kv: -kv[1][0])[:TOP_OPERATORS])
    return scale(handlers), scale(top)


def _operator(name):
    """cProfile's name of a C function, shortened: "<built-in method torch._ops.aten.x>" -> "aten.x"."""
    name = name.strip("<>").replace("built-in method ", "").replace("method ", "")
    return name.replace("torch._ops.", "").replace("torch._C._distributed_c10d.", "c10d.").replace(
        " of 'torch._C.TensorBase' objects", " (Tensor)").replace(" of 'torch._C._EngineBase' objects", " (autograd)")


def report(profiles, names):
    """Per stage, the columns side by side; a one-process profile (one rank) gives every stage its share."""
    lines = []
    for rank in range(STAGES):
        tables = [_per_iteration(p[rank]) if len(p) == STAGES else _per_iteration(p[0], 1 / STAGES) for p in profiles]
        for part, title in ((0, "instruction handlers"), (1, "operators, own time")):
            lines.append(f"stage {rank}, {title}: ms per iteration (calls)".ljust(60) +
                         "".join(f"{n:>22}" for n in names))
            labels = sorted({k for t in tables for k in t[part]}, key=lambda k: -max(t[part].get(k, (0, 0))[0]
                                                                                       for t in tables))
            for label in labels:
                cells = [t[part].get(label) for t in tables]
                lines.append(f"  {label[:58]:<58}" + "".join(
                    f"{c[0]:>14.1f} ({c[1]:>5.1f})" if c else f"{'-':>22}" for c in cells))
            lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step, in micro-batches of one")
    parser.add_argument("--seq-slices", type=int, default=4)
    parser.add_argument("--schedule", default="slice-zb")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/profile_step_b1")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker:
        return _worker(*args.worker)
    seqpipe = {"seq_slices": args.seq_slices, "schedule": args.schedule}
    names = ["stock DeepSpeed", f"{args.schedule} uniform {args.seq_slices}", f"1 process / {STAGES}"]
    with tempfile.TemporaryDirectory() as tmp:
        profiles = [_launch(tmp, f"v{i}", bench_variant(1, args.batch_size, section), args.repeats)
                    for i, section in enumerate((None, seqpipe))]
        profiles.append(_launch(tmp, "single", bench_variant(1, args.batch_size, None), args.repeats, stages=1))
        text = report(profiles, names)
    header = (f"$ python benchmarks/profile_step.py --batch-size {args.batch_size} --seq-slices {args.seq_slices} "
              f"--schedule {args.schedule} --repeats {args.repeats}\n"
              f"machine: {_machine()}; GPT {MODEL}, {STAGES} stages\n")
    print(header + text)
    with open(f"{args.out}.txt", "w") as f:
        f.write(header + "\n" + text + "\n")


if __name__ == "__main__":
    main()
