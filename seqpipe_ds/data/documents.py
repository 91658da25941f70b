"""Packed documents in a training sequence: Megatron-LM's ``--reset-attention-mask``,
``--reset-position-ids`` and ``--eod-mask-loss`` work from the end-of-document (EOD) tokens.

megatron-core's GPTDataset resets the position ids and masks the loss itself
(``_get_ltor_masks_and_position_ids``); the attention mask it would build is dense ([s, s] per
sample), so here documents travel instead as ``document_starts``: per token, the position of its
document's first token, a [b, s] integer tensor that slices along the sequence like the tokens.
"""
from typing import Optional

import numpy
import torch

DOCUMENT_FLAGS = ("reset_attention_mask", "reset_position_ids", "eod_mask_loss")


def document_starts(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[..., s] int64: for each token the position of the first token of its document. A document
    begins at 0 and after every EOD token (the EOD belongs to the document it ends), as Megatron's
    reset mask and positions have it."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device).expand(tokens.shape)
    begins = torch.zeros_like(positions)
    begins[..., 1:] = torch.where(tokens[..., :-1] == eod, positions[..., 1:], 0)
    return begins.cummax(dim=-1).values


def require_eod(tokenizer, args) -> None:
    """Raises ValueError when a document flag is set but the tokenizer has no end-of-document id."""
    flags = [f"--{name.replace('_', '-')}" for name in DOCUMENT_FLAGS if getattr(args, name, False)]
    if flags and getattr(tokenizer, "eod", None) is None:
        raise ValueError(f"{', '.join(flags)} need the tokenizer's end-of-document id to find the documents, but "
                         f"{type(tokenizer).__name__} has none")


def packed_stream(prefix: str, tokens: Optional[int] = None, seed: int = 0) -> numpy.ndarray:
    """The documents of a Megatron indexed dataset (``prefix``.bin/.idx) in a seeded random order,
    concatenated, as GPTDataset packs its samples (documents back to back in a shuffled order, each
    ending in its EOD when it was written with ``--append-eod``): the first ``tokens`` of that stream
    (all when None, or when the dataset holds fewer). Reading stops once enough documents are read, so a
    large dataset costs only the tokens asked for."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    order = numpy.random.default_rng(seed).permutation(len(dataset))
    parts, total = [], 0
    for index in order:
        if tokens is not None and total >= tokens:
            break
        parts.append(numpy.asarray(dataset[int(index)], dtype=numpy.int64))
        total += parts[-1].size
    stream = numpy.concatenate(parts) if parts else numpy.zeros(0, dtype=numpy.int64)
    return stream if tokens is None else stream[:tokens]


def eod_document_lengths(stream: numpy.ndarray, eod: int) -> numpy.ndarray:
    """The lengths of the EOD-terminated documents of a token stream, each EOD counted with the document
    it ends (as ``document_starts`` has it); tokens after the last EOD are no whole document and left out."""
    ends = numpy.flatnonzero(numpy.asarray(stream) == eod) + 1
    return numpy.diff(ends, prepend=0)
