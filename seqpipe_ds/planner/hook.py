"""The planner hook: ``"seqpipe": {"plan": "dp_results.json"}`` sets the slicing at engine start.

Every rank reads the same file and config and so picks the same entry (or raises the same
PlanFileError) before any communication.
"""
from .plan_file import find_plan


def slices_from_plan(cfg, ds_config, model):
    """(batch_slices, input_slices) of the plan-file entry matching this run.

    ``cfg`` is the SeqPipeConfig, ``ds_config`` DeepSpeed's parsed config, ``model`` the PipelineModule.
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
    return entry.batch_slices, entry.input_slices
