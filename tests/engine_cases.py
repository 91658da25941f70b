"""Per-rank training runs for the exactness tests: stock DeepSpeed pipelining vs seqpipe.

``train(case)`` trains ``STEPS`` Adam steps of the tiny GPT and returns, gathered to full
(TP-unsharded) tensors: the loss of every step, the gradient of every parameter this rank holds
at every step (when the optimizer exposes them: fp32 without ZeRO), and the final parameters.
"""
import torch

from common import float64, make_batch, rel_err, tiny_config

STEPS = 3
SEQ = 16
VOCAB = 128


def ds_config(case, seqpipe=None):
    cfg = {
        "train_micro_batch_size_per_gpu": case["mbs"],
        "gradient_accumulation_steps": case.get("gas", 1),
        "train_batch_size": case["mbs"] * case.get("gas", 1) * case.get("dp", 1),
        # Adam's update g / (|g| + eps) turns fp32 rounding noise in near-zero gradients into
        # full-size steps of either sign when eps is tiny; eps = 1e-4 keeps the update a smooth
        # function of the gradient, so 3 steps stay comparable at 1e-5 (the method is exact; the
        # sliced sums merely round differently).
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "eps": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": case.get("zero", 0)},
        "steps_per_print": 10 ** 6,
        "gradient_clipping": case.get("clip", 0.0),  # DeepSpeed clips at 1.0 unless told otherwise
    }
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    cfg.update(case.get("ds_config", {}))  # further DeepSpeed settings a case needs
    if seqpipe is not None:
        cfg["seqpipe"] = {"enabled": True, "seq_length": SEQ, **seqpipe}
    return cfg


def reference_case(case):
    """The single-process run of a case: the same micro-batches, all on one rank (and so without
    sequence parallelism, which needs TP > 1)."""
    ref = {k: v for k, v in case.items() if k not in ("pp", "tp", "dp")}
    ref["gas"] = case.get("gas", 1) * case.get("dp", 1)
    ref["model"] = {k: v for k, v in case.get("model", {}).items() if k != "sequence_parallel"}
    return ref


def micro_batches(case, step, dp_rank):
    """The micro-batches of one DP rank in one step; all DP ranks together cover the global batch,
    in Megatron's sampler order (micro-batch i of DP rank r is the global batch's (i · DP + r)-th),
    which the hidden-dropout masks are keyed by (seqpipe_ds.model.dropout.sample_numbers). A model
    with packed documents gets ``document_batch``es."""
    gas, mbs, dp = case.get("gas", 1), case["mbs"], case.get("dp", 1)
    make = document_batch if tiny_config(**case.get("model", {})).documents else make_batch
    return [make(mbs, SEQ, VOCAB, seed=1000 * step + i * dp + dp_rank) for i in range(gas)]


EOD = 0
# Document lengths of the rows document_batch packs (SEQ tokens each): documents that slices cut,
# single-token documents, a document spanning every slice of a 4-way cut, and rows without an EOD.
DOCUMENT_ROWS = [[5, 9, 2], [1, 1, 1, 13], [3, 12, 1], [16], [2, 1, 6, 1, 6], [1, 15]]


def document_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    """((tokens, position_ids, document_starts), (labels, loss_mask)) of packed documents (rows
    from DOCUMENT_ROWS, each document ended by EOD but a row's last), with Megatron's own reset
    positions and EOD loss mask (megatron-core's _get_ltor_masks_and_position_ids with all three
    flags), plus some masked-out tokens."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    from seqpipe_ds.data import document_starts
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, vocab, (batch, seq + 1), generator=g)
    for r in range(batch):
        lengths = DOCUMENT_ROWS[(seed + r) % len(DOCUMENT_ROWS)]
        assert sum(lengths) == seq
        for end in torch.tensor(lengths).cumsum(0)[:-1].tolist():
            text[r, end - 1] = EOD
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    positions, loss_mask = [], []
    for row in tokens:
        _, mask, pos = _get_ltor_masks_and_position_ids(row, EOD, True, True, True, False)
        positions.append(pos)
        loss_mask.append(mask)
    loss_mask = torch.stack(loss_mask) * (torch.rand(batch, seq, generator=g) > 0.1).float()
    return (tokens, torch.stack(positions), document_starts(tokens, EOD)), (labels, loss_mask)


def full(module, name, tensor):
    """Gathers a TP-sharded parameter-shaped tensor into the full tensor."""
    from megatron.core import parallel_state
    param = dict(module.named_parameters())[name]
    if not getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tensor.detach().float().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim).float()


def allow_float64_gradient_reduction():
    """DeepSpeed's gradient all-reduce buckets gradients by the accelerator's ``supported_dtypes()``,
    which lists no float64 (runtime/engine.py, split_half_float_double_sparse, asserts on it), although
    its buckets and the process groups carry float64 fine. The float64 exactness runs add it for this
    process; nothing else in DeepSpeed is changed."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    supported = accelerator.supported_dtypes()
    if torch.float64 not in supported:
        accelerator.supported_dtypes = lambda: [*supported, torch.float64]


