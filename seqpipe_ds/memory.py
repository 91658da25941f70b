"""Bytes held by tensors that autograd saved for backward: the activation memory a schedule controls.

Peak RSS on CPU mostly measures the allocator's caching; this counts what the graphs keep alive.
``with meter.hooks(): engine.train_batch(...)`` installs ``saved_tensors_hooks`` for everything
run inside (the backward's unpacking included). Each storage counts once however many saved
views share it (a slice's K/V saved by its own and by later slices' attention), and parameters
do not count. A storage stops counting when the last graph that saved it is freed.

A split backward (``model.wgrad``) keeps its W's operands, the linear layers' inputs and output
gradients, after autograd has freed the graph: ``held(*tensors)`` counts them in every active
meter the same way, until the handles it returns are dropped.
"""
import contextlib
from typing import Dict, Iterable, List

import torch


class SavedTensorMeter:

    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        self._excluded = {p.untyped_storage().data_ptr() for p in parameters}
        self._live: Dict[int, List[int]] = {}  # storage data_ptr -> [bytes, saved references]
        self.current = 0
        self.peak = 0

    @contextlib.contextmanager
    def hooks(self):
        _active.append(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield self
        finally:
            _active.remove(self)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._excluded or storage.nbytes() == 0:
            return tensor
        entry = self._live.get(ptr)
        if entry is None:
            entry = self._live[ptr] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        return _Saved(self, tensor, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[ptr]


class _Saved:
    """A saved tensor that tells its meter when autograd drops it."""
    __slots__ = ("meter", "tensor", "ptr")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor, ptr: int):
        self.meter, self.tensor, self.ptr = meter, tensor, ptr

    def __del__(self):
        self.meter._release(self.ptr)


_active: List[SavedTensorMeter] = []  # meters inside hooks(): what held() reports to (any thread)


def held(*tensors: torch.Tensor) -> list:
    """Counts ``tensors`` in every active meter as saved for a deferred backward; they count until
    the returned handles are dropped."""
    return [meter._pack(t) for meter in _active for t in tensors]


def _unpack(saved):
    return saved.tensor if isinstance(saved, _Saved) else saved
