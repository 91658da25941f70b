"""Megatron-LM's GPT pretraining arguments (the subset seqpipe_ds implements), their validation, and
the DeepSpeed config and learning-rate schedule they imply.

Megatron names and defaults are kept so that an existing Megatron + DeepSpeed launch line carries
over; an argument we do not implement is rejected by name rather than silently ignored.
"""
import argparse
import json
import os

import deepspeed
from megatron.core.datasets.utils import get_blend_from_list
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from seqpipe_ds.data.documents import require_eod
from seqpipe_ds.data.indexed import require_indexed_dataset
from seqpipe_ds.data.tokenizer import BYTE_LEVEL, TOKENIZER_TYPES, build_tokenizer
from seqpipe_ds.model import GPTConfig
from seqpipe_ds.model.config import NORMALIZATIONS, POSITION_EMBEDDING_TYPES

LR_DECAY_STYLES = ("constant", "linear", "cosine")

_POSITIVE = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings",
             "micro_batch_size", "global_batch_size", "tensor_model_parallel_size",
             "pipeline_model_parallel_size", "train_iters", "log_interval", "eval_interval", "save_interval",
             "ffn_hidden_size", "num_query_groups", "rotary_base", "norm_epsilon", "init_method_std",
             "recompute_num_layers", "tensorboard_log_interval")


def build_parser():
    # allow_abbrev=False as in Megatron-LM: a prefix of one of our names must not pass for it.
    parser = argparse.ArgumentParser(description="GPT pretraining with seqpipe_ds", allow_abbrev=False)
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=int, required=True)
    model.add_argument("--hidden-size", type=int, required=True)
    model.add_argument("--num-attention-heads", type=int, required=True)
    model.add_argument("--seq-length", type=int, required=True)
    model.add_argument("--max-position-embeddings", type=int, default=None,
                       help="defaults to --seq-length")
    model.add_argument("--ffn-hidden-size", type=int, default=None,
                       help="defaults to 4 × --hidden-size, with --swiglu to 2/3 of that rounded down to a "
                            "multiple of 64")
    model.add_argument("--position-embedding-type", choices=POSITION_EMBEDDING_TYPES, default="learned_absolute")
    model.add_argument("--rotary-base", type=int, default=10000)
    model.add_argument("--rotary-percent", type=float, default=1.0)
    model.add_argument("--swiglu", action="store_true")
    model.add_argument("--normalization", choices=NORMALIZATIONS, default="LayerNorm")
    model.add_argument("--norm-epsilon", type=float, default=1e-5)
    model.add_argument("--group-query-attention", action="store_true")
    model.add_argument("--num-query-groups", type=int, default=1, help="K/V heads with --group-query-attention")
    model.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    model.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    model.add_argument("--attention-dropout", type=float, default=0.1)
    model.add_argument("--hidden-dropout", type=float, default=0.1)
    model.add_argument("--init-method-std", type=float, default=0.02)
    model.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                       help="recompute in the backward every transformer layer (full) or the attention core "
                            "(selective); with seqpipe the rerun replays the slice's KV cache")
    model.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                       help="with full: uniform (with --recompute-num-layers 1: each layer); block is not "
                            "implemented")
    model.add_argument("--recompute-num-layers", type=int, default=1)
    model.add_argument("--recompute-activations", action="store_true",
                       help="Megatron-LM's alias of --recompute-granularity selective")
    model.add_argument("--use-flash-attn", action="store_true",
                       help="attention already uses torch's flash kernel where CUDA has one for the dtype; a no-op "
                            "(with a notice) on CPU")

    batch = parser.add_argument_group("batch and parallelism")
    batch.add_argument("--micro-batch-size", type=int, required=True)
    batch.add_argument("--global-batch-size", type=int, default=None,
                       help="defaults to micro batch size × data-parallel size")
    batch.add_argument("--tensor-model-parallel-size", type=int, default=1)
    batch.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    batch.add_argument("--sequence-parallel", action="store_true",
                       help="Megatron's sequence parallelism inside the tensor-parallel group (needs TP > 1)")

    optim = parser.add_argument_group("optimizer and schedule")
    optim.add_argument("--lr", type=float, required=True)
    optim.add_argument("--min-lr", type=float, default=0.0)
    optim.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="linear")
    optim.add_argument("--lr-warmup-iters", type=int, default=0)
    optim.add_argument("--weight-decay", type=float, default=0.01)
    optim.add_argument("--clip-grad", type=float, default=1.0)
    optim.add_argument("--train-iters", type=int, required=True)
    optim.add_argument("--seed", type=int, default=1234)
    optim.add_argument("--bf16", action="store_true")
    optim.add_argument("--fp16", action="store_true", help="rejected: seqpipe_ds trains in fp32 or bf16")

    data = parser.add_argument_group("data")
    data.add_argument("--data-path", nargs="*", default=None,
                      help="Megatron .bin/.idx prefixes, each optionally preceded by a weight; "
                           "without it, the embedded corpus")
    data.add_argument("--split", default="969, 30, 1")
    data.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=BYTE_LEVEL)
    data.add_argument("--vocab-file", default=None)
    data.add_argument("--merge-file", default=None)
    data.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer: a local tokenizer.json")
    data.add_argument("--reset-attention-mask", action="store_true",
                      help="packed documents: attention stays within a document (documents end at the "
                           "tokenizer's end-of-document id); sliced attention skips other documents' blocks")
    data.add_argument("--reset-position-ids", action="store_true",
                      help="positions restart after each end-of-document token (learned embeddings and RoPE)")
    data.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")

    logging = parser.add_argument_group("checkpointing and logging")
    logging.add_argument("--save", default=None)
    logging.add_argument("--load", default=None)
    logging.add_argument("--save-interval", type=int, default=None)
    logging.add_argument("--no-save-rng", action="store_false", dest="save_rng",
                         help="do not save the random number generators' states in checkpoints")
    logging.add_argument("--no-load-rng", action="store_false", dest="load_rng",
                         help="do not restore them from --load: resume with the generators --seed starts")
    logging.add_argument("--log-interval", type=int, default=100)
    logging.add_argument("--eval-interval", type=int, default=1000)
    logging.add_argument("--eval-iters", type=int, default=100)
    logging.add_argument("--log-file", default=None, help="append one JSON object per logged iteration")
    logging.add_argument("--tensorboard-dir", default=None,
                         help="write TensorBoard scalars (Megatron-LM's names) to this directory")
    logging.add_argument("--tensorboard-log-interval", type=int, default=1,
                         help="write them every this many iterations")

    # The deepspeed launcher passes --local_rank=N; torch's launchers spell it --local-rank.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.add_config_arguments(parser)
    return parser


