"""megatron-core's own GPTModel (local layer spec) built with the options of a GPTConfig, and its loss
as our GPTLoss computes it: the reference our model is compared with through seqpipe_ds.model.interop."""
import torch


def megatron_gpt(config, tp, seed):
    """GPTModel set up like ours: GPTConfig.transformer_config and the GPTModel arguments it implies."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    torch.manual_seed(seed)  # CPU initialisation draws from the default generator
    transformer = config.transformer_config(tp)
    return GPTModel(transformer, get_gpt_layer_local_spec(normalization=config.normalization),
                    vocab_size=config.vocab_size, max_sequence_length=config.max_position_embeddings,
                    position_embedding_type=config.position_embedding_type, rotary_base=config.rotary_base,
                    rotary_percent=config.rotary_percent,
                    share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights)


def megatron_loss(model, batch):
    """Masked token mean of GPTModel's per-token loss, as our GPTLoss computes it. A batch of packed
    documents (tokens, positions, document starts) gets Megatron's reset attention mask."""
    (tokens, positions, *starts), (labels, loss_mask) = batch
    s = tokens.shape[1]
    # True = masked. Passed explicitly: with attention_mask=None megatron-core's local attention
    # builds the causal mask with device="cuda" (transformer/utils.get_default_causal_mask), which
    # no CPU shim covers.
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    if starts:
        from seqpipe_ds.attention.documents import document_mask
        mask = ~document_mask(starts[0], 0, s)
    per_token = model(tokens, positions, mask, labels=labels)
    return (per_token * loss_mask).sum() / loss_mask.sum()
