"""Micro-batches in the form the DeepSpeed pipeline model takes:
``((tokens, position_ids), (labels, loss_mask))``, the first pair for the first stage and the
second for the loss on the last stage; with packed documents ``((tokens, position_ids,
document_starts), (labels, loss_mask))``."""
import torch

from seqpipe_ds.data.documents import document_starts


def pipeline_batch(samples, eod=None):
    """Stacks GPTDataset samples into one micro-batch: int64 [b, s] tokens, position_ids and labels,
    float32 [b, s] loss_mask; with ``eod`` (packed documents) also each token's document start."""
    def stack(key):
        return torch.stack([sample[key] for sample in samples])

    inputs = (stack("tokens"), stack("position_ids"))
    if eod is not None:
        inputs += (document_starts(inputs[0], eod),)
    return inputs, (stack("labels"), stack("loss_mask"))


def pipeline_batches(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples=0, eod=None):
    """Yields data-parallel rank ``dp_rank``'s micro-batches until the dataset runs out.

    The order is Megatron's pretraining sampler's: the dataset (already shuffled by its seed) is
    read front to back in steps of micro_batch_size × dp_size samples, and each rank takes its own
    contiguous slice of every step. So the data depends only on the seed and the data-parallel
    rank and size, never on tensor or pipeline parallelism, and the samples of a global batch are
    the same whatever the data-parallel size. consumed_samples resumes after a checkpoint
    (iteration × global batch size). ``eod``: see ``pipeline_batch``.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is outside a data-parallel group of {dp_size}")
    step = micro_batch_size * dp_size
    for start in range(consumed_samples, len(dataset) - step + 1, step):
        first = start + dp_rank * micro_batch_size
        yield pipeline_batch([dataset[i] for i in range(first, first + micro_batch_size)], eod)
