"""Tokenizers: a byte-level default, and GPT-2 BPE vocabulary facts for preprocessed data.

Both expose what megatron-core's GPTDataset reads from a tokenizer: ``eod``, ``pad``,
``vocab_size`` and ``unique_identifiers`` (hashed into the name of its cached sample indices).
"""
import json
import os
from collections import OrderedDict

BYTE_LEVEL = "ByteLevelTokenizer"
GPT2_BPE = "GPT2BPETokenizer"
TOKENIZER_TYPES = (BYTE_LEVEL, GPT2_BPE)

# GPTDataset masks the loss where a label equals ``pad`` and never pads itself when
# add_extra_token_to_sequence is on, so pad must match no real token; -1 is the value megatron-core
# itself falls back to for "no pad token".
NO_PAD = -1


def padded_vocab_size(vocab_size, tp, multiple=128):
    """Megatron's padding: the smallest size >= vocab_size divisible by multiple × tp, so that each
    tensor-parallel rank holds an equal, aligned slice of the embedding."""
    step = multiple * tp
    return -(-vocab_size // step) * step


class ByteTokenizer:
    """UTF-8 bytes are token ids 0..255; id 256 ends a document."""

    vocab_size = 257
    eod = 256
    pad = NO_PAD

    @property
    def unique_identifiers(self):
        return OrderedDict([("class", type(self).__name__)])

    def tokenize(self, text):
        return list(text.encode("utf-8"))

    def detokenize(self, ids):
        # A byte window may cut a multi-byte character; replace it rather than fail on a sample.
        return bytes(i for i in ids if i != self.eod).decode("utf-8", errors="replace")


class GPT2Vocabulary:
    """GPT-2 BPE vocabulary size and end-of-document id, read from ``--vocab-file``.

    That is all training on data already preprocessed with GPT-2 BPE needs. Encoding is not
    offered: megatron-core 0.16.1's GPT2BPETokenizer (MegatronHFTokenizer) wraps HuggingFace
    ``transformers``, which this stack does not install, and loads the "gpt2" tokenizer files from
    the HuggingFace hub (in 0.16.1 it also passes the vocab file where the merge file belongs).
    """

    def __init__(self, vocab_file, merge_file):
        missing = [flag for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file))
                   if not path or not os.path.isfile(path)]
        if missing:
            raise ValueError(f"{GPT2_BPE} needs existing files for {' and '.join(missing)}")
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        if "<|endoftext|>" not in vocab:
            raise ValueError(f"{vocab_file} is not a GPT-2 vocab.json: it has no '<|endoftext|>' token")
        self.vocab_size = len(vocab)
        self.eod = vocab["<|endoftext|>"]
        self.pad = NO_PAD
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("vocab_file", vocab_file), ("merge_file", merge_file)])

    def tokenize(self, text):
        raise NotImplementedError(
            f"{GPT2_BPE} cannot encode or decode text here: megatron-core's GPT-2 tokenizer needs the "
            "'transformers' package and the HuggingFace hub. Preprocess with Megatron-LM's "
            "tools/preprocess_data.py and pass the result as --data-path.")

    detokenize = tokenize


def build_tokenizer(tokenizer_type=BYTE_LEVEL, vocab_file=None, merge_file=None):
    if tokenizer_type == BYTE_LEVEL:
        return ByteTokenizer()
    if tokenizer_type == GPT2_BPE:
        return GPT2Vocabulary(vocab_file, merge_file)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; use one of {TOKENIZER_TYPES}")