def _unsupported(unknown):
    names = [item.split("=", 1)[0] for item in unknown if item.startswith("-")]
    return ", ".join(names or unknown)


def validate_args(args, world_size):
    """Checks the arguments against each other and the launch, raising ValueError with one clear
    message, and fills in the derived values: world_size, data_parallel_size, and the defaults of
    --max-position-embeddings and --global-batch-size."""
    if args.fp16:
        raise ValueError("--fp16 is not supported: seqpipe_ds trains in fp32 (the default) or bf16 (--bf16)")
    for name in _POSITIVE:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.eval_iters < 0:
        raise ValueError(f"--eval-iters must not be negative, got {args.eval_iters}")
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"the launch has {world_size} processes, which tensor-parallel size "
            f"{args.tensor_model_parallel_size} × pipeline-parallel size {args.pipeline_model_parallel_size} "
            f"= {model_parallel} does not divide")
    args.world_size = world_size
    args.data_parallel_size = world_size // model_parallel
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size

    if args.num_attention_heads % args.tensor_model_parallel_size:
        raise ValueError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                         f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    if args.hidden_size % args.num_attention_heads:
        raise ValueError(f"--hidden-size {args.hidden_size} is not divisible by "
                         f"--num-attention-heads {args.num_attention_heads}")
    _validate_model_options(args)
    if args.seq_length > args.max_position_embeddings:
        raise ValueError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{args.max_position_embeddings}")
    samples_per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % samples_per_step:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} × data-parallel size {args.data_parallel_size} = {samples_per_step}")
    if not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"--min-lr {args.min_lr} must lie between 0 and --lr {args.lr}")
    if not 0 <= args.lr_warmup_iters < args.train_iters:
        raise ValueError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --train-iters {args.train_iters}")
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save (the checkpoint directory)")
    # Reads the tokenizer's files now, so a missing or unreadable one is one clear message on every rank.
    require_eod(build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model), args)
    if args.data_path:
        for prefix in get_blend_from_list(args.data_path)[0]:
            try:
                require_indexed_dataset(prefix)
            except FileNotFoundError as error:
                raise ValueError(str(error)) from None


