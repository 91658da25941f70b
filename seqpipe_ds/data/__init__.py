"""GPT pretraining data: tokenizers, raw text to indexed datasets (seqpipe-data), the embedded default
corpus, Megatron indexed datasets and DeepSpeed pipeline micro-batches."""
from seqpipe_ds.data.batches import pipeline_batch, pipeline_batches
from seqpipe_ds.data.corpus import corpus_documents, embedded_corpus_prefix
from seqpipe_ds.data.datasets import build_datasets
from seqpipe_ds.data.documents import (DOCUMENT_FLAGS, document_starts, eod_document_lengths, packed_stream,
                                       require_eod)
from seqpipe_ds.data.indexed import require_indexed_dataset, write_indexed_dataset
from seqpipe_ds.data.preprocess import PreprocessError, Progress, TokenizerSpec, output_prefixes, preprocess
from seqpipe_ds.data.tokenizer import (BYTE_LEVEL, GPT2_BPE, HUGGINGFACE, TOKENIZER_TYPES, ByteTokenizer,
                                       GPT2BPETokenizer, HuggingFaceTokenizer, build_tokenizer,
                                       padded_vocab_size)

__all__ = [
    "BYTE_LEVEL", "DOCUMENT_FLAGS", "GPT2_BPE", "HUGGINGFACE", "TOKENIZER_TYPES", "ByteTokenizer",
    "GPT2BPETokenizer", "HuggingFaceTokenizer", "PreprocessError", "Progress", "TokenizerSpec", "build_datasets",
    "build_tokenizer", "corpus_documents", "document_starts", "embedded_corpus_prefix", "eod_document_lengths",
    "output_prefixes", "packed_stream", "padded_vocab_size", "pipeline_batch", "pipeline_batches", "preprocess",
    "require_eod", "require_indexed_dataset", "write_indexed_dataset",
]
