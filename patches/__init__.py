"""Process-start patches: megatron-core and DeepSpeed on CPU-only machines, and one DeepSpeed correctness fix.

Call `apply_all()` once at process start, before `deepspeed.init_distributed`. Each patch checks whether it
is needed (no CUDA / CPU accelerator) and is a no-op otherwise; calling again changes nothing.
  megatron_cpu   megatron-core's torch.cuda RNG/device calls -> CPU equivalents (no CUDA only)
  deepspeed_shm  no JIT-built shm comm op at deepspeed.init_distributed (CPU accelerator only)
  gloo_exit      destroy process groups at exit, avoiding gloo's exit abort (no CUDA only)
  gloo_device    one gloo device, and so one network thread, shared by every process group (no CUDA only,
                 before the first group)
  cross_entropy_dtype  megatron-core's vocab-parallel cross entropy in at least fp32, not always fp32 (always)
  clip_norm      fp32 gradient clipping with the true global norm under pipeline parallelism (always;
                 "seqpipe": {"stock_clip_norm": true} keeps DeepSpeed's, deepspeedai/DeepSpeed#1839)
"""
from . import clip_norm, cross_entropy_dtype, deepspeed_shm, gloo_device, gloo_exit, megatron_cpu

PATCHES = {"megatron_cpu": megatron_cpu, "deepspeed_shm": deepspeed_shm, "gloo_exit": gloo_exit,
           "gloo_device": gloo_device, "clip_norm": clip_norm, "cross_entropy_dtype": cross_entropy_dtype}

_applied = ()


def apply_all():
    """Apply every patch that this machine needs; return the names of those in place, as a tuple."""
    global _applied
    _applied = tuple(name for name, module in PATCHES.items() if module.apply())
    return _applied


def applied():
    """Names returned by the latest apply_all() call (empty before the first)."""
    return _applied
