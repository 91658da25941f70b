"""Train/valid/test GPTDatasets through megatron-core's BlendedMegatronDatasetBuilder."""
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split, get_blend_from_list

from seqpipe_ds.data.indexed import require_indexed_dataset


def _documents_per_split(config, num_documents):
    # The same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
    counts = []
    for bookends in config.split_matrix:
        if bookends is None:
            counts.append(0)
        else:
            begin, end = (int(round(b * float(num_documents))) for b in bookends)
            counts.append(end - begin)
    return counts


def _check_split_sizes(config, num_samples):
    """Fails where megatron-core would not: a split that gets no documents but is asked for
    samples makes GPTDataset count epochs forever looking for tokens that never come."""
    for prefix in config.blend[0]:
        num_documents = len(IndexedDataset(prefix))
        for split, docs, samples in zip(Split, _documents_per_split(config, num_documents), num_samples):
            if samples and docs == 0:
                raise ValueError(
                    f"--split {config.split!r} gives the {split.name} split no documents of {prefix!r} "
                    f"({num_documents} documents in all), yet {samples} {split.name} samples were "
                    "requested: change --split, or request no samples from that split")


def build_datasets(data_prefix, tokenizer, seq_length, split, num_samples, seed, cache_dir=None,
                   reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False):
    """Returns [train, valid, test] GPTDatasets; a split asked for 0 samples is None.

    data_prefix: a .bin/.idx prefix, or Megatron's --data-path list (prefixes, optionally each
    preceded by a weight). num_samples: (train, valid, test) sample counts. cache_dir: where the
    shuffled sample indices are cached (megatron-core's default is beside the data). Must be called
    on every rank when torch.distributed is initialized: the builder synchronizes with barriers.
    The three flags are Megatron-LM's (``data.documents``): the dataset resets the positions and
    masks the loss itself; the attention's documents come with the batch (``pipeline_batch``).
    """
    blend = get_blend_from_list([data_prefix] if isinstance(data_prefix, str) else list(data_prefix))
    for prefix in blend[0]:
        require_indexed_dataset(prefix)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        # The model builds its own causal (or document) mask; a [1, s, s] mask per sample would only cost memory.
        create_attention_mask=False,
    )
    _check_split_sizes(config, num_samples)
    # Drop unrequested splits from the matrix rather than zeroing them in the split string: the
    # string is normalized, so zeroing one weight would move the other splits' document ranges.
    # (A zero-sample split with no documents would also spin, see _check_split_sizes.)
    config.split_matrix = [bookends if samples else None
                           for bookends, samples in zip(config.split_matrix, num_samples)]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    return builder.build()
