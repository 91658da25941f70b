"""Slice arithmetic: how a micro-batch is cut into batch slices x sequence slices."""
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch

Sizes = Union[int, Sequence[int]]


class SlicingError(ValueError):
    pass


@dataclass(frozen=True)
class SlicePlan:
    """``batch_slices[i]`` sequences in batch slice i, cut into ``seq_slices[i]`` token lengths."""
    batch_slices: Tuple[int, ...]
    seq_slices: Tuple[Tuple[int, ...], ...]

    @property
    def micro_batch_size(self) -> int:
        return sum(self.batch_slices)

    @property
    def seq_length(self) -> int:
        return sum(self.seq_slices[0])

    def units(self) -> List[Tuple[int, int]]:
        """(batch slice, sequence slice) pairs in forward order."""
        return [(b, s) for b, lengths in enumerate(self.seq_slices) for s in range(len(lengths))]

    def shape(self, unit: Tuple[int, int]) -> Tuple[int, int]:
        b, s = unit
        return self.batch_slices[b], self.seq_slices[b][s]

    def tokens(self, unit: Tuple[int, int]) -> int:
        b, s = unit
        return self.batch_slices[b] * self.seq_slices[b][s]

    def split(self, tensor: torch.Tensor) -> dict:
        """Cuts a [batch, seq, ...] tensor into {unit: view}."""
        out = {}
        for b, rows in enumerate(tensor.split(list(self.batch_slices), dim=0)):
            for s, piece in enumerate(rows.split(list(self.seq_slices[b]), dim=1)):
                out[(b, s)] = piece
        return out


def even_split(total: int, parts: int) -> List[int]:
    """``parts`` lengths differing by at most one, longer ones first."""
    base, extra = divmod(total, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def _sizes(spec: Sizes, total: int, what: str, unit: str) -> List[int]:
    if isinstance(spec, bool) or not isinstance(spec, (int, list, tuple)):
        raise SlicingError(f"{what} must be a count or a list of {unit}, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise SlicingError(f"{what} must be at least 1, got {spec}")
        if spec > total:
            raise SlicingError(f"{what}={spec} is more slices than the {total} {unit} available")
        return even_split(total, spec)
    sizes = list(spec)
    if not sizes or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in sizes):
        raise SlicingError(f"{what} {sizes} must be positive integers")
    if sum(sizes) != total:
        raise SlicingError(f"{what} {sizes} sum to {sum(sizes)}, not to the {total} {unit} available")
    return sizes


def make_plan(batch_slices: Sizes, seq_slices: Union[Sizes, Sequence[Sequence[int]]], micro_batch_size: int,
              seq_length: int) -> SlicePlan:
    """Validates a slicing against the micro-batch and sequence length; raises SlicingError."""
    batches = _sizes(batch_slices, micro_batch_size, "batch_slices", "sequences of the micro-batch")
    per_batch = isinstance(seq_slices, (list, tuple)) and seq_slices and isinstance(seq_slices[0], (list, tuple))
    if per_batch and len(seq_slices) != len(batches):
        raise SlicingError(f"seq_slices has {len(seq_slices)} lists for {len(batches)} batch slices")
    specs = list(seq_slices) if per_batch else [seq_slices] * len(batches)
    lengths = [tuple(_sizes(spec, seq_length, "seq_slices", "tokens of the sequence")) for spec in specs]
    return SlicePlan(tuple(batches), tuple(lengths))
