"""seqpipe_ds: token-level (TeraPipe) pipeline parallelism for Megatron GPT training in DeepSpeed.

``seqpipe_ds.initialize`` is a drop-in for ``deepspeed.initialize``: same arguments, same return
tuple. With a ``"seqpipe": {"enabled": true, ...}`` section in the DeepSpeed config it returns a
``SeqPipeEngine`` that runs every micro-batch as batch slices x sequence slices; otherwise it is
exactly ``deepspeed.initialize``.
"""
from . import quiet  # noqa: F401  (first: filters the known-harmless notices of the libraries below)

import copy
import functools
import warnings
from typing import Tuple

import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.pipe import PipelineModule
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

from . import config as seqpipe_config
from . import protocol, schedules
from .model import dropout
from .patches import clip_norm
from .protocol import sliceable, splits_backward
from .slicing import SlicePlan, make_plan

__all__ = ["initialize", "sliceable", "splits_backward", "resolve_plan", "SlicePlan"]


def _load_config(args, config, config_params) -> dict:
    config = config if config is not None else config_params
    if config is None and getattr(args, "deepspeed_config", None) is not None:
        config = args.deepspeed_config
    if config is None:
        raise ValueError("DeepSpeed requires a config: pass config= or --deepspeed_config")
    if isinstance(config, dict):
        return config
    return load_ds_config(config)


def resolve_plan(ds_config: dict, model: PipelineModule) -> SlicePlan:
    """Checks the whole setup and returns the slicing; raises ValueError before any communication."""
    return resolve(ds_config, model)[0]


def resolve(ds_config: dict, model: PipelineModule) -> Tuple[SlicePlan, str]:
    """Checks the whole setup and returns the slicing and the schedule (a plan file's entry may name
    it); raises ValueError before any communication.

    Every rank evaluates the same inputs (the config and the full layer list), so every rank
    raises the same error and none is left waiting in a collective.
    """
    cfg = seqpipe_config.parse(ds_config)
    if not isinstance(model, PipelineModule):
        raise ValueError(f"seqpipe needs a deepspeed.pipe.PipelineModule, got {type(model).__name__}")
    ds = DeepSpeedConfig(copy.deepcopy(ds_config), mpu=model.mpu())
    problems = protocol.problems(model._layer_specs, model.loss_fn)
    if ds.zero_optimization_stage >= 2:
        problems.append(f"ZeRO stage {ds.zero_optimization_stage} is incompatible with pipeline parallelism "
                        "(use stage 0 or 1)")
    if model.activation_checkpoint_interval > 0 and not protocol.is_sliceable(model.activation_checkpoint_func):
        problems.append(f"activation checkpointing with {protocol.name(model.activation_checkpoint_func)} would "
                        "rerun attention without the slice's KV cache: use seqpipe_ds.model.layers.recomputed "
                        "(gpt_pipeline's default) or GPTConfig.recompute_granularity")
    gpt = getattr(model, "gpt_config", None)
    if gpt is not None and cfg.seq_length > gpt.max_position_embeddings:
        problems.append(f"seq_length {cfg.seq_length} exceeds max_position_embeddings {gpt.max_position_embeddings}")
    if problems:
        raise ValueError("seqpipe cannot run this model: " + "; ".join(problems))
    batch_slices, seq_slices, schedule = cfg.batch_slices, cfg.seq_slices, cfg.schedule
    if cfg.plan is not None:
        batch_slices, seq_slices, schedule = _planned_slices(cfg, ds, model)
    if schedules.get_schedule(schedule).splits_backward:
        split_problems = protocol.backward_split_problems(model._layer_specs)
        if split_problems:
            raise ValueError(f"seqpipe: schedule {schedule!r} splits every backward into B and a deferred W: "
                             + "; ".join(split_problems))
    try:
        plan = make_plan(batch_slices, seq_slices, ds.train_micro_batch_size_per_gpu, cfg.seq_length)
    except ValueError as e:
        raise ValueError(f"seqpipe: {e}") from None
    if gpt is not None:  # sequence parallelism splits every slice over the TP ranks
        from megatron.core import parallel_state
        slice_problems = gpt.slice_problems([n for lengths in plan.seq_slices for n in lengths],
                                            parallel_state.get_tensor_model_parallel_world_size())
        if slice_problems:
            raise ValueError("seqpipe: " + "; ".join(slice_problems))
    try:  # lowering simulates the schedule: one that cannot run this slicing fails here, on every rank
        schedules.lower(schedule, model.num_stages, ds.gradient_accumulation_steps, plan)
    except schedules.ScheduleError as e:
        raise ValueError(f"seqpipe: schedule {schedule!r} cannot run {plan}: {e}") from None
    return plan, schedule


def _planned_slices(cfg, ds, model):
    from .planner.hook import slices_from_plan
    return slices_from_plan(cfg, ds, model)


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               distributed_port=None, mpu=None, dist_init_required=None, collate_fn=None, config=None,
               mesh_param=None, config_params=None):
    """``deepspeed.initialize`` with sequence slicing; returns (engine, optimizer, dataloader, lr_scheduler)."""
    ds_config = _load_config(args, config, config_params)
    clip_norm.apply()  # true global norm for fp32 clipping, also for stock pipelining (patches/clip_norm.py)
    kwargs = dict(model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
                  lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn,
                  config=ds_config, mesh_param=mesh_param)
    if distributed_port is not None:
        kwargs["distributed_port"] = distributed_port
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)  # the config travels as a dict; DeepSpeed refuses both at once
        args.deepspeed_config = None
    cfg = seqpipe_config.parse(ds_config)
    _attention_dropout_notice(model)
    if not cfg.enabled:
        result = deepspeed.initialize(args=args, **kwargs)
        if isinstance(result[0], deepspeed.PipelineEngine):
            dropout.attach(result[0])  # layout-invariant hidden-dropout masks for stock pipelining too
        return result
    plan, schedule = resolve(ds_config, model)
    from .engine import SeqPipeEngine
    stock = deepspeed.PipelineEngine
    # deepspeed.initialize builds the pipeline engine from this module attribute; swapping it for
    # the duration of the call reuses all of DeepSpeed's set-up (config, dist, optimizer, ZeRO).
    deepspeed.PipelineEngine = functools.partial(SeqPipeEngine, slice_plan=plan, schedule=schedule)
    try:
        return deepspeed.initialize(args=args, **kwargs)
    finally:
        deepspeed.PipelineEngine = stock


ATTENTION_DROPOUT_NOTICE = (
    "seqpipe_ds: --attention-dropout {p} (GPTConfig.attention_dropout): attention-dropout masks come from torch's "
    "generator, so they are NOT those of the unsliced step, nor the same across layouts: the log-sum-exp attention "
    "kernels that slices merge take no dropout mask, so with dropout a sliced attention runs one SDPA over the "
    "concatenated K/V instead. Hidden dropout is exact and layout-invariant (seqpipe_ds.model.dropout); set "
    "--attention-dropout 0 for the same training math as stock DeepSpeed and one process.")


def _attention_dropout_notice(model) -> None:
    """One notice at start (global rank 0) when attention dropout is on: its masks are the one part
    of the training math that differs between a sliced and an unsliced step."""
    gpt = getattr(model, "gpt_config", None)
    if gpt is None or not gpt.attention_dropout:
        return
    import torch.distributed as torch_dist
    if not torch_dist.is_initialized() or torch_dist.get_rank() == 0:
        warnings.warn(ATTENTION_DROPOUT_NOTICE.format(p=gpt.attention_dropout), stacklevel=3)
