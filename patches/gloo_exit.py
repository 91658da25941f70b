"""Destroy the torch.distributed process groups at interpreter exit on CPU (gloo).

WHY: a gloo process group's worker thread ("pt_gloo_runloop") frees each finished collective itself, and
that drops its references to the Python tensors, which needs the GIL. If the main thread reaches interpreter
finalization first, CPython ends any thread that then asks for the GIL with pthread_exit; the forced unwind
runs into a C++ destructor and std::terminate() aborts the process after all the work is done:
"terminate called without an active exception" (exit -6, 1 or 250). Seen with a backtrace in gdb:
~AsyncAllreduceWork -> decref_pyobject -> take_gil -> PyThread_exit_thread. It is a race, frequent after
deepspeed.init_distributed on CPU, rare with bare torch. An atexit hook runs before finalization starts,
so destroying the groups there lets those threads finish and be joined.
"""
import atexit

import torch
import torch.distributed as dist

from ._common import warn_if_unverified

VERIFIED = ("2.13",)  # torch versions this was checked against
_registered = False


def destroy_process_groups():
    # Local teardown only (no barrier): a rank that exits on an error must not wait for its peers.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def apply():
    """Register the exit hook once when CUDA is absent; True if it is registered."""
    global _registered
    if torch.cuda.is_available():
        return False
    if not _registered:
        warn_if_unverified("gloo_exit", "torch", VERIFIED)
        atexit.register(destroy_process_groups)
        _registered = True
    return True
