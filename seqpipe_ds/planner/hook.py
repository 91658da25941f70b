"""The planner hook: ``"seqpipe": {"plan": "dp_results.json"}`` sets the slicing (and the schedule,
when the entry names one) at engine start.

Every rank reads the same file and config and so picks the same entry (or raises the same
PlanFileError) before any communication. An entry was priced for one activation recomputation
(``recompute``); a model built with another (``gpt_config.recompute_granularity``, which
``gpt_pipeline`` attaches) would neither take the time nor the memory planned, so it is refused; so is
a plan made for packed documents (``entry.documents``) for a model without ``reset_attention_mask``,
and a causal plan for a model with it: the slices were priced for the other attention.
"""
from .plan_file import PlanFileError, find_plan
from .recompute import granularity, mode_of


def slices_from_plan(cfg, ds_config, model):
    """(batch_slices, input_slices, schedule) of the plan-file entry matching this run.

    ``cfg`` is the SeqPipeConfig, ``ds_config`` DeepSpeed's parsed config, ``model`` the PipelineModule.
    The entry's schedule is used unless the config names another one explicitly, which is an error:
    the slicing was planned for the entry's schedule.
    """
    grid = model.mpu()
    query = cfg.plan_model or getattr(model, "gpt_config", None)
    if query is None:
        raise ValueError(f'seqpipe: "plan" needs the model to match entries of {cfg.plan}: build it with '
                         'seqpipe_ds.model.gpt_pipeline or name it with "seqpipe.plan_model"')
    entry = find_plan(cfg.plan, model=query, micro_batch_size=ds_config.train_micro_batch_size_per_gpu,
                      tp=grid.get_slice_parallel_world_size(), pp=grid.get_pipe_parallel_world_size(),
                      dp=grid.get_data_parallel_world_size(), seq_length=cfg.seq_length,
                      global_batch_size=ds_config.train_batch_size)
    schedule = cfg.schedule
    if entry.schedule is not None:
        if "schedule" in cfg.model_fields_set and cfg.schedule != entry.schedule:
            raise PlanFileError(f'seqpipe: "schedule" is {cfg.schedule!r} but the plan in {cfg.plan} was made for '
                                f'{entry.schedule!r}; drop "schedule" from the config or solve for {cfg.schedule!r}')
        schedule = entry.schedule
    built = getattr(model, "gpt_config", None)
    if built is not None and mode_of(built.recompute_granularity) != entry.recompute:
        raise PlanFileError(f"seqpipe: the plan in {cfg.plan} was made for recompute {entry.recompute!r}, but the "
                            f"model is built with recompute_granularity={built.recompute_granularity!r}: build it with "
                            f"recompute_granularity={granularity(entry.recompute)!r} (Megatron's "
                            "--recompute-granularity) or solve for its own recomputation (seqpipe-plan solve "
                            f"--recompute {mode_of(built.recompute_granularity)})")
    if built is not None and built.reset_attention_mask != (entry.documents is not None):
        made, other, solve = (("packed documents", "without", "without --documents") if entry.documents is not None
                              else ("causal attention", "with", "--documents DATA"))
        raise PlanFileError(f"seqpipe: the plan in {cfg.plan} was made for {made}, but the model is built {other} "
                            f"reset_attention_mask (Megatron's --reset-attention-mask): solve for it (seqpipe-plan "
                            f"solve {solve})")
    return entry.batch_slices, entry.input_slices, schedule
