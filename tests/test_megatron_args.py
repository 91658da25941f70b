"""Megatron-LM argument parsing, validation, DeepSpeed config and learning-rate schedule."""
import json
import math

import pytest
import torch

import launcher
from seqpipe_ds import megatron_args
from seqpipe_ds.data import ByteTokenizer, write_indexed_dataset

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "10"]


def parse(*extra, world_size=1):
    return megatron_args.parse_args(BASE + list(extra), world_size=world_size)


def parse_error(capsys, *extra, world_size=1):
    with pytest.raises(SystemExit) as exit_info:
        parse(*extra, world_size=world_size)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.timeout(30)
def test_defaults_and_derived_values():
    args = parse("--local_rank=1", "--deepspeed", "--deepspeed_config", "ds.json", world_size=8)
    assert args.max_position_embeddings == 32
    assert args.data_parallel_size == 8 and args.global_batch_size == 16
    assert (args.lr_decay_style, args.min_lr, args.weight_decay, args.clip_grad) == ("linear", 0.0, 0.01, 1.0)
    assert (args.local_rank, args.deepspeed, args.deepspeed_config) == (1, True, "ds.json")
    assert args.tokenizer_type == "ByteLevelTokenizer" and args.data_path is None and not args.bf16
    args = parse("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", world_size=8)
    assert args.data_parallel_size == 2
    assert megatron_args.num_samples(parse("--eval-interval", "4", "--eval-iters", "3")) == (20, 18, 0)


@pytest.mark.timeout(30)
def test_unknown_arguments_are_rejected_by_name(capsys):
    err = parse_error(capsys, "--lr-decay-iters", "5", "--apply-query-key-layer-scaling", "--rampup-batch-size=1")
    assert "unsupported arguments: --lr-decay-iters, --apply-query-key-layer-scaling, --rampup-batch-size" in err
    # No abbreviations: a prefix of a supported name is unknown, not that name.
    assert "--save-int" in parse_error(capsys, "--save-int", "5")


@pytest.mark.parametrize("extra, world_size, message", [
    (["--global-batch-size", "5"], 1, "--global-batch-size 5 is not divisible by --micro-batch-size 2"),
    (["--global-batch-size", "6", "--tensor-model-parallel-size", "2"], 4,
     "× data-parallel size 2 = 4"),
    (["--pipeline-model-parallel-size", "3"], 4, "the launch has 4 processes"),
    (["--pipeline-model-parallel-size", "2"], 1, "pipeline-parallel size 2 = 2 does not divide"),
    (["--tensor-model-parallel-size", "8"], 8, "--num-attention-heads 4 is not divisible by --tensor-model"),
    (["--max-position-embeddings", "16"], 1, "--seq-length 32 exceeds --max-position-embeddings 16"),
    (["--fp16"], 1, "--fp16 is not supported: seqpipe_ds trains in fp32 (the default) or bf16"),
    (["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters 10 must be below --train-iters 10"),
    (["--min-lr", "1e-2"], 1, "--min-lr 0.01 must lie between 0 and --lr 0.001"),
    (["--micro-batch-size", "0"], 1, "--micro-batch-size must be positive"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--tokenizer-type", "GPT2BPETokenizer"], 1, "needs existing files for --vocab-file and --merge-file"),
    (["--position-embedding-type", "rope", "--max-position-embeddings", "16"], 1,
     "--seq-length 32 exceeds --max-position-embeddings 16"),
    (["--group-query-attention", "--num-query-groups", "3"], 1, "--num-query-groups 3 does not divide "
                                                                "--num-attention-heads 4"),
    (["--group-query-attention", "--tensor-model-parallel-size", "2"], 2,
     "--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2"),
    (["--ffn-hidden-size", "33", "--tensor-model-parallel-size", "2"], 2,
     "--ffn-hidden-size 33 is not divisible by --tensor-model-parallel-size 2"),
    (["--num-query-groups", "0"], 1, "--num-query-groups must be positive"),
    (["--attention-dropout", "1"], 1, "--attention-dropout must lie in [0, 1)"),
    (["--rotary-percent", "1.5"], 1, "--rotary-percent must lie in (0, 1]"),
    (["--normalization", "LayerNorm1P"], 1, "invalid choice: 'LayerNorm1P'"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--recompute-granularity", "full"], 1, "--recompute-granularity full needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"], 1,
     "--recompute-num-layers 2: each transformer layer is recomputed on its own; only 1 is implemented"),
    (["--recompute-granularity", "full", "--recompute-method", "block"], 1, "--recompute-method block"),
    (["--recompute-method", "uniform"], 1, "--recompute-method needs --recompute-granularity full"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "0"], 1,
     "--recompute-num-layers must be positive"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "4", "--seq-length", "30"], 4,
     "--sequence-parallel: --seq-length 30 is not divisible by --tensor-model-parallel-size 4"),
])
@pytest.mark.timeout(30)
def test_invalid_combinations_fail_with_one_message(capsys, extra, world_size, message):
    err = parse_error(capsys, *extra, world_size=world_size)
    assert message in err
    assert err.count("error:") == 1


