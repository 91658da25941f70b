"""Megatron GPT (megatron-core local layer spec) as DeepSpeed pipeline layers, on megatron-core's
tensor-parallel layers. Inputs are [batch, seq] so that slicing the sequence is a slice of dim 1;
activations between layers are (B, T, h), or under sequence parallelism megatron-core's (T / TP, B, h)
(each TP rank holds a contiguous 1/TP of the slice's tokens). Parameter names follow megatron-core's
GPTModel, so weights map one to one."""
import contextlib
import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.utils import init_method_normal, scaled_init_method_normal
from torch import nn

from .. import attention
from ..protocol import sliceable, splits_backward
from . import dropout, wgrad
from .config import GPTConfig


@splits_backward  # its weights' gradients are all B: an embedding's backward is a scatter-add, no GEMM
@sliceable
class EmbeddingPipe(nn.Module):
    """Word embeddings, plus learned absolute position embeddings unless the positions are rotary
    (RoPE rotates Q/K inside attention instead). Input: (tokens, position_ids), both [b, s]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.max_positions = config.max_position_embeddings
        self.sequence_parallel = config.sequence_parallel
        self.documents = config.documents
        init = init_method_normal(config.init_method_std)
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, init_method=init, config=config.parallel_config())
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                    dtype=config.params_dtype)
            init(self.position_embeddings.weight)
        self.dropout = dropout.HiddenDropout(config.hidden_dropout, dropout.stream_id(None, 0),
                                             config.sequence_parallel)

    def forward(self, inputs):
        """(tokens, position_ids) -> hidden; with packed documents (tokens, position_ids, starts) ->
        (hidden, starts), the starts passed on to every later layer and stage."""
        tokens, position_ids, *starts = inputs
        if len(starts) != self.documents:
            raise ValueError("packed documents (reset_attention_mask / reset_position_ids) need batches of "
                             "(tokens, position_ids, document_starts), other models (tokens, position_ids); got "
                             f"{len(inputs)} input tensors")
        if position_ids.shape[-1] > self.max_positions:
            raise ValueError(f"sequence of {position_ids.shape[-1]} tokens is longer than "
                             f"max_position_embeddings {self.max_positions}")
        hidden = self.word_embeddings(tokens)  # (B, T, h)
        if self.position_embeddings is not None:
            hidden = hidden + self.position_embeddings(position_ids)
        if self.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            if tokens.shape[1] % tp:
                raise ValueError(f"sequence parallelism: a slice of {tokens.shape[1]} tokens does not split over "
                                 f"{tp} TP ranks")
            # (T / TP, B, h): this rank's contiguous share of the tokens, dropped by their own positions
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden.transpose(0, 1).contiguous())
        return with_starts(self.dropout(hidden), *starts)


def with_starts(hidden: torch.Tensor, starts=None):
    """What a layer passes on: its hidden states, paired with the document starts where there are some."""
    return hidden if starts is None else (hidden, starts)


def split_starts(inputs):
    """A layer's input as (hidden, document starts or None)."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs, None)