def train(case, seqpipe=None, steps=range(STEPS), load=None, save=None):
    import seqpipe_ds
    from seqpipe_ds import parallel
    from seqpipe_ds.model import gpt_pipeline
    allow_float64_gradient_reduction()
    topo = parallel.initialize(tensor_parallel_size=case.get("tp", 1), pipeline_parallel_size=case.get("pp", 1))
    model = gpt_pipeline(tiny_config(**case.get("model", {})), topo, seed=11,  # "model": GPTConfig options
                         activation_checkpoint_interval=case.get("checkpoint_interval", 0))
    if case.get("upcast"):  # the float64 truth of a lower-precision case: its initial weights, in float64
        model.to(torch.float64)
    engine, optimizer, _, _ = seqpipe_ds.initialize(model=model, model_parameters=model.parameters(),
                                                    config=ds_config(case, seqpipe))
    if next(model.parameters()).dtype == torch.float64:
        # DeepSpeed all-reduces data-parallel gradients in communication_data_type, fp32 unless fp16/bf16
        # (its config refuses "fp64"); the engine's setter lets a float64 run reduce in float64.
        engine.communication_data_type = torch.float64
    grads = []
    exposes_grads = not case.get("zero") and not case.get("bf16")
    if exposes_grads:
        optimizer.register_step_pre_hook(lambda *_: grads.append(
            {n: full(engine.module, n, p.grad) for n, p in engine.module.named_parameters()}))
    if load:
        engine.load_checkpoint(load)
    losses = []
    dp_rank = engine.grid.data_parallel_id
    for step in steps:
        losses.append(engine.train_batch(data_iter=iter(micro_batches(case, step, dp_rank))).item())
    if save:
        engine.save_checkpoint(save)
    params = {n: full(engine.module, n, p) for n, p in engine.module.named_parameters()}
    tp_rank = engine.grid.get_slice_parallel_rank()
    return {"losses": losses, "grads": grads, "params": params, "report": dp_rank == 0 and tp_rank == 0,
            "dtype": str(next(engine.module.parameters()).dtype), "slice_plan": getattr(engine, "slice_plan", None)}


def train_many(runs):
    """Several (case, seqpipe) runs in one process world, one after another."""
    return [train(case, seqpipe) for case, seqpipe in runs]


def merge(rank_results):
    """One view of the whole model from the ranks that report (DP rank 0, TP rank 0 of every stage).

    Where stages share a tied module the first stage's copy wins: the last stage's copy of the
    position embeddings is never used (DeepSpeed leaves its gradient at zero, and a checkpoint
    restores it from the first stage's file).
    """
    reporting = [r for r in rank_results if r["report"]][::-1]
    return {"losses": reporting[0]["losses"],
            "grads": [{k: v for r in reporting for k, v in r["grads"][s].items()}
                      for s in range(len(reporting[0]["grads"]))],
            "params": {k: v for r in reporting for k, v in r["params"].items()}}


def errors_by_group(actual, truth):
    """Worst relative error of each compared group: losses, grads of each step, final params."""
    out = {"losses": rel_err(float64(actual["losses"]), float64(truth["losses"]))}
    for step, (a, e) in enumerate(zip(actual["grads"], truth["grads"])):  # where the optimizer exposes them
        out[f"grads step {step}"] = max(rel_err(a[k], e[k]) for k in a)
    out["params"] = max(rel_err(v, truth["params"][k]) for k, v in actual["params"].items())
    return out


def run_layouts(layouts, train_many_fn=None, timeout=900):
    """Runs every layout's runs on its world size, and each case's single-process reference.

    ``layouts``: {name: (world size, [(case, [seqpipe section or None, ...]), ...])}. Returns
    {(name, case index): {variant index: per-rank results, "reference": [the reference's result]}}.
    """
    import launcher
    train_many_fn = train_many_fn or train_many
    out, references = {}, []
    for name, (world, cases) in layouts.items():
        runs = [(case, variant) for case, variants in cases for variant in variants]
        per_rank = launcher.run(train_many_fn, world, timeout=timeout, runs=runs)
        by_run = iter([rank[i] for rank in per_rank] for i in range(len(runs)))
        for c, (case, variants) in enumerate(cases):
            out[name, c] = {v: next(by_run) for v in range(len(variants))}
            references.append(((name, c), reference_case(case)))
    reference_runs = launcher.run(train_many_fn, 1, timeout=300, runs=[(r, None) for _, r in references])[0]
    for (key, _), result in zip(references, reference_runs):
        out[key]["reference"] = [result]
    return out