LLAMA_FLAGS = ["--position-embedding-type", "rope", "--rotary-base", "500", "--swiglu", "--normalization", "RMSNorm",
               "--norm-epsilon", "1e-6", "--group-query-attention", "--num-query-groups", "2",
               "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--attention-dropout", "0",
               "--hidden-dropout", "0", "--init-method-std", "0.01", "--use-flash-attn"]


@pytest.mark.timeout(30)
def test_model_options_keep_megatron_defaults():
    from seqpipe_ds.model import GPTConfig
    args = parse()
    assert (args.position_embedding_type, args.rotary_base, args.rotary_percent, args.normalization,
            args.norm_epsilon) == ("learned_absolute", 10000, 1.0, "LayerNorm", 1e-5)
    assert (args.swiglu, args.group_query_attention, args.num_query_groups, args.add_bias_linear,
            args.untie_embeddings_and_output_weights, args.use_flash_attn) == (False, False, 1, True, False, False)
    assert (args.attention_dropout, args.hidden_dropout, args.init_method_std) == (0.1, 0.1, 0.02)
    assert not args.sequence_parallel
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == (None, None, 1)
    assert megatron_args.gpt_config(args, 256).recompute_granularity is None
    full = parse("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1")
    assert megatron_args.gpt_config(full, 256).recompute_granularity == "full"
    assert megatron_args.gpt_config(parse("--recompute-activations"), 256).recompute_granularity == "selective"
    assert args.ffn_hidden_size == 4 * 64
    # Without --group-query-attention, --num-query-groups is ignored, as in Megatron-LM.
    assert megatron_args.gpt_config(args, 256) == GPTConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, max_position_embeddings=32,
        ffn_hidden_size=256, hidden_dropout=0.1, attention_dropout=0.1)


