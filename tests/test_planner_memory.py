"""The memory model against measurement: parameter counts per stage exactly, and the predicted peak
of bytes saved for backward (profile's bytes per token x the simulator's alive tokens) within 10%
of what ``SavedTensorMeter`` measures in real 2-stage seqpipe runs; plus its error messages."""
import pytest

import launcher
from seqpipe_ds.planner.memory_model import (MemoryModel, analytic_bytes_per_token, model_state_bytes, parse_bytes,
                                             stage_parameters)

MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=256, max_position_embeddings=128)
SEQ = 128
# (schedule, micro-batch size, gradient accumulation, batch slices, sequence slices)
RUNS = [("terapipe", 2, 1, 1, 4), ("terapipe", 2, 1, [1, 1], [[64, 32, 16, 16], [32, 32, 32, 32]]),
        ("slice-1f1b", 1, 4, 1, 4), ("slice-1f1b", 2, 2, 2, [48, 32, 32, 16])]


def measure(runs, modes=("none",)):
    """Per recomputation mode: per run (stage, measured peak saved bytes, parameters on this stage),
    and this stage's activation bytes as the profile meters them (``profile.activation_bytes``)."""
    import torch

    from seqpipe_ds import parallel
    from seqpipe_ds.model import GPTConfig
    from seqpipe_ds.planner.profile import ProfileSpec, activation_bytes, stage_modules
    from seqpipe_ds.planner.recompute import granularity

    topology = parallel.initialize(pipeline_parallel_size=2)
    spec = ProfileSpec(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=SEQ,
                       micro_batch_size=1)
    return {mode: (_measure_runs(runs, GPTConfig(**MODEL, recompute_granularity=granularity(mode)), topology),
                   activation_bytes(*stage_modules(spec, torch.device("cpu"), mode), SEQ)) for mode in modes}


def _measure_runs(runs, config, topology):
    import torch
    from deepspeed import comm as dist

    import seqpipe_ds
    from seqpipe_ds.memory import SavedTensorMeter
    from seqpipe_ds.model import gpt_pipeline

    results = []
    for schedule, mbs, gas, batch_slices, seq_slices in runs:
        model = gpt_pipeline(config, topology)
        engine, *_ = seqpipe_ds.initialize(model=model, model_parameters=model.parameters(), config={
            "train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": gas,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}}, "steps_per_print": 10 ** 9,
            "seqpipe": {"enabled": True, "schedule": schedule, "seq_length": SEQ, "batch_slices": batch_slices,
                        "seq_slices": seq_slices}})
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(gas):
            tokens = torch.randint(0, 256, (mbs, SEQ + 1), generator=g)
            batches.append(((tokens[:, :-1], torch.arange(SEQ).expand(mbs, SEQ)),
                            (tokens[:, 1:], torch.ones(mbs, SEQ))))
        meter = SavedTensorMeter(engine.module.parameters())
        with meter.hooks():
            engine.train_batch(data_iter=iter(batches))
        results.append((engine.stage_id, meter.peak, sum(p.numel() for p in engine.module.parameters())))
        dist.barrier()
    return results


@pytest.mark.timeout(300)
def test_predicted_saved_bytes_within_10_percent_and_exact_parameter_counts():
    from seqpipe_ds.schedules import lower, simulate
    from seqpipe_ds.slicing import make_plan

    ranks = [rank["none"] for rank in launcher.run(measure, 2, timeout=280, runs=RUNS)]
    per_token = ranks[0][1]["kept"]  # the profile's probe; both ranks measure the same modules
    assert per_token["last"] > per_token["middle"] > 0  # the LM head and loss keep the logits
    static = stage_parameters(MODEL, 2)
    for index, (schedule, mbs, gas, batch_slices, seq_slices) in enumerate(RUNS):
        plan = make_plan(batch_slices, seq_slices, mbs, SEQ)
        simulated = simulate(lower(schedule, 2, gas, plan), plan)
        memory = MemoryModel.for_stages(static, per_token)
        predicted = memory.activation_peaks(simulated.peak_alive_tokens)
        for stage, measured, parameters in (rank[0][index] for rank in ranks):
            assert parameters == static[stage]
            assert predicted[stage] == pytest.approx(measured, rel=0.10), (schedule, plan, stage)


def test_model_states_follow_zero_accounting():
    assert model_state_bytes(1000, "fp32") == 16000  # 4 + 4 + 8 bytes per parameter
    assert model_state_bytes(1000, "bf16") == 16000  # 2 + 2 + 12 (ZeRO paper's K = 12)
    assert model_state_bytes(1000, "bf16", zero_stage=1, dp=4) == 1000 * (2 + 2 + 3)
    assert model_state_bytes(1000, "fp32", zero_stage=1, dp=2) == 1000 * (4 + 4 + 6)
    # Tied embedding: one copy on a single stage, one per end stage when pipelined.
    one, two = stage_parameters(MODEL, 1), stage_parameters(MODEL, 2)
    assert sum(two) - sum(one) == (256 + 128) * 64  # words and positions
    tp = stage_parameters({**MODEL, "seq_length": SEQ}, 2, tp=2)
    assert tp[0] < two[0] and tp[1] < two[1]
    estimate = analytic_bytes_per_token({"hidden_size": 1024, "vocab_size": 50000, "num_layers": 4}, tp=1)
    assert estimate["last"] - estimate["middle"] == 4 * 50000


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="is not a memory size"):
        parse_bytes("40 parsecs")
    with pytest.raises(ValueError, match="must be positive"):
        parse_bytes("0GiB")
    assert parse_bytes("40GiB") == 40 * 2 ** 30 and parse_bytes("16 GB") == 16e9 and parse_bytes(512) == 512
    with pytest.raises(ValueError, match="ZeRO stage 2"):
        model_state_bytes(10, zero_stage=2)
    with pytest.raises(ValueError, match="cannot fill"):
        stage_parameters(MODEL, 8)
    memory = MemoryModel([2e9, 1e9], [1e3, 1e3])
    with pytest.raises(ValueError, match="below the parameters, gradients and optimizer states alone"):
        memory.check_limit(parse_bytes("1GiB"))
