"""Process-start patches that let megatron-core and DeepSpeed run on CPU-only machines.

Call `apply_all()` once at process start, before `deepspeed.init_distributed`. Each patch checks whether it
is needed (no CUDA / CPU accelerator) and is a no-op otherwise; calling again changes nothing.
  megatron_cpu   megatron-core's torch.cuda RNG/device calls -> CPU equivalents (no CUDA only)
  deepspeed_shm  no JIT-built shm comm op at deepspeed.init_distributed (CPU accelerator only)
  gloo_exit      destroy process groups at exit, avoiding gloo's exit abort (no CUDA only)
"""
from . import deepspeed_shm, gloo_exit, megatron_cpu

PATCHES = {"megatron_cpu": megatron_cpu, "deepspeed_shm": deepspeed_shm, "gloo_exit": gloo_exit}

_applied = ()


def apply_all():
    """Apply every patch that this machine needs; return the names of those in place, as a tuple."""
    global _applied
    _applied = tuple(name for name, module in PATCHES.items() if module.apply())
    return _applied


def applied():
    """Names returned by the latest apply_all() call (empty before the first)."""
    return _applied
