"""Named model shapes, so that no one types 15 flags to try a known model.

A preset is the model part of a launch: the shape (layers, hidden size, heads, sequence length,
vocabulary) and the GPTConfig options. ``gpt_config`` turns one into a GPTConfig; the CLIs
(``--model-preset``) take it as the defaults of their model flags, which still override it.

Sources:
- TeraPipe's models (Li et al., ICML 2021): ``MODEL_CONFIGS`` in transformer_models.py of
  github.com/zhuohan123/terapipe, as (n_layers, hidden_size, sequence_length, num_attention_heads)
  with 4 * hidden FFN, GELU, LayerNorm, learned positions, tied output, and a vocabulary of
  51200 (``EMBEDDING_VOCAB_SIZE``). The 13B model at 4096/6144/8192 tokens is the paper's
  long-sequence experiment.
- Llama 2 (Touvron et al., 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", table 1,
  and the released params/config.json): RMSNorm eps 1e-5, SwiGLU, RoPE base 10000, no biases,
  untied output, vocabulary 32000, context 4096; FFN 11008 / 13824 / 28672; 70B uses 8 K/V groups.
- Llama 3 8B (Meta's released config.json): 8 K/V groups, FFN 14336, RoPE base 500000, vocabulary
  128256, context 8192.
"""
from typing import Dict

from .config import GPTConfig

_TERAPIPE_VOCAB = 51200
_LLAMA = dict(normalization="RMSNorm", layernorm_epsilon=1e-5, swiglu=True, position_embedding_type="rope",
              rotary_base=10000, add_bias_linear=False, untie_embeddings_and_output_weights=True)


def _terapipe(layers: int, hidden: int, seq: int, heads: int) -> Dict:
    return dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, seq_length=seq,
                vocab_size=_TERAPIPE_VOCAB)


def _llama(layers: int, hidden: int, heads: int, ffn: int, **overrides) -> Dict:
    return {**_LLAMA, "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "ffn_hidden_size": ffn, "seq_length": 4096, "vocab_size": 32000, **overrides}


PRESETS: Dict[str, Dict] = {
    "gpt3-1b": _terapipe(24, 2048, 2048, 2048 // 128),
    "gpt3-13b": _terapipe(40, 5120, 2048, 5120 // 128),
    "gpt3-44b": _terapipe(96, 6144, 2048, 6144 // 128),
    "gpt3-175b": _terapipe(96, 12288, 2048, 12288 // 128),
    "gpt3-13b-4096": _terapipe(40, 5120, 4096, 5120 // 128),
    "gpt3-13b-6144": _terapipe(40, 5120, 6144, 5120 // 128),
    "gpt3-13b-8192": _terapipe(40, 5120, 8192, 5120 // 128),
    "llama2-7b": _llama(32, 4096, 32, 11008),
    "llama2-13b": _llama(40, 5120, 40, 13824),
    "llama2-70b": _llama(80, 8192, 64, 28672, num_query_groups=8),
    "llama3-8b": _llama(32, 4096, 32, 14336, num_query_groups=8, rotary_base=500000, seq_length=8192,
                        vocab_size=128256),
}

# The shape: what the CLIs' model flags set. Everything else in a preset is a GPTConfig option.
SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size")


def preset(name: str) -> Dict:
    """The preset's fields (a copy); ValueError naming the known presets for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def options(name: str) -> Dict:
    """The preset's GPTConfig options beyond the shape."""
    return {k: v for k, v in preset(name).items() if k not in SHAPE}


def gpt_config(name: str, **overrides) -> GPTConfig:
    """The preset as a GPTConfig; positions for its sequence length. ``overrides`` are GPTConfig
    fields (e.g. a smaller num_layers, a TP-padded vocab_size) or ``seq_length``."""
    fields = {**preset(name), **overrides}
    seq = fields.pop("seq_length")
    fields.setdefault("max_position_embeddings", seq)
    return GPTConfig(**fields)


def fill_shape(args, fallback: Dict, fields=SHAPE) -> None:
    """Sets each of ``fields`` that the command line left unset (None) on ``args`` from
    ``args.model_preset`` if given, else from ``fallback`` (where it has the field)."""
    chosen = preset(args.model_preset) if args.model_preset else {}
    for name in fields:
        if getattr(args, name) is None:
            setattr(args, name, chosen.get(name, fallback.get(name)))