def _validate_model_options(args):
    """The Llama-style options: fills --ffn-hidden-size's default as Megatron-LM does
    (megatron/training/arguments.py: with --swiglu, int(4h · 2/3 / 64) · 64, keeping the
    parameter count of the 4h GELU MLP) and checks what the tensor-parallel layers must split."""
    tp = args.tensor_model_parallel_size
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size
    if args.ffn_hidden_size % tp:
        raise ValueError(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by "
                         f"--tensor-model-parallel-size {tp}")
    if args.group_query_attention:
        if args.num_attention_heads % args.num_query_groups:
            raise ValueError(f"--num-query-groups {args.num_query_groups} does not divide "
                             f"--num-attention-heads {args.num_attention_heads}")
        if args.num_query_groups % tp:
            raise ValueError(f"--num-query-groups {args.num_query_groups} is not divisible by "
                             f"--tensor-model-parallel-size {tp} (each TP rank holds whole K/V groups)")
    if args.sequence_parallel:
        # Megatron-LM quietly turns it off at TP 1; here asking for it there is an error.
        if tp == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if args.seq_length % tp:
            raise ValueError(f"--sequence-parallel: --seq-length {args.seq_length} is not divisible by "
                             f"--tensor-model-parallel-size {tp}")
    _validate_recompute(args)
    for name in ("attention_dropout", "hidden_dropout"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(args, name)}")
    if not 0 < args.rotary_percent <= 1:
        raise ValueError(f"--rotary-percent must lie in (0, 1], got {args.rotary_percent}")


def _validate_recompute(args):
    """Megatron-LM's rules for the --recompute-* flags, and what we implement of them: selective,
    and full recomputation of each transformer layer on its own (uniform, 1 layer per chunk)."""
    if args.recompute_activations:
        args.recompute_granularity = "selective"  # as Megatron-LM's validate_args does
    if args.recompute_granularity == "full":
        if args.recompute_method is None:
            raise ValueError("--recompute-granularity full needs --recompute-method (uniform)")
        if args.recompute_method == "block":
            raise ValueError("--recompute-method block (recompute the first N layers of each stage) is not "
                             "implemented; use uniform")
        if args.recompute_num_layers != 1:
            raise ValueError(f"--recompute-num-layers {args.recompute_num_layers}: each transformer layer is "
                             "recomputed on its own; only 1 is implemented")
    elif args.recompute_method is not None:
        raise ValueError("--recompute-method needs --recompute-granularity full")


def gpt_config(args, vocab_size):
    """The GPTConfig the arguments describe (vocab_size: the tokenizer's, padded for TP)."""
    return GPTConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        vocab_size=vocab_size, max_position_embeddings=args.max_position_embeddings,
        ffn_hidden_size=args.ffn_hidden_size, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, layernorm_epsilon=args.norm_epsilon,
        init_method_std=args.init_method_std, normalization=args.normalization, swiglu=args.swiglu,
        add_bias_linear=args.add_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent, sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity, reset_attention_mask=args.reset_attention_mask,
        reset_position_ids=args.reset_position_ids)


def flash_attention_notice(args, device_type):
    """What --use-flash-attn means on this device, to print once; None when there is nothing to say.

    seqpipe's attention (seqpipe_ds.attention.kernels) always calls torch's SDPA kernels, and on
    CUDA picks FlashAttention-2 for fp16/bf16 by itself; fp32 has no flash kernel there (the
    memory-efficient one runs), and CPU has torch's own flash-style CPU kernel."""
    if not args.use_flash_attn:
        return None
    if device_type != "cuda":
        return (f"--use-flash-attn: no FlashAttention on {device_type}; a no-op, torch's {device_type} "
                "attention kernel runs")
    if not args.bf16:
        return "--use-flash-attn: FlashAttention needs fp16/bf16; in fp32 the memory-efficient SDPA kernel runs"
    return None


