"""Where a unit's time goes inside DeepSpeed's pipeline engine: the same slices timed in isolation
(the profile's ``_time_slice``) and inside a two-stage ``SeqPipeEngine`` (wall and CPU time of
every traced forward and backward), in the same processes; then the step time with every thread of
each stage pinned to its own core against unpinned (what DeepSpeed's ``--bind_cores_to_rank``
does with numactl), alternating.

    python benchmarks/bench_engine_overhead.py [--slices 4] [--repeats 5] [--out benchmarks/results/engine_overhead_cpu]

It launches itself with ``deepspeed --hostfile`` on localhost (2 processes, one thread each) and
writes ``<out>.txt`` / ``<out>.json``. The isolated time is the stage's layers alone; in the
engine a unit also runs the stage's ends (embedding on the first stage, final norm + LM head on
the last; the loss is outside the traced span), so compare stage 0's rows for the layers' own
overhead and read the last stage's with its head in mind.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

MODEL = {"num_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "vocab_size": 384,
         "max_position_embeddings": 1024}


def _worker(args):
    import torch
    from deepspeed import comm as dist

    import seqpipe_ds
    from seqpipe_ds import parallel
    from seqpipe_ds.benchmark import _batches, _ds_config
    from seqpipe_ds.engine import SeqPipeEngine
    from seqpipe_ds.model import GPTConfig, gpt_pipeline
    from seqpipe_ds.planner import profile

    @contextmanager
    def traced(engine, kind, key):  # SeqPipeEngine._traced, with the thread's CPU time beside the wall time
        if engine.slice_trace is None:
            yield
            return
        wall, cpu = time.perf_counter(), time.thread_time()
        yield
        engine.slice_trace.append((kind, key[2], time.perf_counter() - wall, time.thread_time() - cpu))
    SeqPipeEngine._traced = traced

    topology = parallel.initialize(pipeline_parallel_size=2)
    rank, seq, k = dist.get_rank(), MODEL["max_position_embeddings"], args.slices
    spec = profile.ProfileSpec(num_layers=MODEL["num_layers"] // 2, hidden_size=MODEL["hidden_size"],
                               num_attention_heads=MODEL["num_attention_heads"], vocab_size=MODEL["vocab_size"],
                               seq_length=seq, micro_batch_size=1)
    layers, _ = profile.stage_modules(spec, torch.device("cpu"))
    length, isolated = seq // k, {s: [] for s in range(k)}
    for rep in range(2 + args.repeats):
        for s in range(k):
            total, forward = profile._time_slice(layers, 1, length, s * length, spec, "cpu", lambda: None)
            if rep >= 2:
                isolated[s].append((forward, total - forward))
    del layers
    variants = {"stock DeepSpeed": {"micro_batch_size": 1, "gradient_accumulation": 1, "seqpipe": None},
                f"slice-1f1b {k} slices": {"micro_batch_size": 1, "gradient_accumulation": 1,
                                           "seqpipe": {"seq_slices": k, "schedule": "slice-1f1b"}}}
    engines, batches = {}, {}
    for name, variant in variants.items():
        model = gpt_pipeline(GPTConfig(**MODEL), topology)
        engines[name], *_ = seqpipe_ds.initialize(model=model, model_parameters=model.parameters(),
                                                  config=_ds_config({"model": MODEL}, variant))
        batches[name] = _batches({"model": MODEL}, variant)
    sliced = engines[f"slice-1f1b {k} slices"]
    units, steps, cores = {}, {}, set(range(os.cpu_count()))
    for rep in range(1 + args.repeats):
        for pinned in (False, True):
            for tid in os.listdir("/proc/self/task"):  # every thread of the process: main, gloo's, ...
                os.sched_setaffinity(int(tid), {rank % len(cores)} if pinned else cores)
            for name, engine in engines.items():
                engine.slice_trace = [] if rep and engine is sliced and not pinned else None
                dist.barrier()
                start = time.perf_counter()
                engine.train_batch(data_iter=iter(batches[name]))
                elapsed = time.perf_counter() - start
                dist.barrier()
                if rep:
                    steps.setdefault(f"{name}, {'pinned' if pinned else 'unpinned'}", []).append(elapsed)
                for kind, s, wall, cpu in engine.slice_trace or []:
                    units.setdefault(f"{kind}{s}", []).append((wall, cpu))
    local = {"stage": rank, "isolated": {s: [statistics.median(v) for v in zip(*t)] for s, t in isolated.items()},
             "engine": {u: [statistics.median(v) for v in zip(*t)] for u, t in units.items()},
             "steps": {n: [statistics.median(t), min(t), max(t)] for n, t in steps.items()}}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump({"model": MODEL, "slices": k, "repeats": args.repeats, "stages": gathered}, f, indent=1)
    parallel.destroy()


def _report(result):
    k = result["slices"]
    lines = [f"GPT {MODEL['num_layers']} layers, hidden {MODEL['hidden_size']}, seq {MODEL['max_position_embeddings']}, "
             f"2 stages x 1 thread, slice-1f1b {k} slices of {MODEL['max_position_embeddings'] // k}; medians of "
             f"{result['repeats']}; seconds", "",
             f"{'stage':>5} {'slice':>5} {'F isolated':>10} {'F engine':>9} {'(cpu)':>6} {'x':>6} "
             f"{'B isolated':>10} {'B engine':>9} {'(cpu)':>6} {'x':>6}"]
    for stage in result["stages"]:
        for s in range(k):
            (fi, bi), (fw, fc), (bw, bc) = stage["isolated"][str(s)], stage["engine"][f"F{s}"], stage["engine"][f"B{s}"]
            lines.append(f"{stage['stage']:>5} {s:>5} {fi:>10.4f} {fw:>9.4f} {fc:>6.3f} {fw / fi:>5.2f}x "
                         f"{bi:>10.4f} {bw:>9.4f} {bc:>6.3f} {bw / bi:>5.2f}x")
    lines += ["", "step time (s), median (min-max), alternating:"]
    steps = result["stages"][0]["steps"]
    for name, (median, low, high) in steps.items():
        lines.append(f"  {name:<36} {median:.3f} ({low:.3f}-{high:.3f})")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/engine_overhead_cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker:
        return _worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        launch_two_stages(tmp, os.path.abspath(__file__), ["--worker", "--result", result, "--slices", str(args.slices),
                                                           "--repeats", str(args.repeats)])
        with open(result) as f:
            data = json.load(f)
    text = _report(data)
    print(text)
    with open(f"{args.out}.json", "w") as f:
        json.dump(data, f, indent=1)
    with open(f"{args.out}.txt", "w") as f:
        f.write(f"$ python benchmarks/bench_engine_overhead.py --slices {args.slices} --repeats {args.repeats}\n"
                f"machine: {_machine()}\n\n{text}\n")


def launch_two_stages(tmp, script, script_args, processes=2):
    """``deepspeed --hostfile`` on localhost: ``script script_args`` in ``processes`` processes (2: one
    per stage), one thread each (a hostfile in ``tmp``); raises with the launch's output tail where it fails."""
    hostfile = os.path.join(tmp, "hostfile")
    with open(hostfile, "w") as f:
        f.write(f"localhost slots={processes}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--no_ssh_check",
               "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000),
               "--no_local_rank", script, *script_args]
    done = subprocess.run(command, env=env, timeout=900, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"launch failed (exit {done.returncode}): ...{done.stdout.decode(errors='replace')[-3000:]}")


def _machine():
    with open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
