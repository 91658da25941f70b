"""GPT pretraining laid out like Megatron-DeepSpeed's pretrain_gpt.py: a model_provider that returns
a PipelineModule, a get_batch_pipe batch function, then deepspeed.initialize and
engine.train_batch() in a loop, on DeepSpeed's stock pipeline engine.

It stands in for that script: patches/megatron_deepspeed_pretrain_gpt.diff turns it into the
seqpipe version (patches/README.md explains each hunk). Launch it as Megatron-DeepSpeed scripts are:

    deepspeed --num_accelerators 2 --num_nodes 1 pretrain_gpt_stock.py \
        --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \
        --micro-batch-size 2 --global-batch-size 8 --pipeline-model-parallel-size 2 \
        --lr 1e-3 --train-iters 4 --deepspeed --deepspeed_config ds_config.json

Arguments are Megatron-LM's, parsed by seqpipe_ds.megatron_args (Megatron's get_args()).
"""
import json

import deepspeed
import torch
from megatron.core import parallel_state
from torch.utils.data import DataLoader

from seqpipe_ds import megatron_args, parallel
from seqpipe_ds.data import build_datasets, build_tokenizer, embedded_corpus_prefix, padded_vocab_size
from seqpipe_ds.model import GPTConfig, gpt_pipeline


def print_rank_0(message):
    if torch.distributed.get_rank() == 0:
        print(message, flush=True)


def model_provider(args, topology, vocab_size):
    """Build this rank's pipeline stage."""
    print_rank_0("building GPT model ...")
    config = GPTConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                       num_attention_heads=args.num_attention_heads, vocab_size=vocab_size,
                       max_position_embeddings=args.max_position_embeddings)
    model = gpt_pipeline(config, topology, seed=args.seed)
    # Megatron-DeepSpeed hands the batch function to the engine through the model.
    model._megatron_batch_fn = get_batch_pipe
    return model


def get_batch_pipe(data):
    """One collated micro-batch -> (first stage's inputs, last stage's loss targets).

    Megatron-DeepSpeed broadcasts the batch from tensor-parallel rank 0 here; every rank of this
    script reads the same samples itself, so there is nothing to broadcast.
    """
    tokens = data["tokens"].long()
    position_ids = data["position_ids"].long()
    labels = data["labels"].long()
    loss_mask = data["loss_mask"].float()
    return (tokens, position_ids), (labels, loss_mask)


def train_valid_test_datasets_provider(args, tokenizer):
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    return build_datasets(args.data_path or embedded_corpus_prefix(tokenizer), tokenizer, args.seq_length,
                          args.split, megatron_args.num_samples(args), args.seed)


def build_data_iterator(dataset, args):
    """Megatron's pretraining sampler order: steps of micro batch × data-parallel size samples,
    each data-parallel rank taking its own contiguous micro-batch of every step."""
    mbs = args.micro_batch_size
    dp_rank = parallel_state.get_data_parallel_rank()
    step = mbs * parallel_state.get_data_parallel_world_size()
    batches = [range(start + dp_rank * mbs, start + (dp_rank + 1) * mbs)
               for start in range(0, len(dataset) - step + 1, step)]
    return iter(DataLoader(dataset, batch_sampler=batches))


def main():
    args = megatron_args.parse_args()
    topology = parallel.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model)
    train_ds, _, _ = train_valid_test_datasets_provider(args, tokenizer)

    model = model_provider(args, topology, padded_vocab_size(tokenizer.vocab_size, args.tensor_model_parallel_size))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=megatron_args.deepspeed_config(args),
        lr_scheduler=megatron_args.lr_scheduler(args))
    if isinstance(engine, deepspeed.PipelineEngine):
        engine.set_batch_fn(engine.module._megatron_batch_fn)
    print_rank_0(f"engine: {type(engine).__name__}")

    data_iterator = build_data_iterator(train_ds, args)
    log_file = None
    if args.log_file and torch.distributed.get_rank() == 0:
        log_file = open(args.log_file, "a", encoding="utf-8")
    for iteration in range(1, args.train_iters + 1):
        loss = engine.train_batch(data_iter=data_iterator).item()
        if iteration % args.log_interval == 0:
            print_rank_0(f" iteration {iteration:8d}/{args.train_iters:8d} | lm loss: {loss:.6E}")
        if log_file:
            log_file.write(json.dumps({"iteration": iteration, "loss": loss}) + "\n")
            log_file.flush()
    if log_file:
        log_file.close()
    # Every rank ends with a barrier and an orderly shutdown of the process groups: without it,
    # DeepSpeed's CPU backend can abort at interpreter exit and make the exit code flaky.
    parallel.destroy()


if __name__ == "__main__":
    main()