@pytest.mark.timeout(30)
def test_llama_style_arguments_make_the_llama_style_model():
    from seqpipe_ds.model import GPTConfig
    config = megatron_args.gpt_config(parse(*LLAMA_FLAGS), 256)
    assert config == GPTConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, max_position_embeddings=32,
        ffn_hidden_size=128, hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-6, init_method_std=0.01,
        normalization="RMSNorm", swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True,
        num_query_groups=2, position_embedding_type="rope", rotary_base=500)
    # Megatron-LM's SwiGLU width: int(4h * 2/3 / 64) * 64 = 128 for h = 64; an explicit size wins.
    assert parse("--swiglu", "--ffn-hidden-size", "96").ffn_hidden_size == 96
    assert parse("--swiglu", "--hidden-size", "4096", "--num-attention-heads", "32").ffn_hidden_size == 10880
    sp = parse(*LLAMA_FLAGS, "--sequence-parallel", "--tensor-model-parallel-size", "2", world_size=2)
    assert megatron_args.gpt_config(sp, 256).sequence_parallel
    # TP ranks hold different tokens: DeepSpeed must send whole stage outputs, not 1/TP each.
    assert megatron_args.deepspeed_config(sp)["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    assert "pipeline" not in megatron_args.deepspeed_config(parse())


@pytest.mark.timeout(30)
def test_use_flash_attn_notice():
    args = parse("--use-flash-attn")
    assert megatron_args.flash_attention_notice(args, "cpu") == ("--use-flash-attn: no FlashAttention on cpu; a no-op, "
                                                                 "torch's cpu attention kernel runs")
    assert "memory-efficient SDPA kernel runs" in megatron_args.flash_attention_notice(args, "cuda")
    assert megatron_args.flash_attention_notice(parse("--use-flash-attn", "--bf16"), "cuda") is None
    assert megatron_args.flash_attention_notice(parse(), "cpu") is None


@pytest.mark.timeout(30)
def test_data_path_must_have_bin_and_idx(tmp_path, capsys):
    present = str(tmp_path / "present")
    write_indexed_dataset(["a document"], ByteTokenizer(), present)
    assert parse("--data-path", present).data_path == [present]
    err = parse_error(capsys, "--data-path", "0.3", present, "0.7", str(tmp_path / "absent"))
    assert f"--data-path prefix '{tmp_path / 'absent'}' has no Megatron indexed dataset" in err
    assert "absent.bin and" in err and "absent.idx" in err
    err = parse_error(capsys, "--data-path", present, "--tokenizer-type", "GPT2BPETokenizer")
    assert "GPT2BPETokenizer needs existing files for --vocab-file and --merge-file" in err


@pytest.mark.timeout(30)
def test_deepspeed_config_from_arguments():
    config = megatron_args.deepspeed_config(parse("--global-batch-size", "8", "--bf16", "--clip-grad", "0.5",
                                                  "--weight-decay", "0.1"))
    assert config == {
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5,
        "bf16": {"enabled": True},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
    }


@pytest.mark.timeout(30)
def test_deepspeed_config_file_is_merged_and_checked(tmp_path):
    path = tmp_path / "ds.json"

    def config_with(content):
        path.write_text(json.dumps(content))
        return megatron_args.deepspeed_config(parse("--deepspeed_config", str(path)))

    merged = config_with({"optimizer": {"params": {"betas": [0.9, 0.95]}}, "seqpipe": {"slices": 4},
                          "train_micro_batch_size_per_gpu": 2})
    assert merged["optimizer"]["params"] == {"betas": [0.9, 0.95], "lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}
    # The sequence length is --seq-length's, as the batch sizes are.
    assert merged["seqpipe"] == {"slices": 4, "seq_length": 32} and merged["train_batch_size"] == 2
    with pytest.raises(ValueError, match="sets seqpipe.seq_length = 64, but the command line implies 32"):
        config_with({"seqpipe": {"seq_length": 64}})
    with pytest.raises(ValueError, match="sets train_batch_size = 64, but the command line implies 2"):
        config_with({"train_batch_size": 64})
    with pytest.raises(ValueError, match="sets optimizer.params.lr"):
        config_with({"optimizer": {"params": {"lr": 0.1}}})
    with pytest.raises(ValueError, match="enables fp16"):
        config_with({"fp16": {"enabled": True}})
    with pytest.raises(ValueError, match="has a scheduler"):
        config_with({"scheduler": {"type": "WarmupLR"}})


def megatron_lr(step, lr, min_lr, warmup, total, style):
    """Megatron-LM's schedule written out independently, in iterations."""
    if warmup and step <= warmup:
        return lr * step / warmup
    if style == "constant":
        return lr
    ratio = (step - warmup) / (total - warmup)
    coeff = 1 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1)
    return min_lr + coeff * (lr - min_lr)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
@pytest.mark.timeout(30)
def test_lr_schedule_follows_megatron(style):
    args = parse("--global-batch-size", "4", "--min-lr", "1e-4", "--lr-warmup-iters", "3",
                 "--lr-decay-style", style, "--weight-decay", "0.1", world_size=2)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [param]}, {"params": [], "wd_mult": 0.0}], lr=1.0)
    scheduler = megatron_args.lr_scheduler(args)(optimizer)
    for step in range(1, args.train_iters + 1):
        scheduler.step(args.global_batch_size)
        expected = megatron_lr(step, 1e-3, 1e-4, 3, args.train_iters, style)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]


def deepspeed_lr_trace(argv):
    """Trains a linear layer through a real DeepSpeed engine configured from Megatron arguments."""
    import deepspeed

    from seqpipe_ds import parallel

    parallel.initialize()
    args = megatron_args.parse_args(argv, world_size=1)
    model = torch.nn.Linear(4, 1)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=megatron_args.deepspeed_config(args),
                                           lr_scheduler=megatron_args.lr_scheduler(args))
    trace = []
    for _ in range(args.train_iters):
        for _ in range(engine.gradient_accumulation_steps()):
            engine.backward(engine(torch.ones(args.micro_batch_size, 4)).sum())
            engine.step()
        trace.append(engine.get_lr()[0])
    return type(engine.basic_optimizer).__name__, engine.gradient_clipping(), trace


@pytest.mark.timeout(240)
def test_deepspeed_engine_steps_the_schedule_once_per_global_batch():
    argv = BASE + ["--global-batch-size", "4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
                   "--min-lr", "1e-4", "--clip-grad", "0.5"]
    optimizer, clipping, trace = launcher.run(deepspeed_lr_trace, 1, argv=argv)[0]
    assert (optimizer, clipping) == ("AdamW", 0.5)
    expected = [megatron_lr(step, 1e-3, 1e-4, 2, 10, "cosine") for step in range(1, 11)]
    assert trace == pytest.approx(expected, rel=1e-12)
