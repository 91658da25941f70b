"""The measuring side of seqpipe-bench, run in every process of one launch.

``python -m seqpipe_ds.benchmark SPEC.json`` (under a launcher) builds one engine per variant in
the same processes, warms them up, then alternates them iteration by iteration so that drifts
of the machine hit every variant alike. Rank 0 writes the result JSON named in the spec.

Spec: {"model": {GPTConfig fields}, "stages": K, "warmup": w, "repeats": r, "trace": bool, "out": path,
       "variants": {name: {"micro_batch_size": b, "gradient_accumulation": g,
                           "seqpipe": seqpipe section, or null for stock DeepSpeed}}}
"""
import json
import resource
import sys
import time

import torch
from deepspeed import comm as dist

import seqpipe_ds
from seqpipe_ds import parallel
from seqpipe_ds.data import corpus_documents
from seqpipe_ds.model import GPTConfig, gpt_pipeline


def _ds_config(spec, variant):
    config = {"train_micro_batch_size_per_gpu": variant["micro_batch_size"],
              "gradient_accumulation_steps": variant["gradient_accumulation"],
              "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
              "steps_per_print": 10 ** 9}
    if variant["seqpipe"] is not None:
        config["seqpipe"] = {"enabled": True, "seq_length": spec["model"]["max_position_embeddings"],
                             **variant["seqpipe"]}
    return config


def _batches(spec, variant):
    """The first sequences of the embedded corpus, byte-tokenized; every variant trains on the same ones."""
    b, s = variant["micro_batch_size"], spec["model"]["max_position_embeddings"]
    text = "\n".join(corpus_documents()).encode("utf-8")
    needed = variant["gradient_accumulation"] * b * (s + 1)
    tokens = torch.tensor(list(text[:needed]), dtype=torch.long).view(-1, b, s + 1)
    positions = torch.arange(s).expand(b, s)
    return [((seqs[:, :-1], positions), (seqs[:, 1:], torch.ones(b, s))) for seqs in tokens]


def _peak_memory():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process lifetime peak RSS


def _max_over_ranks(value):
    t = torch.tensor([float(value)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def run(spec):
    topology = parallel.initialize(pipeline_parallel_size=spec["stages"])
    config = GPTConfig(**spec["model"])
    engines, batches = {}, {}
    for name, variant in spec["variants"].items():
        model = gpt_pipeline(config, topology)
        engines[name], *_ = seqpipe_ds.initialize(model=model, model_parameters=model.parameters(),
                                                  config=_ds_config(spec, variant))
        batches[name] = _batches(spec, variant)
    times = {name: [] for name in engines}
    memory = {name: 0.0 for name in engines}
    for rep in range(spec["warmup"] + spec["repeats"]):
        for name, engine in engines.items():
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            dist.barrier()
            start = time.perf_counter()
            engine.train_batch(data_iter=iter(batches[name]))
            dist.barrier()
            elapsed = time.perf_counter() - start
            memory[name] = max(memory[name], _max_over_ranks(_peak_memory()))
            if rep >= spec["warmup"]:
                times[name].append(elapsed)
    return {"times": times, "peak_memory": memory, "trace": _traces(spec, engines, batches),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "world_size": dist.get_world_size()}


def _traces(spec, engines, batches):
    """One more iteration per seqpipe variant with slice timestamps, gathered from every stage."""
    if not spec.get("trace"):
        return {}
    out = {}
    for name, engine in engines.items():
        if spec["variants"][name]["seqpipe"] is None:
            continue
        engine.slice_trace = []
        dist.barrier()
        origin = time.perf_counter()
        engine.train_batch(data_iter=iter(batches[name]))
        local = [(engine.stage_id, mb, list(unit), phase, t0 - origin, t1 - origin)
                 for mb, unit, phase, t0, t1 in engine.slice_trace]
        engine.slice_trace = None
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        out[name] = [row for rows in gathered for row in rows]
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    with open(args[0]) as f:
        spec = json.load(f)
    result = run(spec)
    if dist.get_rank() == 0:
        with open(spec["out"], "w") as f:
            json.dump(result, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
