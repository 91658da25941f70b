"""Activation recomputation as a plan dimension: the modes' names, and how they map to the model's.

``"none"`` keeps every activation; ``"selective"`` reruns each layer's attention core in the
backward and ``"full"`` every transformer layer (``GPTConfig.recompute_granularity`` None,
"selective", "full"; ``seqpipe_ds.model.layers``). A plan has ONE mode for all its stages: the
model is built from one GPTConfig, so stages with different modes cannot be built today.

What a mode costs is measured by the profile (``profile.recompute_rows`` for the time,
``profile.saved_bytes_per_token`` for the memory) and charged by ``costs.CostModel.unit_times``
(the backward grows) and ``memory_model.MemoryModel`` (fewer bytes kept per token, a transient
during each unit's backward).
"""
from typing import Optional

RECOMPUTE_MODES = ("none", "selective", "full")


def check_mode(mode: str) -> str:
    """``mode`` if it is a recomputation mode, else ValueError naming the modes."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    return mode


def granularity(mode: str) -> Optional[str]:
    """The model's ``recompute_granularity`` of a plan's mode."""
    return None if check_mode(mode) == "none" else mode


def mode_of(recompute_granularity: Optional[str]) -> str:
    """The plan's mode of a model's ``recompute_granularity``."""
    return check_mode(recompute_granularity or "none")
