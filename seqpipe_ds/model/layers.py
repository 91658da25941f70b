"""Megatron GPT (megatron-core local layer spec) as DeepSpeed pipeline layers, on megatron-core's
tensor-parallel layers. Activations are [batch, seq, hidden] so that slicing the sequence is a
slice of dim 1. Parameter names follow megatron-core's GPTModel, so weights map one to one."""
import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.utils import init_method_normal, scaled_init_method_normal
from torch import nn

from .. import attention
from ..protocol import sliceable
from .config import GPTConfig


@sliceable
class EmbeddingPipe(nn.Module):
    """Word + learned absolute position embeddings. Input: (tokens, position_ids), both [b, s]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.max_positions = config.max_position_embeddings
        init = init_method_normal(config.init_method_std)
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, init_method=init, config=config.parallel_config())
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                dtype=config.params_dtype)
        init(self.position_embeddings.weight)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, inputs):
        tokens, position_ids = inputs
        if position_ids.shape[-1] > self.max_positions:
            raise ValueError(f"sequence of {position_ids.shape[-1]} tokens is longer than the "
                             f"{self.max_positions} position embeddings (max_position_embeddings)")
        return self.dropout(self.word_embeddings(tokens) + self.position_embeddings(position_ids))


@sliceable
def lm_head(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """Output layer tied to the word embedding; returns this TP rank's share of the vocabulary."""
    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    return F.linear(hidden, embedding.word_embeddings.weight)


class SelfAttention(nn.Module):
    """Causal self-attention over a slice of positions [offset, offset + len).

    Inside ``KVCache.slice`` the slice also attends to the K/V that earlier slices cached (query
    at absolute position p sees keys 0..p): ``attention.attend`` does it block by block.
    """

    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        pc = config.parallel_config()
        self.heads = config.num_attention_heads // parallel_state.get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        # QKV rows interleaved per head ([q, k, v] of head 0, then head 1, ...) as in megatron-core,
        # so a column-parallel shard holds whole heads.
        self.linear_qkv = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, 3 * config.hidden_size, config=pc, init_method=init_method_normal(
                config.init_method_std), bias=True, gather_output=False)
        self.linear_proj = tensor_parallel.RowParallelLinear(
            config.hidden_size, config.hidden_size, config=pc, bias=True, input_is_parallel=True,
            skip_bias_add=False,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers))

    def forward(self, x):
        b, s, _ = x.shape
        qkv, _ = self.linear_qkv(x)
        q, k, v = qkv.view(b, s, self.heads, 3 * self.head_dim).transpose(1, 2).split(self.head_dim, dim=-1)
        out = attention.attend(q, k, v, attention.current(), self.layer_number,
                               self.dropout if self.training else 0.0)  # (B, nh, s, hd)
        out, _ = self.linear_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
        return out


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        pc = config.parallel_config()
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, config.ffn_size, config=pc, init_method=init_method_normal(config.init_method_std),
            bias=True, gather_output=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            config.ffn_size, config.hidden_size, config=pc, bias=True, input_is_parallel=True, skip_bias_add=False,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers))

    def forward(self, x):
        h, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(F.gelu(h))
        return out


@sliceable
class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + mlp(LN(x)). Works on any sequence slice."""

    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                            dtype=config.params_dtype)
        self.self_attention = SelfAttention(config, layer_number)
        self.pre_mlp_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                              dtype=config.params_dtype)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x):
        x = x + self.dropout(self.self_attention(self.input_layernorm(x)))
        return x + self.dropout(self.mlp(self.pre_mlp_layernorm(x)))


@sliceable
class FinalLayerNorm(nn.LayerNorm):
    def __init__(self, config: GPTConfig):
        super().__init__(config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)


class GPTLoss:
    """Mean cross entropy over the unmasked tokens, on vocab-parallel logits.

    Labels are (labels [b, s], loss_mask [b, s]). A sliced run passes the normalizer of the whole
    micro-batch, so that the per-slice losses add up to the unsliced loss exactly.
    """

    def __call__(self, logits, labels, normalizer=None):
        labels, loss_mask = labels
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
        if normalizer is None:
            normalizer = self.normalizer((labels, loss_mask))
        return (losses * loss_mask).sum() / normalizer

    @staticmethod
    def normalizer(labels):
        return labels[1].sum()