@splits_backward
@sliceable
def lm_head(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """Output layer tied to the word embedding; returns this TP rank's share of the vocabulary, (B, T, V / TP).
    megatron-core's linear function, as its untied output layer, so that the head's large weight-gradient
    GEMM defers under ``wgrad.deferring`` like every other linear layer's."""
    return wgrad.linear(_all_tokens(hidden, embedding.sequence_parallel), embedding.word_embeddings.weight)


def _all_tokens(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The input of a vocabulary-parallel output layer: (B, T, h) of every token. Each TP rank's
    logits give a partial gradient of it, which the backward sums over the ranks (and under SP,
    where the tokens were gathered from the ranks' (T / TP, B, h), scatters back)."""
    if sequence_parallel:
        return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True) \
            .transpose(0, 1)
    return tensor_parallel.copy_to_tensor_model_parallel_region(hidden)


@splits_backward
@sliceable
class OutputLayer(nn.Module):
    """Untied output layer (``--untie-embeddings-and-output-weights``): megatron-core GPTModel's
    bias-free column-parallel ``output_layer``; returns this TP rank's share of the vocabulary."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        # Its input comes gathered and with the gradient reduction in place (_all_tokens, shared with
        # the tied head), so the layer itself neither gathers nor reduces; the logits come out (B, T, V / TP).
        self.output_layer = wgrad.install(tensor_parallel.ColumnParallelLinear(
            config.hidden_size, config.vocab_size, config=dataclasses.replace(config.parallel_config(),
                                                                              sequence_parallel=False),
            init_method=init_method_normal(config.init_method_std), bias=False, gather_output=False,
            disable_grad_reduce=True))

    def forward(self, hidden):
        logits, _ = self.output_layer(_all_tokens(hidden, self.sequence_parallel))  # (B, T, V / TP)
        return logits


def norm(config: GPTConfig) -> nn.Module:
    """The normalisation megatron-core's local spec builds: torch's LayerNorm or RMSNorm
    (megatron.core.transformer.torch_norm.WrappedTorchNorm)."""
    cls = nn.RMSNorm if config.normalization == "RMSNorm" else nn.LayerNorm
    return cls(config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)


def _sum_sequence_parallel_grads(module: nn.Module, norms, config: GPTConfig) -> None:
    """Under sequence parallelism a TP rank's norms, and the row-parallel biases added after the
    reduce-scatter, see only its 1/TP of the tokens, so their gradients are partial. megatron-core
    marks such parameters ``sequence_parallel`` (RowParallelLinear marks its bias) and sums their
    gradients over the TP group before the optimizer step (distributed/finalize_model_grads.py).
    Here the norms are marked too, and a hook sums each backward's contribution: one small
    all-reduce per parameter and slice, and the engine needs no extra step."""
    if not config.sequence_parallel:
        return
    for norm_module in norms:
        for param in norm_module.parameters():
            param.sequence_parallel = True
    for param in module.parameters():
        if getattr(param, "sequence_parallel", False):
            param.register_hook(_sum_over_tp_ranks)


def _sum_over_tp_ranks(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    return grad


class SelfAttention(nn.Module):
    """Causal self-attention over a slice of positions [offset, offset + len).

    Inside ``KVCache.slice`` the slice also attends to the K/V that earlier slices cached (query
    at absolute position p sees keys 0..p): ``attention.attend`` does it block by block.
    """

    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        pc = config.parallel_config()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads, self.groups = config.num_attention_heads // tp, config.query_groups // tp
        self.sequence_parallel = config.sequence_parallel
        self.recompute_core = config.recompute_granularity == "selective"
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        # QKV rows grouped per K/V head as in megatron-core (attention.py, get_query_key_value_tensors):
        # [q of the group's query heads, k, v] for group 0, then group 1, ...; with one query head per
        # group that is [q, k, v] per head. A column-parallel shard holds whole groups.
        self.linear_qkv = wgrad.install(tensor_parallel.ColumnParallelLinear(
            config.hidden_size, (config.num_attention_heads + 2 * config.query_groups) * self.head_dim, config=pc,
            init_method=init_method_normal(config.init_method_std), bias=config.add_bias_linear, gather_output=False))
        self.rotary, self.rotary_config = None, None
        self.reset_attention_mask, self.reset_position_ids = config.reset_attention_mask, config.reset_position_ids
        if config.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(self.head_dim, config.rotary_percent, rotary_base=config.rotary_base,
                                          use_cpu_initialization=True)
            self.rotary_config = config.transformer_config(tp)
        self.linear_proj = wgrad.install(tensor_parallel.RowParallelLinear(
            config.hidden_size, config.hidden_size, config=pc, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=False,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers)))

    def forward(self, x, starts=None):
        """``starts`` [B, s]: each token's document start (packed documents), else None."""
        q, k, v = self._project(x)
        b, _, s, _ = q.shape
        cache = attention.current()
        offset = cache.offset if cache is not None else 0
        if self.rotary is not None:
            positions = None
            if self.reset_position_ids:  # the position within the document
                positions = torch.arange(offset, offset + s, device=starts.device) - starts
            q, k = self._rotate(q, k, offset, positions)
        core = functools.partial(self._core, dropout=self.dropout if self.training else 0.0,
                                 starts=starts if self.reset_attention_mask else None)
        # (B, nh, s, hd); selective recomputation keeps only q, k, v for the core's backward
        out = recomputed(core, q, k, v) if self.recompute_core and torch.is_grad_enabled() else core(q, k, v)
        if self.sequence_parallel:  # linear_proj reduce-scatters (T, B, ...) to this rank's (T / TP, B, h)
            out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)
        else:
            out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        out, _ = self.linear_proj(out)
        return out

    def _core(self, q, k, v, dropout, starts):
        # The cache from the ContextVar, so that a recomputed core finds the slice it replays.
        return attention.attend(q, k, v, attention.current(), self.layer_number, dropout, starts)

    def _project(self, x):
        """(B, nh, s, hd) queries and (B, ng, s, hd) keys and values of this TP rank's heads."""
        qkv, _ = self.linear_qkv(x)  # (B, T, ...); under SP (T, B, ...): all tokens, gathered from the TP ranks
        if self.sequence_parallel:
            qkv = qkv.transpose(0, 1)
        b, s, _ = qkv.shape
        per_group = self.heads // self.groups
        qkv = qkv.view(b, s, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        return q.reshape(b, s, self.heads, self.head_dim).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _rotate(self, q, k, offset: int, positions=None):
        """RoPE at the absolute positions [offset, offset + s) of the slice's tokens, or at
        ``positions`` [B, s] (reset per document), with megatron-core's frequencies and rotation. K
        is rotated before the cache keeps it, so a cached key carries its own position, as in the
        unsliced sequence."""
        if positions is None:
            freqs = self.rotary(q.shape[2], offset=offset)[:, 0, 0]  # (s, rot_dim): megatron's (s, 1, 1, rot_dim)
        else:
            freqs = self.rotary(int(positions.max()) + 1)[:, 0, 0][positions].unsqueeze(1)  # (B, 1, s, rot_dim)
        return (apply_rotary_pos_emb(q, freqs, self.rotary_config),   # (B, nh, s, hd)
                apply_rotary_pos_emb(k, freqs, self.rotary_config))   # (B, ng, s, hd)


@sliceable
def recomputed(function, *inputs):
    """``function(*inputs)`` without keeping its activations: megatron-core's checkpoint saves the
    inputs and runs it again in the backward with the first run's RNG states. Inside a sequence
    slice the rerun re-enters that slice of the KV cache (``KVCache.replay``), which reads the
    earlier slices' K/V and records nothing; set here, in the rerun itself, it holds on whichever
    thread autograd runs the rerun, where the ContextVar the forward set is not visible."""
    cache, key = attention.current(), dropout.current()
    replay = cache.replayer() if cache is not None else contextlib.nullcontext

    def run(*args):
        if not torch.is_grad_enabled():  # the first run, under no_grad, inside the running slice
            return function(*args)
        with replay(), dropout.samples(key):  # the rerun's hidden dropout draws the first run's masks
            return function(*args)
    return tensor_parallel.checkpoint(run, False, *inputs)


class MLP(nn.Module):
    """GELU MLP, or SwiGLU (silu(gate) * up) with megatron-core's gated layout of linear_fc1."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        pc = config.parallel_config()
        self.swiglu = config.swiglu
        # SwiGLU doubles fc1's rows; every TP rank holds [gate; up] of its share of the FFN. With
        # stride 2 the CPU initialisation cuts the full [gate; up] weight that way, so the model is
        # the same for any TP size, as megatron-core's MLP does (transformer/mlp.py, fc1_stride).
        self.linear_fc1 = wgrad.install(tensor_parallel.ColumnParallelLinear(
            config.hidden_size, 2 * config.ffn_size if self.swiglu else config.ffn_size, config=pc,
            init_method=init_method_normal(config.init_method_std), bias=config.add_bias_linear,
            gather_output=False, stride=2 if self.swiglu else 1))
        self.linear_fc2 = wgrad.install(tensor_parallel.RowParallelLinear(
            config.ffn_size, config.hidden_size, config=pc, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=False, init_method=scaled_init_method_normal(config.init_method_std, config.num_layers)))

    def forward(self, x):
        h, _ = self.linear_fc1(x)  # (B, T, [2 *] ffn / TP)
        if self.swiglu:
            gate, up = torch.chunk(h, 2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        out, _ = self.linear_fc2(h)
        return out


@splits_backward  # its linear layers' W defers; attention, the norms and the biases are B
@sliceable
class TransformerLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Works on any sequence slice."""

    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = norm(config)
        self.self_attention = SelfAttention(config, layer_number)
        self.pre_mlp_layernorm = norm(config)
        self.mlp = MLP(config)
        self.attention_dropout = dropout.HiddenDropout(config.hidden_dropout, dropout.stream_id(layer_number, 0),
                                                       config.sequence_parallel)
        self.mlp_dropout = dropout.HiddenDropout(config.hidden_dropout, dropout.stream_id(layer_number, 1),
                                                 config.sequence_parallel)
        self.recompute = config.recompute_granularity == "full"
        _sum_sequence_parallel_grads(self, [self.input_layernorm, self.pre_mlp_layernorm], config)

    def forward(self, inputs):
        """hidden -> hidden, or with packed documents (hidden, starts) -> (hidden, starts)."""
        x, starts = split_starts(inputs)
        extra = () if starts is None else (starts,)
        if self.recompute and torch.is_grad_enabled():
            x = recomputed(self._forward, x, *extra)
        else:
            x = self._forward(x, *extra)
        return with_starts(x, starts)

    def _forward(self, x, starts=None):
        x = x + self.attention_dropout(self.self_attention(self.input_layernorm(x), starts))
        return x + self.mlp_dropout(self.mlp(self.pre_mlp_layernorm(x)))


# Two classes rather than one wrapper module keep the final norm's parameter names ("<n>.weight").
# Their input may carry document starts, which end here: the output layer takes hidden states only.
# A norm's gradients are B: elementwise, no GEMM.
@splits_backward
@sliceable
class FinalLayerNorm(nn.LayerNorm):
    def __init__(self, config: GPTConfig):
        super().__init__(config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)
        _sum_sequence_parallel_grads(self, [self], config)

    def forward(self, inputs):
        return super().forward(split_starts(inputs)[0])


@splits_backward
@sliceable
class FinalRMSNorm(nn.RMSNorm):
    def __init__(self, config: GPTConfig):
        super().__init__(config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)
        _sum_sequence_parallel_grads(self, [self], config)

    def forward(self, inputs):
        return super().forward(split_starts(inputs)[0])


FINAL_NORMS = {"LayerNorm": FinalLayerNorm, "RMSNorm": FinalRMSNorm}


class GPTLoss:
    """Mean cross entropy over the unmasked tokens, on vocab-parallel logits.

    Labels are (labels [b, s], loss_mask [b, s]). A sliced run passes the normalizer of the whole
    micro-batch, so that the per-slice losses add up to the unsliced loss exactly.
    """

    def __call__(self, logits, labels, normalizer=None):
        labels, loss_mask = labels
        # megatron-core computes the per-token losses in fp32 whatever the logits' dtype
        # (cross_entropy.py casts them), identically in every layout; their sum, whose order slicing
        # changes, is taken in at least fp32 (fp64 for a float64 model).
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
        losses = losses.to(attention.accumulation_dtype(logits.dtype))
        if normalizer is None:
            normalizer = self.normalizer((labels, loss_mask))
        return (losses * loss_mask).sum() / normalizer

    @staticmethod
    def normalizer(labels):
        return labels[1].sum()
