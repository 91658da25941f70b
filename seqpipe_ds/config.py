"""The ``"seqpipe"`` section of the DeepSpeed config."""
from typing import List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class SeqPipeConfig(BaseModel):
    """Example: {"enabled": true, "schedule": "slice-1f1b", "seq_length": 1024, "seq_slices": [384, 256, 256, 128],
    "batch_slices": 1}. ``plan`` names a planner file (dp_results.json) that sets both slicings."""
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    schedule: str = "terapipe"
    seq_length: Optional[int] = Field(default=None, ge=1)
    seq_slices: Union[int, List[int], List[List[int]]] = 1
    batch_slices: Union[int, List[int]] = 1
    plan: Optional[str] = None
    plan_model: Optional[str] = None  # model name to match entries of TeraPipe-format plan files
    # true: fp32 clipping uses DeepSpeed's own norm, which under pipeline parallelism leaves parameters out
    # (deepspeedai/DeepSpeed#1839); for side-by-side comparisons with stock only (patches/clip_norm.py)
    stock_clip_norm: bool = False


def parse(ds_config: dict) -> SeqPipeConfig:
    """Reads and checks the section; ValueError with one readable message."""
    section = ds_config.get("seqpipe", {})
    try:
        cfg = SeqPipeConfig(**section)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f'invalid "seqpipe" config section: {problems}') from None
    if cfg.enabled:
        from .schedules import SCHEDULES  # the registry is the one list of names
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f'"seqpipe.schedule": unknown schedule {cfg.schedule!r}; available: '
                             f'{", ".join(SCHEDULES)}')
    if cfg.plan is not None and {"seq_slices", "batch_slices"} & cfg.model_fields_set:
        raise ValueError('"seqpipe": give either "plan" or explicit "seq_slices"/"batch_slices", not both')
    if cfg.enabled and cfg.seq_length is None:
        raise ValueError('"seqpipe.seq_length" is required when seqpipe is enabled (the training sequence length)')
    return cfg
