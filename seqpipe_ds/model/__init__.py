from .config import GPTConfig
from .gpt import gpt_layer_specs, gpt_pipeline
from .layers import (MLP, EmbeddingPipe, FinalLayerNorm, FinalRMSNorm, GPTLoss, OutputLayer, SelfAttention,
                     TransformerLayer, lm_head)

__all__ = ["GPTConfig", "gpt_layer_specs", "gpt_pipeline", "EmbeddingPipe", "FinalLayerNorm", "FinalRMSNorm", "GPTLoss",
           "MLP", "OutputLayer", "SelfAttention", "TransformerLayer", "lm_head"]
