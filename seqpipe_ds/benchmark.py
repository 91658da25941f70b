"""The measuring side of seqpipe-bench, run in every process of one launch.

``python -m seqpipe_ds.benchmark SPEC.json`` (under a launcher) builds one engine per variant in
the same processes, warms them up, then alternates them iteration by iteration so that drifts
of the machine hit every variant alike. With ``"measure"``, one more iteration per variant
records the bytes saved for backward (``memory.SavedTensorMeter``) and, for seqpipe variants, the
slice timestamps; and every stage probes its saved bytes per token on one whole sequence (the
memory model's input). Rank 0 writes the result JSON named in the spec.

Spec: {"model": {GPTConfig fields}, "stages": K, "warmup": w, "repeats": r, "measure": bool, "out": path,
       "variants": {name: {"micro_batch_size": b, "gradient_accumulation": g,
                           "seqpipe": seqpipe section, or null for stock DeepSpeed,
                           "recompute": optional GPTConfig.recompute_granularity (null: none)}},
       "calibration": optional {name: seqpipe variant, as above},
       "documents": optional {"prefix": Megatron .bin/.idx prefix, "eod": end-of-document id}}

With ``"documents"`` (packed documents: the model is built with ``reset_attention_mask`` and
``reset_position_ids``) the batches are that dataset's documents in a seeded shuffled order, back to
back, as GPTDataset packs them, with Megatron's reset positions, EOD loss mask and each token's
document start.

The ``"calibration"`` variants alternate with the others, and every timed iteration of theirs is
traced (``"timed_traces"``: the units the calibration fits, planner/calibrate.py); they are left out
of the measured iteration. A calibration launch has only those; seqpipe-bench's timing launch carries
them too, so that the calibration and the runs it prices see the machine at the same minutes.

With ``"measure"`` every stage also counts its model states (parameters, gradients and optimizer
states, bytes of the tensors the engine holds after the measured step).
"""
import json
import sys
import time

import torch
from deepspeed import comm as dist
from tqdm import tqdm

import seqpipe_ds
from seqpipe_ds import parallel
from seqpipe_ds.data import corpus_documents, document_starts, packed_stream
from seqpipe_ds.memory import SavedTensorMeter
from seqpipe_ds.model import GPTConfig, gpt_pipeline, wgrad


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
    """The first sequences of the embedded corpus, byte-tokenized, or of the packed documents; every
    variant trains on the same ones."""
    b, s = variant["micro_batch_size"], spec["model"]["max_position_embeddings"]
    needed = variant["gradient_accumulation"] * b * (s + 1)
    if spec.get("documents"):
        return _document_batches(spec["documents"], needed, b, s)
    text = "\n".join(corpus_documents()).encode("utf-8")
    tokens = torch.tensor(list(text[:needed]), dtype=torch.long).view(-1, b, s + 1)
    positions = torch.arange(s).expand(b, s)
    return [((seqs[:, :-1], positions), (seqs[:, 1:], torch.ones(b, s))) for seqs in tokens]


def _document_batches(documents, needed, b, s):
    """Micro-batches of packed documents: ((tokens, position ids, document starts), (labels, loss mask)),
    positions restarting and the loss masked on EOD tokens as megatron-core's GPTDataset has them."""
    stream = torch.from_numpy(packed_stream(documents["prefix"], needed))
    if stream.numel() < needed:
        raise ValueError(f"{documents['prefix']} holds {stream.numel()} tokens, the batches need {needed}")
    batches = []
    for seqs in stream.view(-1, b, s + 1):
        tokens = seqs[:, :-1]
        starts = document_starts(tokens, documents["eod"])
        positions = torch.arange(s).expand(b, s) - starts
        batches.append(((tokens, positions, starts), (seqs[:, 1:], (tokens != documents["eod"]).float())))
    return batches


def _per_stage(engine, value):
    """[value of stage 0, ...]: the maximum over the ranks of each stage."""
    values = torch.zeros(engine.num_stages, device=engine.device)
    values[engine.stage_id] = float(value)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def run(spec):
    calibration = spec.get("calibration") or {}
    built = {**spec["variants"], **calibration}
    if len(built) != len(spec["variants"]) + len(calibration):  # every rank, before any communication
        raise ValueError(f"calibration variants {sorted(set(spec['variants']) & set(calibration))} have the names "
                         "of timed ones")
    topology = parallel.initialize(pipeline_parallel_size=spec["stages"])
    engines, batches = {}, {}
    if dist.get_rank() == 0:
        print(f"timing: building {len(built)} engine(s)", flush=True)
    for name, variant in built.items():
        config = GPTConfig(**spec["model"], recompute_granularity=variant.get("recompute"))
        model = gpt_pipeline(config, topology)
        engines[name], *_ = seqpipe_ds.initialize(model=model, model_parameters=model.parameters(),
                                                  config=_ds_config(spec, variant))
        batches[name] = _batches(spec, variant)
    times = {name: [] for name in engines}
    traced = {name: [] for name in calibration}  # every timed iteration's units
    cuda_peak = {name: 0.0 for name in engines}
    bar = tqdm(total=(spec["warmup"] + spec["repeats"]) * len(engines), unit="iter", disable=dist.get_rank() != 0,
               desc=f"timing on {spec['stages']} stage(s): warm-up, then alternating")
    for rep in range(spec["warmup"] + spec["repeats"]):
        for name, engine in engines.items():
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            timed = rep >= spec["warmup"]
            if timed and name in traced:
                engine.slice_trace = []
            dist.barrier()
            start = time.perf_counter()
            engine.train_batch(data_iter=iter(batches[name]))
            dist.barrier()
            elapsed = time.perf_counter() - start
            if torch.cuda.is_available():
                cuda_peak[name] = max(cuda_peak[name], max(_per_stage(engine, torch.cuda.max_memory_allocated())))
            if timed:
                times[name].append(elapsed)
                if name in traced:
                    traced[name].append(_take_trace(engine, start))
            bar.update()
    bar.close()
    result = {"times": times, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "world_size": dist.get_world_size(), "cuda_peak_memory": cuda_peak if torch.cuda.is_available() else None}
    if traced:
        result["timed_traces"] = {name: _gather_rows(iterations) for name, iterations in traced.items()}
    if spec.get("measure"):
        result.update(_measure(spec, engines, batches))
    return result


