"""One gloo device (and so one network thread) for every process group of the process, on CPU.

WHY: torch gives each gloo process group a device of its own, and each device a thread
("gloo_tcp_loop") that wakes about 100 times a second even when the group is idle (measured:
51 groups, 9,946 voluntary context switches in 2 s). A pipeline process holds many groups:
megatron-core's ``initialize_model_parallel`` makes 20 on a 2-stage world, every DeepSpeed
``PipelineModule`` 6 more, and seqpipe-bench keeps one engine per variant alive (8 at batch 1, 69
threads). On a 2-core machine those wake-ups interrupt the stage that is computing: a fixed matmul loop
in each of two processes took 0.167 s with no extra groups, 0.190 s with 30 and 0.224 s with 100, and
with those 100 on one shared device 0.160-0.169 s (2-core AMD EPYC, medians of 5). gloo lets
contexts share a device (its pairs are told apart by sequence number), so every group made after this
patch uses the first one's.

The replacement is a subclass of ``ProcessGroupGloo`` put where ``torch.distributed.distributed_c10d``
constructs gloo groups; it builds the devices as torch's own constructor does (one per interface named
in ``GLOO_SOCKET_IFNAME``, else the default device, two worker threads per device) but only once. It is
applied only before the first process group exists, so every gloo group of the process is an instance of
it and torch's ``isinstance(..., ProcessGroupGloo)`` checks hold for all of them. CUDA machines keep
torch's behaviour (their gloo groups are few and idle).
"""
import os

import torch
import torch.distributed as dist

from ._common import is_marked, mark, warn_if_unverified

VERIFIED = ("2.13",)  # torch versions this was checked against
_devices = []


def shared_devices():
    """The gloo devices every group shares, made at the first group (torch's own choice of devices)."""
    if not _devices:
        from torch.distributed import ProcessGroupGloo
        interfaces = [i for i in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if i]
        _devices.extend([ProcessGroupGloo.create_device(interface=i) for i in interfaces]
                        or [ProcessGroupGloo.create_default_device()])
    return _devices


def _shared_device_class(base):
    @mark
    class SharedDeviceGloo(base):
        """A gloo process group on the process's shared devices."""

        def __init__(self, store, rank, size, timeout=dist.default_pg_timeout):
            options = base._Options()
            options._devices = shared_devices()
            options._threads = 2 * len(options._devices)
            options._timeout = timeout
            super().__init__(store, rank, size, options)

    SharedDeviceGloo.__name__ = SharedDeviceGloo.__qualname__ = base.__name__
    SharedDeviceGloo.__module__ = base.__module__
    return SharedDeviceGloo


def apply():
    """Install the shared-device class when CUDA and process groups are absent; True if it is in place."""
    if torch.cuda.is_available() or not dist.is_available():
        return False
    c10d = dist.distributed_c10d
    if is_marked(c10d.ProcessGroupGloo):
        return True
    if dist.is_initialized():  # groups of torch's own class exist: mixing the two would break isinstance
        return False
    warn_if_unverified("gloo_device", "torch", VERIFIED)
    c10d.ProcessGroupGloo = _shared_device_class(c10d.ProcessGroupGloo)
    return True
