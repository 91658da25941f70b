from .config import GPTConfig
from .gpt import gpt_layer_specs, gpt_pipeline
from .layers import EmbeddingPipe, FinalLayerNorm, GPTLoss, MLP, SelfAttention, TransformerLayer, lm_head

__all__ = ["GPTConfig", "gpt_layer_specs", "gpt_pipeline", "EmbeddingPipe", "FinalLayerNorm", "GPTLoss", "MLP",
           "SelfAttention", "TransformerLayer", "lm_head"]