def _measure(spec, engines, batches):
    """One iteration per variant with the saved-tensor meter (and slice timestamps); the per-token probe."""
    saved, traces, states = {}, {}, {}
    measured = {name: engines[name] for name in spec["variants"]}
    for name, engine in tqdm(measured.items(), desc="timing: one measured iteration each", unit="variant",
                             disable=dist.get_rank() != 0):
        meter = SavedTensorMeter(engine.module.parameters())
        sliced = spec["variants"][name]["seqpipe"] is not None
        if sliced:
            engine.slice_trace = []
        dist.barrier()
        origin = time.perf_counter()
        with meter.hooks():
            engine.train_batch(data_iter=iter(batches[name]))
        saved[name] = _per_stage(engine, meter.peak)
        states[name] = _per_stage(engine, _model_state_bytes(engine))
        if sliced:
            traces[name] = _gather_rows([_take_trace(engine, origin)])[0]
    engine, name = next(iter(measured.values())), next(iter(measured))
    kept, held = _probe_bytes_per_token(engine, batches[name][0])
    return {"saved_peak_bytes": saved, "trace": traces, "model_state_bytes": states,
            "saved_bytes_per_token": _per_stage(engine, kept), "weight_bytes_per_token": _per_stage(engine, held)}


def _take_trace(engine, origin):
    """This stage's traced units, [stage, kind, micro-batch, batch slice, sequence slice, start, end]
    in seconds since ``origin``; tracing stops."""
    rows = [[engine.stage_id, a.kind, *a.key, t0 - origin, t1 - origin] for a, t0, t1 in engine.slice_trace]
    engine.slice_trace = None
    return rows


def _gather_rows(iterations):
    """Per iteration, every stage's rows (one all-gather for all iterations)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, iterations)
    return [[row for stage in gathered for row in stage[i]] for i in range(len(iterations))]


def _model_state_bytes(engine):
    """Bytes of this stage's parameters, their gradients (one per trainable parameter, of its size:
    the optimizer's zero_grad frees them after the step) and the optimizer's state tensors, each
    storage once, as the engine holds them after a step."""
    parameters = list(engine.module.parameters())
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's wrapper, or the optimizer
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in parameters + states}
    return sum(storages.values()) + sum(p.numel() * p.element_size() for p in parameters if p.requires_grad)


def _probe_bytes_per_token(engine, batch):
    """Bytes this stage saves for backward per token of one whole sequence (forward, and the loss on
    the last stage), and the bytes a split backward then holds for its W (``memory.held``); the
    backward leaves the parameters' gradients alone (``autograd.grad``)."""
    (tokens, *rest), (labels, loss_mask) = batch
    seq = tokens.shape[1]
    module = engine.module
    if engine.is_first_stage():
        inputs = tuple(t[:1].to(engine.device) for t in (tokens, *rest))
    else:
        dtype = next(module.parameters()).dtype
        inputs = torch.randn(1, seq, module.gpt_config.hidden_size, dtype=dtype, device=engine.device,
                             requires_grad=True)
        if len(rest) == 2:  # packed documents: the stage takes (hidden, document starts)
            inputs = (inputs, rest[1][:1].to(engine.device))
    meter, queue = SavedTensorMeter(module.parameters()), wgrad.WeightGrads()
    with meter.hooks():
        out = module(inputs)
        if engine.is_last_stage():
            out = module.loss_fn(out, (labels[:1].to(engine.device), loss_mask[:1].to(engine.device)))
        kept = meter.peak
        out = out[0] if isinstance(out, tuple) else out
        wrt = [t for t in (*module.parameters(), *(inputs if isinstance(inputs, tuple) else (inputs,)))
               if t.requires_grad]
        with wgrad.deferring(queue):
            torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)
        del out
        held = meter.current  # the graph is freed: what the queue keeps for W
    return kept / seq, held / seq


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
