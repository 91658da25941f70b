"""Megatron ``.bin``/``.idx`` indexed datasets: writing one from text, checking one is there."""
import os
import uuid

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path


def require_indexed_dataset(prefix):
    missing = [path for path in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"--data-path prefix {prefix!r} has no Megatron indexed dataset behind it: "
            f"missing {' and '.join(missing)}")


def write_indexed_dataset(documents, tokenizer, prefix):
    """Tokenizes each document, appending the end-of-document id as Megatron's preprocess_data
    does with --append-eod, into prefix.bin/.idx.

    Several processes may call this at once for the same prefix: each writes under its own
    temporary name and renames into place, the .idx last, so a reader that sees both files (the
    test IndexedDataset.exists makes) sees a complete pair.
    """
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    temp = f"{prefix}.{uuid.uuid4().hex}.tmp"
    builder = IndexedDatasetBuilder(get_bin_path(temp), dtype=DType.optimal_dtype(tokenizer.vocab_size))
    for text in documents:
        ids = tokenizer.tokenize(text) + [tokenizer.eod]
        builder.add_document(numpy.array(ids), [len(ids)])
    builder.finalize(get_idx_path(temp))
    os.replace(get_bin_path(temp), get_bin_path(prefix))
    os.replace(get_idx_path(temp), get_idx_path(prefix))
