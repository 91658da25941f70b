"""Pretrains a GPT with seqpipe_ds from Megatron-LM's GPT arguments, e.g. on one host with 2 stages:

    deepspeed --num_accelerators 2 --num_nodes 1 examples/pretrain_gpt.py \
        --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256 \
        --micro-batch-size 2 --global-batch-size 8 --pipeline-model-parallel-size 2 \
        --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 10 --train-iters 100 \
        --log-file runs/pretrain.jsonl --deepspeed --deepspeed_config ds_config.json

A Llama-style model takes Megatron-LM's flags for it, e.g. adding

        --position-embedding-type rope --swiglu --normalization RMSNorm --group-query-attention \
        --num-query-groups 4 --untie-embeddings-and-output-weights --disable-bias-linear \
        --attention-dropout 0 --recompute-granularity full --recompute-method uniform

(and with --tensor-model-parallel-size 2, --sequence-parallel). Packed documents take Megatron-LM's
--reset-attention-mask --reset-position-ids --eod-mask-loss.

Without --data-path it trains on the embedded corpus (seqpipe_ds/data/corpus), encoded with the
--tokenizer-type given (GPT2BPETokenizer with --vocab-file/--merge-file, HuggingFaceTokenizer with
--tokenizer-model, as seqpipe-data encodes raw text). --tensorboard-dir adds TensorBoard scalars under
Megatron-LM's names (seqpipe_ds.tensorboard_log). Arguments are parsed and checked by
seqpipe_ds.megatron_args; see --help.
"""
import json
import resource
import sys
import time

import torch
from megatron.core import parallel_state
from tqdm import tqdm

import seqpipe_ds
from seqpipe_ds import checkpoint, megatron_args, parallel
from seqpipe_ds.data import build_datasets, build_tokenizer, embedded_corpus_prefix, padded_vocab_size, pipeline_batches
from seqpipe_ds.model import gpt_pipeline
from seqpipe_ds.tensorboard_log import TensorBoardLog


def flops_per_iteration(args, vocab_size):
    """Model FLOPs of one iteration by Megatron's count (Narayanan et al., 2021, "Efficient
    large-scale language model training on GPU clusters", section 5.1) without activation
    recomputation: 72·B·s·L·h²·(1 + s/(6h) + V/(12·L·h)), i.e. forward 24·B·s·L·h²(1 + s/(6h)) plus
    the logits' 2·B·s·h·V, times 3 for forward and backward. (The paper's 96·…·V/(16·L·h) counts
    the extra forward of full recomputation; recomputed work is not model FLOPs.)"""
    b, s, layers, h = args.global_batch_size, args.seq_length, args.num_layers, args.hidden_size
    return 72 * b * s * layers * h * h * (1 + s / (6 * h) + vocab_size / (12 * layers * h))


def peak_memory_bytes():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RunLog:
    """Every record as a JSON line to --log-file, as TensorBoard scalars to --tensorboard-dir, a
    progress bar, and every --log-interval iterations a console line; all on global rank 0 only
    (DeepSpeed hands every stage the loss; the peak memory is rank 0's, the fullest stage)."""

    def __init__(self, args, first_iteration):
        self.active = torch.distributed.get_rank() == 0
        self.log_interval = args.log_interval
        self.file = open(args.log_file, "a", encoding="utf-8") if self.active and args.log_file else None
        self.tensorboard = None
        if self.active and args.tensorboard_dir:
            self.tensorboard = TensorBoardLog(args.tensorboard_dir, args.tensorboard_log_interval,
                                              args.global_batch_size)
        self.bar = tqdm(total=args.train_iters, initial=first_iteration, disable=not self.active,
                        file=sys.stdout, dynamic_ncols=True)

    def record(self, entry, advance=0):
        if not self.active:
            return
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        if self.tensorboard:
            self.tensorboard.record(entry)
        if entry["iteration"] % self.log_interval == 0:
            self.bar.write(json.dumps(entry))
        self.bar.update(advance)
        self.bar.set_postfix({k: v for k, v in entry.items() if k in ("loss", "valid_loss", "lr", "tflops_per_gpu")})

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tensorboard:
            self.tensorboard.close()


def evaluate(engine, valid_batches, args):
    losses = [engine.eval_batch(valid_batches).item() for _ in range(args.eval_iters)]
    return sum(losses) / len(losses)


def main():
    args = megatron_args.parse_args()
    topology = parallel.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed)

    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model)
    vocab_size = padded_vocab_size(tokenizer.vocab_size, args.tensor_model_parallel_size)
    train_set, valid_set, _ = build_datasets(args.data_path or embedded_corpus_prefix(tokenizer), tokenizer,
                                             args.seq_length, args.split, megatron_args.num_samples(args), args.seed,
                                             reset_position_ids=args.reset_position_ids,
                                             reset_attention_mask=args.reset_attention_mask,
                                             eod_mask_loss=args.eod_mask_loss)

    config = megatron_args.gpt_config(args, vocab_size)
    model = gpt_pipeline(config, topology, seed=args.seed)
    eod = tokenizer.eod if config.documents else None  # batches then carry each token's document start
    ds_config = megatron_args.deepspeed_config(args)
    args.deepspeed_config = None  # the merged config goes in as config=; DeepSpeed refuses both
    engine, _, _, _ = seqpipe_ds.initialize(
        args=args, model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config, lr_scheduler=megatron_args.lr_scheduler(args))
    if torch.distributed.get_rank() == 0:
        # Which engine the "seqpipe" config section selected: stock PipelineEngine or SeqPipeEngine.
        print(f"engine: {type(engine).__name__}", flush=True)
        notice = megatron_args.flash_attention_notice(args, engine.device.type)
        if notice:
            print(notice, flush=True)
    if args.load:
        checkpoint.load(engine, args.load, load_rng=args.load_rng)
    iteration = engine.global_steps

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    train_batches = pipeline_batches(train_set, args.micro_batch_size, dp_rank, dp_size,
                                     consumed_samples=iteration * args.global_batch_size, eod=eod)
    # The validation split is sized for every evaluation in a row (megatron_args.num_samples), so one
    # iterator serves them all; a resumed run skips what earlier evaluations read, as Megatron does.
    valid_batches = None
    if valid_set:
        valid_batches = pipeline_batches(
            valid_set, args.micro_batch_size, dp_rank, dp_size,
            consumed_samples=iteration // args.eval_interval * args.eval_iters * args.global_batch_size, eod=eod)

    flops = flops_per_iteration(args, vocab_size)
    log = RunLog(args, iteration)
    while iteration < args.train_iters:
        start = time.perf_counter()
        loss = engine.train_batch(train_batches)
        elapsed = time.perf_counter() - start
        iteration += 1
        log.record({
            "iteration": iteration,
            "loss": loss.item(),
            "lr": engine.get_lr()[0],
            "seconds": elapsed,
            "tokens_per_s": args.global_batch_size * args.seq_length / elapsed,
            "tflops_per_gpu": flops / elapsed / args.world_size / 1e12,
            # Rank 0's peak: the first stage holds the most in-flight activations.
            "peak_memory_bytes": peak_memory_bytes(),
        }, advance=1)
        if valid_batches and (iteration % args.eval_interval == 0 or iteration == args.train_iters):
            log.record({"iteration": iteration, "valid_loss": evaluate(engine, valid_batches, args)})
        if args.save and ((args.save_interval and iteration % args.save_interval == 0)
                          or iteration == args.train_iters):
            checkpoint.save(engine, args.save, save_rng=args.save_rng)
    log.close()
    parallel.destroy()


if __name__ == "__main__":
    main()
