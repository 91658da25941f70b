"""GPT hyper-parameters, with the defaults of megatron-core's GPT (local layer spec).

The options beyond GPT-2 carry the names of megatron-core's ``TransformerConfig`` / ``GPTModel``
arguments (``normalization``, ``add_bias_linear``, ``num_query_groups``, ``position_embedding_type``,
``rotary_base``, ``rotary_percent``, ``untie_embeddings_and_output_weights``), so a Llama-style
megatron configuration maps field for field; ``swiglu`` is Megatron-LM's flag that sets
``gated_linear_unit`` with a SiLU activation.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.transformer import TransformerConfig

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")


@dataclass(frozen=True)
class GPTConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    ffn_hidden_size: Optional[int] = None  # 4 * hidden_size, as in megatron-core's TransformerConfig
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    params_dtype: torch.dtype = torch.float32
    # CPU initialisation draws the full (unsharded) weight from the default generator, so the
    # model is identical for every TP size given the same seed; that is what makes TP runs
    # comparable with TP=1 bit for bit.
    use_cpu_initialization: bool = True
    normalization: str = "LayerNorm"
    swiglu: bool = False
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    num_query_groups: Optional[int] = None  # None: one K/V head per query head (multi-head attention)
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    # Megatron's sequence parallelism: between the tensor-parallel regions each TP rank holds 1/TP
    # of the tokens, and activations there are laid out (T / TP, B, h) as in megatron-core.
    sequence_parallel: bool = False
    # Activation recomputation, megatron-core's names: "full" recomputes every transformer layer in
    # the backward, "selective" the attention core only; None keeps all activations.
    recompute_granularity: Optional[str] = None
    # Packed documents (Megatron-LM's --reset-attention-mask / --reset-position-ids): the model then
    # takes (tokens, position_ids, document_starts) and passes (hidden, document_starts) between its
    # layers and stages. reset_attention_mask keeps attention within a document; reset_position_ids
    # rotates RoPE by the position within the document (learned embeddings take the batch's ids).
    reset_attention_mask: bool = False
    reset_position_ids: bool = False

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def documents(self) -> bool:
        """Whether the model takes each token's document start (``seqpipe_ds.data.document_starts``)."""
        return self.reset_attention_mask or self.reset_position_ids

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def validate(self, tensor_parallel_size: int) -> None:
        """Raises ValueError for option values we do not know and shapes the tensor-parallel layers
        cannot split."""
        problems = self._option_problems()
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                            f"num_attention_heads {self.num_attention_heads}")
        if self.num_query_groups is not None and (
                self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups):
            problems.append(f"num_query_groups {self.num_query_groups} does not divide "
                            f"num_attention_heads {self.num_attention_heads}")
        # Our K/V cache keeps whole groups per TP rank; megatron-core would replicate groups across
        # ranks when there are fewer groups than ranks, which we do not implement.
        if self.sequence_parallel and tensor_parallel_size == 1:
            problems.append("sequence_parallel needs a tensor-parallel size > 1 (it splits the sequence over the TP "
                            "ranks)")
        for name, value in (("num_attention_heads", self.num_attention_heads), ("num_query_groups", self.query_groups),
                            ("ffn size", self.ffn_size), ("vocab_size", self.vocab_size)):
            if value % tensor_parallel_size:
                problems.append(f"{name} {value} is not divisible by the tensor-parallel size "
                                f"{tensor_parallel_size}")
        _raise(problems)

    def slice_problems(self, lengths, tensor_parallel_size: int) -> list:
        """Reasons these sequence slice lengths cannot run: under sequence parallelism every slice is
        split evenly over the TP ranks."""
        if not self.sequence_parallel:
            return []
        bad = sorted({n for n in lengths if n % tensor_parallel_size})
        return [f"sequence parallelism splits every slice over the {tensor_parallel_size} TP ranks, but slice "
                f"length(s) {bad} are not divisible by {tensor_parallel_size}"] if bad else []

    def check_options(self) -> None:
        """Raises ValueError for option values we do not know (the part of ``validate`` that needs no TP size)."""
        _raise(self._option_problems())

    def _option_problems(self) -> list:
        problems = []
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization {self.normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            problems.append(f"position_embedding_type {self.position_embedding_type!r} is not one of "
                            f"{', '.join(POSITION_EMBEDDING_TYPES)}")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            problems.append(f"recompute_granularity {self.recompute_granularity!r} is not one of None, 'full', "
                            "'selective'")
        for field in ("hidden_dropout", "attention_dropout"):
            if not 0 <= getattr(self, field) < 1:
                problems.append(f"{field} {getattr(self, field)} is not in [0, 1)")
        if not 0 < self.rotary_percent <= 1:
            problems.append(f"rotary_percent {self.rotary_percent} is not in (0, 1]")
        return problems

    def parallel_config(self) -> ModelParallelConfig:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.validate(tp)
        return ModelParallelConfig(tensor_model_parallel_size=tp,
                                   use_cpu_initialization=self.use_cpu_initialization,
                                   params_dtype=self.params_dtype,
                                   gradient_accumulation_fusion=False, sequence_parallel=self.sequence_parallel)

    def transformer_config(self, tensor_parallel_size: int = 1) -> TransformerConfig:
        """megatron-core's TransformerConfig with these options, for its GPTModel (local layer spec,
        ``get_gpt_layer_local_spec(normalization=...)``) and for the megatron functions we call
        (RoPE). No fusions: they are what megatron-core runs on CPU, and the numerics we match."""
        return TransformerConfig(
            num_layers=self.num_layers, hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_size,
            num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
            hidden_dropout=self.hidden_dropout, attention_dropout=self.attention_dropout,
            layernorm_epsilon=self.layernorm_epsilon, init_method_std=self.init_method_std,
            params_dtype=self.params_dtype, normalization=self.normalization, gated_linear_unit=self.swiglu,
            activation_func=F.silu if self.swiglu else F.gelu, add_bias_linear=self.add_bias_linear,
            use_cpu_initialization=self.use_cpu_initialization, gradient_accumulation_fusion=False,
            apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
            sequence_parallel=self.sequence_parallel, tensor_model_parallel_size=tensor_parallel_size)


def _raise(problems: list) -> None:
    if problems:
        raise ValueError("invalid GPT configuration: " + "; ".join(problems))
