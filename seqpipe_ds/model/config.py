"""GPT hyper-parameters, with the defaults of megatron-core's GPT (local layer spec)."""
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import ModelParallelConfig, parallel_state


@dataclass(frozen=True)
class GPTConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    ffn_hidden_size: Optional[int] = None  # 4 * hidden_size, as in Megatron
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    params_dtype: torch.dtype = torch.float32
    # CPU initialisation draws the full (unsharded) weight from the default generator, so the
    # model is identical for every TP size given the same seed; that is what makes TP runs
    # comparable with TP=1 bit for bit.
    use_cpu_initialization: bool = True

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, tensor_parallel_size: int) -> None:
        """Raises ValueError for shapes the tensor-parallel layers cannot split."""
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                            f"num_attention_heads {self.num_attention_heads}")
        for name, value in (("num_attention_heads", self.num_attention_heads), ("ffn size", self.ffn_size),
                            ("vocab_size", self.vocab_size)):
            if value % tensor_parallel_size:
                problems.append(f"{name} {value} is not divisible by the tensor-parallel size "
                                f"{tensor_parallel_size}")
        if problems:
            raise ValueError("invalid GPT configuration: " + "; ".join(problems))

    def parallel_config(self) -> ModelParallelConfig:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.validate(tp)
        return ModelParallelConfig(tensor_model_parallel_size=tp,
                                   use_cpu_initialization=self.use_cpu_initialization,
                                   params_dtype=self.params_dtype,
                                   gradient_accumulation_fusion=False)