def parse_args(argv=None, world_size=None):
    """Parses and validates; any problem exits with one usage message, as argparse does.
    world_size defaults to the launcher's WORLD_SIZE."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unsupported arguments: {_unsupported(unknown)} (see --help for the supported ones)")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        validate_args(args, world_size)
    except ValueError as error:
        parser.error(str(error))
    return args


def num_samples(args):
    """(train, valid, test) sample counts as Megatron-LM requests them for iteration-based
    training; no test samples, since the training loop evaluates on the validation split only."""
    train = args.train_iters * args.global_batch_size
    evaluations = args.train_iters // args.eval_interval + 1
    return train, evaluations * args.eval_iters * args.global_batch_size, 0


def _merge(base, overrides, path=""):
    merged = dict(base)
    for key, value in overrides.items():
        name = f"{path}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, f"{name}.")
        elif key in merged and merged[key] != value:
            raise ValueError(f"--deepspeed_config sets {name} = {merged[key]!r}, but the command line "
                             f"implies {value!r}: drop it from the JSON or change the argument")
        else:
            merged[key] = value
    return merged


def deepspeed_config(args):
    """The DeepSpeed config: --deepspeed_config's JSON, if given, with what the Megatron arguments
    decide laid over it. A JSON value that contradicts them is an error, as are fp16 and a DeepSpeed
    scheduler (the learning-rate schedule is Megatron's, see lr_scheduler).

    Pass it as deepspeed.initialize(config=...) with args.deepspeed_config unset: DeepSpeed refuses
    a config given both ways.
    """
    base = {}
    if args.deepspeed_config:
        with open(args.deepspeed_config, encoding="utf-8") as f:
            base = json.load(f)
    if base.get("fp16", {}).get("enabled"):
        raise ValueError(f"{args.deepspeed_config} enables fp16: seqpipe_ds trains in fp32 or bf16 (--bf16)")
    if "scheduler" in base:
        raise ValueError(f"{args.deepspeed_config} has a scheduler: the schedule comes from --lr, --min-lr, "
                         "--lr-decay-style and --lr-warmup-iters; remove it from the JSON")
    decided = {}
    if "seqpipe" in base:  # the sequence length is --seq-length's to say, as the batch sizes are
        decided["seqpipe"] = {"seq_length": args.seq_length}
    if args.sequence_parallel:
        # DeepSpeed's pipeline sends each TP rank 1/TP of a stage's output and all-gathers it on the
        # next stage, which assumes every TP rank holds the same activation; under sequence
        # parallelism each holds its own tokens, so every rank sends its whole tensor.
        decided["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return _merge(base, {
        **decided,
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_clipping": args.clip_grad,
        "bf16": {"enabled": args.bf16},
        # DeepSpeed's "Adam" is decoupled-weight-decay AdamW, as Megatron's adam; torch_adam avoids
        # compiling the fused_adam op at run time.
        "optimizer": {"type": "Adam",
                      "params": {"lr": args.lr, "weight_decay": args.weight_decay, "torch_adam": True}},
    })


def lr_scheduler(args):
    """Megatron's learning-rate schedule as deepspeed.initialize(lr_scheduler=...): a callable that
    DeepSpeed applies to its optimizer, returning megatron-core's own OptimizerParamScheduler.

    Megatron-LM counts this scheduler's steps in samples (warmup and decay lengths are iterations ×
    global batch size). DeepSpeed calls step() without arguments; it fails on the missing increment
    and DeepSpeed retries step(train_batch_size()) -- the path DeepSpeed keeps for Megatron -- so
    each optimizer step advances it by one global batch, as in Megatron-LM. The weight decay is
    held constant; a parameter group with "wd_mult": 0.0 (biases, norms) gets none.
    """
    samples_per_iteration = args.global_batch_size

    def build(optimizer):
        return OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=args.lr,
            min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters * samples_per_iteration,
            lr_decay_steps=args.train_iters * samples_per_iteration,
            lr_decay_style=args.lr_decay_style,
            start_wd=args.weight_decay,
            end_wd=args.weight_decay,
            wd_incr_steps=args.train_iters * samples_per_iteration,
            wd_incr_style="constant",
            # Megatron-LM's defaults: resuming with a different schedule is an error.
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=False,
        )

    return build
