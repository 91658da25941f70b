"""Skip DeepSpeed's shared-memory comm op on the CPU accelerator.

WHY: on CPU, `TorchBackend.__init__` (run by `deepspeed.init_distributed`) JIT-builds the `deepspeed_shm_comm`
op with g++ (~20 s the first time, and a failure where no compiler is installed) and maps shared-memory
segments for it. Nothing needs it: the op only serves `inference_all_reduce`, which falls back to
`torch.distributed.all_reduce` (gloo) when `shm_vector_kernel_level` is unset, and every other collective
goes through torch.distributed anyway. The "terminate called without an active exception" abort seen at the
end of 2-process CPU runs also happens without the op (see gloo_exit.py for its cause and fix).
"""
import importlib

from ._common import is_marked, mark, warn_if_unverified

VERIFIED = ("0.19",)  # deepspeed versions this was checked against
_COMM_MODULE = "deepspeed.comm.torch"


@mark
def no_shm_op():
    return None


def apply():
    """Replace build_shm_op when DeepSpeed's accelerator is the CPU one; True if the patch is in place.

    Call before deepspeed.init_distributed (the op is built there).
    """
    try:
        from deepspeed.accelerator import get_accelerator
        # Not `import deepspeed.comm.torch as m`: that binds the `torch` package that deepspeed.comm imports.
        comm = importlib.import_module(_COMM_MODULE)
    except ImportError:
        return False
    if get_accelerator().device_name() != "cpu":
        return False
    if is_marked(comm.build_shm_op):
        return True
    warn_if_unverified("deepspeed_shm", "deepspeed", VERIFIED)
    comm.build_shm_op = no_shm_op
    return True
