"""CPU stand-ins for the CUDA calls megatron-core makes unconditionally.

megatron-core assumes a GPU: `model_parallel_cuda_manual_seed` and the RNG tracker (`add`, `fork`, used by
every tensor-parallel dropout and by activation checkpointing) read and write the CUDA generator through
`torch.cuda.get_rng_state`, `torch.cuda.manual_seed` and `tensor_parallel.random._get/_set_cuda_rng_state`,
and buffers are allocated with `device=torch.cuda.current_device()` (`gather_output=True`, sequence-parallel
mappings, `GlobalMemoryBuffer.get_tensor`, `tensor_parallel/data.py`). On a CPU-only torch these raise
"Torch not compiled with CUDA enabled" (`torch.cuda.manual_seed` is silently dropped instead).

Here the CPU default generator plays the part of the CUDA generator and the CPU plays the current device.
The tracker's contract is kept: `fork()` saves the default generator's state, switches to the tracked state
and restores the saved state on exit, so the default generator is unchanged outside a fork region, as the
CUDA generator is on a GPU. Only applied when CUDA is absent; a GPU run never sees these functions.
"""
import importlib
import logging

import torch

from ._common import is_marked, mark, warn_if_unverified

VERIFIED = ("0.16",)  # megatron-core versions this was checked against
_TRACKER_MODULE = "megatron.core.tensor_parallel.random"


@mark
def current_device():
    # megatron uses torch.device("cpu") itself where it has a CPU path (e.g. utils.py timers).
    return torch.device("cpu")


@mark
def get_rng_state(device="cuda"):
    return torch.get_rng_state()


@mark
def manual_seed(seed):
    # Seed only the CPU generator: torch.manual_seed would also touch other accelerators' generators.
    torch.default_generator.manual_seed(int(seed))


@mark
def get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states have no CPU equivalent")
    return torch.get_rng_state()  # already a copy


@mark
def set_cuda_rng_state(new_state, device=-1, graph_safe=False):
    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states have no CPU equivalent")
    torch.set_rng_state(new_state)


def _drop_cpu_rng_warning(record):
    # fork() warns when the CPU generator moved inside a fork region; with these shims that is the
    # generator being forked, so the warning would fire on every dropout.
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def apply():
    """Install the shims when CUDA is absent and megatron-core is installed; True if they are in place."""
    if torch.cuda.is_available():
        return False
    try:
        # import_module returns the submodule itself (the package may bind the name `random` otherwise)
        tracker = importlib.import_module(_TRACKER_MODULE)
    except ImportError:
        return False
    if is_marked(tracker._get_cuda_rng_state):
        return True
    warn_if_unverified("megatron_cpu", "megatron-core", VERIFIED)
    torch.cuda.current_device = current_device
    torch.cuda.get_rng_state = get_rng_state
    torch.cuda.manual_seed = manual_seed
    tracker._get_cuda_rng_state = get_cuda_rng_state
    tracker._set_cuda_rng_state = set_cuda_rng_state
    logging.getLogger(_TRACKER_MODULE).addFilter(_drop_cpu_rng_warning)
    return True
