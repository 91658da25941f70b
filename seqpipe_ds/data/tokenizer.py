"""Tokenizers: a byte-level default, GPT-2 BPE from local vocab.json/merges.txt, and any HuggingFace
tokenizer.json (Llama 3 and friends), the last two encoded by the HuggingFace ``tokenizers`` package.

All expose what megatron-core's GPTDataset reads from a tokenizer: ``eod``, ``pad``, ``vocab_size``
and ``unique_identifiers`` (hashed into the name of its cached sample indices), and ``tokenize`` /
``detokenize`` for seqpipe-data and the example. ``tokenizers`` is Rust and reads local files only:
no hub access and no ``transformers``, which megatron-core 0.16.1's own GPT-2 tokenizer would need
(it also loads the "gpt2" files from the hub and passes the vocab file where the merge file belongs).
"""
import hashlib
import json
import os
from collections import OrderedDict

BYTE_LEVEL = "ByteLevelTokenizer"
GPT2_BPE = "GPT2BPETokenizer"
HUGGINGFACE = "HuggingFaceTokenizer"
TOKENIZER_TYPES = (BYTE_LEVEL, GPT2_BPE, HUGGINGFACE)

GPT2_EOD = "<|endoftext|>"
# End-of-document tokens of common tokenizer.json files, for when no tokenizer_config.json beside
# it names its eos_token: GPT-2/GPT-NeoX/Qwen, Llama 3, Llama 2/Mistral, Gemma.
KNOWN_EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")

# GPTDataset masks the loss where a label equals ``pad`` and never pads itself when
# add_extra_token_to_sequence is on, so pad must match no real token; -1 is the value megatron-core
# itself falls back to for "no pad token".
NO_PAD = -1


def padded_vocab_size(vocab_size, tp, multiple=128):
    """Megatron's padding: the smallest size >= vocab_size divisible by multiple × tp, so that each
    tensor-parallel rank holds an equal, aligned slice of the embedding."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def _file_digest(*paths):
    """A hash of the files' contents: the embedded corpus's cache name and GPTDataset's index cache
    must change when a vocabulary is edited in place, not only when its path changes."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _require_files(tokenizer_type, **flags):
    missing = [f"--{name.replace('_', '-')}" for name, path in flags.items() if not path or not os.path.isfile(path)]
    if missing:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs existing files for {' and '.join(missing)}")


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

    def tokenize_batch(self, texts):
        return [self.tokenize(text) for text in texts]

    def detokenize(self, ids):
        # A byte window may cut a multi-byte character; replace it rather than fail on a sample.
        return bytes(i for i in ids if i != self.eod).decode("utf-8", errors="replace")


class _TokenizersModel:
    """What the two ``tokenizers``-backed types share: encoding, decoding, and the identifiers."""

    pad = NO_PAD

    def __init__(self, tokenizer, eod, files):
        self._tokenizer = tokenizer
        self.eod = eod
        # Megatron counts the added (special) tokens in the vocabulary, as len(tokenizer) does.
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), *files.items(), ("digest", _file_digest(*files.values()))])

    def tokenize(self, text):
        return self._tokenizer.encode(text).ids

    def tokenize_batch(self, texts):
        """One call into Rust per batch instead of per document: seqpipe-data's workers use it."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]

    def detokenize(self, ids):
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


class GPT2BPETokenizer(_TokenizersModel):
    """GPT-2's byte-level BPE from ``--vocab-file`` (vocab.json) and ``--merge-file`` (merges.txt).

    The same pipeline as GPT-2's own encoder and Megatron-LM's GPT2BPETokenizer: bytes mapped to
    printable characters, GPT-2's split regex, no prefix space, ``<|endoftext|>`` as the end of a
    document (a special token, as in HuggingFace's GPT-2 tokenizer).
    """

    def __init__(self, vocab_file, merge_file):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        _require_files(GPT2_BPE, vocab_file=vocab_file, merge_file=merge_file)
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        if GPT2_EOD not in vocab:
            raise ValueError(f"{vocab_file} is not a GPT-2 vocab.json: it has no {GPT2_EOD!r} token")
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as error:  # tokenizers raises its own Exception type for an unreadable file
            raise ValueError(f"{vocab_file} / {merge_file} are not a BPE vocabulary and merges: {error}") from None
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([AddedToken(GPT2_EOD, special=True)])
        super().__init__(tokenizer, vocab[GPT2_EOD], OrderedDict(vocab_file=vocab_file, merge_file=merge_file))




def _eos_token(tokenizer_model, tokenizer):
    """The end-of-document token: tokenizer_config.json's eos_token where one sits beside the
    tokenizer.json (what Megatron-LM's HuggingFaceTokenizer gets from AutoTokenizer), else the
    first known EOS token the vocabulary has."""
    config = os.path.join(os.path.dirname(os.path.abspath(tokenizer_model)), "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos is not None:
            if tokenizer.token_to_id(eos) is None:
                raise ValueError(f"{config} names eos_token {eos!r}, which {tokenizer_model} does not have")
            return eos
    for token in KNOWN_EOS_TOKENS:
        if tokenizer.token_to_id(token) is not None:
            return token
    raise ValueError(f"{tokenizer_model} has none of the end-of-document tokens {KNOWN_EOS_TOKENS}; put a "
                     "tokenizer_config.json with its \"eos_token\" beside it")


class HuggingFaceTokenizer(_TokenizersModel):
    """Any HuggingFace ``tokenizer.json`` (``--tokenizer-model``), encoded with its own post-processor,
    so a Llama 3 tokenizer puts ``<|begin_of_text|>`` first as Megatron-LM's HuggingFaceTokenizer
    does (it calls the tokenizer with add_special_tokens on)."""

    def __init__(self, tokenizer_model):
        from tokenizers import Tokenizer

        _require_files(HUGGINGFACE, tokenizer_model=tokenizer_model)
        try:
            tokenizer = Tokenizer.from_file(tokenizer_model)
        except Exception as error:  # tokenizers raises its own Exception type for a bad file
            raise ValueError(f"--tokenizer-model {tokenizer_model} is not a HuggingFace tokenizer.json: "
                             f"{error}") from None
        eod = tokenizer.token_to_id(_eos_token(tokenizer_model, tokenizer))
        super().__init__(tokenizer, eod, OrderedDict(tokenizer_model=tokenizer_model))


def build_tokenizer(tokenizer_type=BYTE_LEVEL, vocab_file=None, merge_file=None, tokenizer_model=None):
    """The tokenizer Megatron-LM's --tokenizer-type names; a missing or unreadable file is a
    ValueError naming the flag."""
    if tokenizer_type == BYTE_LEVEL:
        return ByteTokenizer()
    if tokenizer_type == GPT2_BPE:
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == HUGGINGFACE:
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; use one of {TOKENIZER_TYPES}")
