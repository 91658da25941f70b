"""The embedded default corpus (corpus/stdlib_docstrings.txt) and its tokenized, cached form."""
import hashlib
import json
import os

from megatron.core.datasets.indexed_dataset import IndexedDataset

from seqpipe_ds.data.indexed import write_indexed_dataset

CORPUS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "stdlib_docstrings.txt")
DOCUMENT_SEPARATOR = "\n<|endoftext|>\n"


def default_cache_dir():
    return os.environ.get("SEQPIPE_DATA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "seqpipe_ds"))


def _corpus_text():
    with open(CORPUS_FILE, encoding="utf-8") as f:
        return f.read()


def corpus_documents():
    return [doc.strip("\n") for doc in _corpus_text().split(DOCUMENT_SEPARATOR)]


def embedded_corpus_prefix(tokenizer, cache_dir=None):
    """The .bin/.idx prefix of the embedded corpus tokenized by ``tokenizer``, built on first use.

    The name carries a hash of the corpus and the tokenizer, so an edited corpus or another
    tokenizer never reuses a stale file. Safe to call from every rank at once.
    """
    key = hashlib.sha256(_corpus_text().encode("utf-8"))
    key.update(json.dumps(tokenizer.unique_identifiers).encode("utf-8"))
    prefix = os.path.join(cache_dir or default_cache_dir(), f"stdlib_docstrings-{key.hexdigest()[:16]}")
    if not IndexedDataset.exists(prefix):
        write_indexed_dataset(corpus_documents(), tokenizer, prefix)
    return prefix
