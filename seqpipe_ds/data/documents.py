"""Packed documents in a training sequence: Megatron-LM's ``--reset-attention-mask``,
``--reset-position-ids`` and ``--eod-mask-loss`` work from the end-of-document (EOD) tokens.

megatron-core's GPTDataset resets the position ids and masks the loss itself
(``_get_ltor_masks_and_position_ids``); the attention mask it would build is dense ([s, s] per
sample), so here documents travel instead as ``document_starts``: per token, the position of its
document's first token, a [b, s] integer tensor that slices along the sequence like the tokens.
"""
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
