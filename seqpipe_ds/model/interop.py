"""Weights to and from megatron-core's GPTModel built with the local layer spec and the same options:
``GPTModel(config.transformer_config(tp), get_gpt_layer_local_spec(normalization=config.normalization),
position_embedding_type=..., rotary_base=..., rotary_percent=...,
share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights)``.

Our layers carry megatron's submodule names and tensor layouts (QKV rows grouped per K/V head,
[q of the group's heads, k, v] of group 0 first, as megatron's SelfAttention splits them; SwiGLU's
fc1 as [gate; up] per TP rank), and both models shard them
with the same megatron-core tensor-parallel layers: the state dict of TP rank r maps name for
name onto our TP rank r, only the prefixes differ. Both directions take and return the dict of a
whole model (megatron at pipeline size 1); ``load_stage`` picks a pipeline stage's share.
The returned dicts hold the given tensors, not copies. Sequence parallelism and recomputation
change no parameter, so a model with them converts as the same model without. (megatron-core's
local spec itself refuses sequence parallelism: its torch norms assert it off.)
"""
from typing import Dict, Set

from deepspeed.pipe import PipelineModule

from .config import GPTConfig
from .gpt import EMBEDDING_KEY

_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_NORMS = ("input_layernorm", "pre_mlp_layernorm")
_EXTRA_STATE = "_extra_state"


def key_map(config: GPTConfig) -> Dict[str, str]:
    """Megatron name -> our PipelineModule name, for every parameter of the model."""
    # RMSNorm has no bias; the linear layers have none with add_bias_linear=False. Rotary embeddings
    # have no parameters (megatron-core's inv_freq is not in its state dict).
    norm = ("weight",) if config.normalization == "RMSNorm" else ("weight", "bias")
    linear = ("weight", "bias") if config.add_bias_linear else ("weight",)
    embedding = "0" if config.untie_embeddings_and_output_weights else f"tied_modules.{EMBEDDING_KEY}"
    positions = ("position_embeddings",) if config.position_embedding_type == "learned_absolute" else ()
    names = {f"embedding.{e}.weight": f"{embedding}.{e}.weight" for e in ("word_embeddings", *positions)}
    for i in range(config.num_layers):
        # Pipeline layer 0 is the embedding, so transformer layer i is pipeline layer i + 1.
        names.update({f"decoder.layers.{i}.{m}.{p}": f"{i + 1}.{m}.{p}"
                      for modules, params in ((_NORMS, norm), (_LINEARS, linear)) for m in modules for p in params})
    names.update({f"decoder.final_layernorm.{p}": f"{config.num_layers + 1}.{p}" for p in norm})
    if config.untie_embeddings_and_output_weights:
        names["output_layer.weight"] = f"{config.num_layers + 2}.output_layer.weight"
    return names


def from_megatron(state_dict: Dict, config: GPTConfig) -> Dict:
    """A megatron GPTModel state dict (one TP rank's) with our PipelineModule's names."""
    return _rename(state_dict, key_map(config), "megatron GPTModel state dict")


def to_megatron(state_dict: Dict, config: GPTConfig) -> Dict:
    """Our whole-model state dict (one TP rank's) with megatron GPTModel's names; loads with strict=True."""
    return _rename(state_dict, {ours: theirs for theirs, ours in key_map(config).items()}, "seqpipe GPT state dict")


def load_stage(module: PipelineModule, state_dict: Dict) -> None:
    """Loads a pipeline stage (built by ``gpt_pipeline``) from a whole-model state dict in our names.

    Keys of other stages are skipped; keys of no stage, and keys of this stage that the dict lacks,
    raise ValueError (shape mismatches raise in ``load_state_dict``).
    """
    state_dict = _without_extra_state(state_dict)
    own = set(_without_extra_state(module.state_dict()))
    _check_keys("state dict for this pipeline stage", missing=own - set(state_dict),
                unexpected=set(state_dict) - set(key_map(module.gpt_config).values()))
    module.load_state_dict({k: state_dict[k] for k in own}, strict=True)


def _rename(state_dict: Dict, names: Dict[str, str], what: str) -> Dict:
    state_dict = _without_extra_state(state_dict)
    _check_keys(what, missing=set(names) - set(state_dict), unexpected=set(state_dict) - set(names))
    return {names[k]: v for k, v in state_dict.items()}


def _without_extra_state(state_dict: Dict) -> Dict:
    """Drops ``_extra_state`` entries. megatron-core's linear layers write None there (a placeholder
    for Transformer Engine compatibility) and a load hook makes the key optional, on both models.
    Actual content (e.g. Transformer Engine FP8 metadata) has no counterpart in our model."""
    out = {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] != _EXTRA_STATE:
            out[key] = value
        elif value is not None:
            raise ValueError(f"{key} holds extra state ({type(value).__name__}); only the empty extra state of "
                             "megatron-core's local layers can be converted")
    return out


def _check_keys(what: str, missing: Set[str], unexpected: Set[str]) -> None:
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {sorted(missing)}; unexpected keys {sorted(unexpected)}")
