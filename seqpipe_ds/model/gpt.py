"""The GPT as a DeepSpeed PipelineModule layer list: the baseline and the sliced run share it."""
import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import ProcessTopology
from megatron.core import parallel_state

from .config import GPTConfig
from .layers import FINAL_NORMS, EmbeddingPipe, GPTLoss, OutputLayer, TransformerLayer, lm_head, recomputed

EMBEDDING_KEY = "embed"


def gpt_layer_specs(config: GPTConfig):
    """Embedding, transformer layers, final norm, output layer. The output layer is the word
    embedding again (a tied layer, on both the first and the last stage) unless it is untied."""
    config.check_options()
    if config.untie_embeddings_and_output_weights:
        embedding, output = LayerSpec(EmbeddingPipe, config), LayerSpec(OutputLayer, config)
    else:
        embedding = TiedLayerSpec(EMBEDDING_KEY, EmbeddingPipe, config, tied_weight_attr="word_embeddings.weight")
        output = TiedLayerSpec(EMBEDDING_KEY, EmbeddingPipe, config, forward_fn=lm_head,
                               tied_weight_attr="word_embeddings.weight")
    return [
        embedding,
        *[LayerSpec(TransformerLayer, config, i) for i in range(config.num_layers)],
        LayerSpec(FINAL_NORMS[config.normalization], config),
        output,
    ]


def gpt_pipeline(config: GPTConfig, topology: ProcessTopology, seed: int = 1234,
                 activation_checkpoint_interval: int = 0) -> PipelineModule:
    """Builds this rank's stage. Layers are seeded by their index (``seed_layers``), so the
    weights do not depend on how many stages or TP ranks share the model.

    ``activation_checkpoint_interval`` > 0 recomputes chunks of that many pipeline layers in the
    backward (DeepSpeed's activation checkpointing); as in Megatron only transformer layers are
    recomputed, a chunk holding the embedding or the output layer is kept. The chunks are rerun by
    ``layers.recomputed``, which replays the slice's KV cache, so sliced runs may use it too."""
    module = PipelineModule(layers=gpt_layer_specs(config), loss_fn=GPTLoss(), topology=topology,
                            partition_method="type:TransformerLayer", seed_layers=True, base_seed=seed,
                            seed_fn=_seed_layer, activation_checkpoint_interval=activation_checkpoint_interval,
                            checkpointable_layers=[TransformerLayer.__name__], activation_checkpoint_func=recomputed)
    # Seeding by layer is for initialisation only. Left on, PipelineModule.forward re-seeds the
    # generator before every layer of every call (a torch.manual_seed each, milliseconds on CPU),
    # which with slicing would run once per slice.
    module.seed_layers = False
    module.gpt_config = config  # lets seqpipe_ds.initialize match plans and check positions
    module.dropout_seed = seed  # the hidden-dropout masks' seed (model/dropout.py)
    if config.sequence_parallel:  # the engine's receive buffers: megatron's (T / TP, B, h) between layers
        tp = parallel_state.get_tensor_model_parallel_world_size()
        module.activation_dims = lambda batch, tokens: (tokens // tp, batch)
    return module


def _seed_layer(seed) -> None:
    # DeepSpeed's default seeding passes numpy integers to random.seed, which Python 3.11 rejects;
    # only torch's generator draws our weights.
    torch.manual_seed(int(seed))
