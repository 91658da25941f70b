"""Bad input gets one clear error, on every rank, before any communication can hang."""
import json

import pytest

import launcher
from seqpipe_ds import config as seqpipe_config
from seqpipe_ds.schedules import SCHEDULES
from seqpipe_ds.slicing import make_plan


@pytest.mark.parametrize("batch,seq,match", [
    (1, [8, 4, 3], "sum to 15, not to the 16"),
    (1, [8, 0, 8], "positive integers"),
    (1, [20, -4], "positive integers"),
    (1, 17, "more slices than the 16 tokens"),
    (1, 0, "at least 1"),
    ([1, 2], 4, "sum to 3, not to the 2 sequences"),
    (2, [[8, 8], [8, 4, 4], [16]], "3 lists for 2 batch slices"),
    (1, "8", "must be a count or a list"),
])
def test_bad_slicings(batch, seq, match):
    with pytest.raises(ValueError, match=match):
        make_plan(batch, seq, micro_batch_size=2, seq_length=16)


def test_good_slicings():
    plan = make_plan([1, 1], [[10, 6], [16]], micro_batch_size=2, seq_length=16)
    assert plan.units() == [(0, 0), (0, 1), (1, 0)]
    assert make_plan(1, 3, 2, 16).seq_slices == ((6, 5, 5),)


@pytest.mark.parametrize("section,match", [
    ({"enabled": True, "schedule": "1f1b", "seq_length": 16}, "unknown schedule '1f1b'"),
    ({"enabled": True}, "seq_length.*required"),
    ({"enabled": True, "seq_length": 16, "seq_slice": 4}, "seq_slice: Extra inputs"),
    ({"enabled": True, "seq_length": 16, "plan": "p.json", "seq_slices": 4}, "either \"plan\" or explicit"),
])
def test_bad_sections(section, match):
    with pytest.raises(ValueError, match=match):
        seqpipe_config.parse({"seqpipe": section})


def test_absent_section_means_disabled():
    assert not seqpipe_config.parse({}).enabled


BAD = {
    "slices not summing": ({"seq_slices": [8, 4]}, {}, "sum to 12, not to the 16 tokens"),
    "more slices than tokens": ({"seq_slices": 17}, {}, "17 is more slices than the 16 tokens"),
    "batch slices not summing": ({"batch_slices": [1, 2]}, {}, "sum to 3, not to the 2 sequences"),
    "unknown schedule": ({"schedule": "zigzag"}, {}, "unknown schedule 'zigzag'"),
    "zero 2": ({}, {"zero_optimization": {"stage": 2}}, "ZeRO stage 2 is incompatible"),
    "zero 3": ({}, {"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is incompatible"),
    "missing plan": ({"plan": "/nonexistent/dp_results.json"}, {}, "dp_results.json does not exist"),
    "sequence longer than positions": ({"seq_length": 128}, {}, "exceeds max_position_embeddings 64"),
}


def _bad_configs(plan_path):
    """Runs on each rank: every bad setup must raise before deepspeed.initialize communicates."""
    import deepspeed
    import torch
    from deepspeed.pipe import LayerSpec, PipelineModule

    import seqpipe_ds
    from common import tiny_config
    from seqpipe_ds import parallel
    from seqpipe_ds.model import GPTLoss, gpt_pipeline
    topo = parallel.initialize(pipeline_parallel_size=2)
    model = gpt_pipeline(tiny_config(), topo)

    def no_communication(*args, **kwargs):
        raise AssertionError("deepspeed.initialize reached: the error came too late")
    deepspeed.initialize = no_communication

    def attempt(section, extra, module=model):
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
                  "seqpipe": {"enabled": True, "seq_length": 16, **section}, **extra}
        try:
            seqpipe_ds.initialize(model=module, model_parameters=module.parameters(), config=config)
        except ValueError as e:
            return str(e)
        return "no error"

    out = {name: attempt(section, extra) for name, (section, extra, _) in BAD.items()}
    unsliceable = PipelineModule(layers=[LayerSpec(torch.nn.Linear, 4, 4), LayerSpec(torch.nn.Linear, 4, 4)],
                                 topology=topo, loss_fn=torch.nn.MSELoss())
    out["unsliceable model"] = attempt({}, {}, unsliceable)

    @seqpipe_ds.sliceable
    class PositionWise(torch.nn.Linear):
        """Slices fine, but its backward computes its weight gradient at once."""
    unsplit = PipelineModule(layers=[LayerSpec(PositionWise, 4, 4), LayerSpec(PositionWise, 4, 4)],
                             topology=topo, loss_fn=GPTLoss())
    out["unsplit backward"] = {name: attempt({"schedule": name}, {}, unsplit)
                               for name, schedule in seqpipe_ds.schedules.SCHEDULES.items() if schedule.splits_backward}
    out["no matching plan"] = attempt({"plan": plan_path}, {})
    out["config file"] = _config_file_error(model)
    return out


def _config_file_error(model):
    """The section is read from a --deepspeed_config path as well."""
    import argparse
    import os
    import tempfile

    import seqpipe_ds
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ds.json")
        with open(path, "w") as f:
            json.dump({"train_micro_batch_size_per_gpu": 2, "seqpipe": {"enabled": True, "seq_length": 16,
                                                                        "seq_slices": [15]}}, f)
        try:
            seqpipe_ds.initialize(args=argparse.Namespace(deepspeed_config=path, local_rank=0), model=model)
        except ValueError as e:
            return str(e)
    return "no error"


@pytest.mark.timeout(180)
def test_every_rank_reports_the_error_before_communicating(tmp_path):
    from common import tiny_config
    from seqpipe_ds.planner import PlanEntry, write_plan
    plan_path = str(tmp_path / "dp_results.json")
    # A plan for another pipeline size: the file exists but has nothing for this run.
    model = {k: getattr(tiny_config(), k) for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")}
    write_plan(plan_path, PlanEntry(model={**model, "seq_length": 16}, micro_batch_size=2, tp=1, pp=4, dp=1,
                                    batch_slices=[2], input_slices=[[8, 8]], latency=1.0))
    ranks = launcher.run(_bad_configs, 2, plan_path=plan_path)
    assert ranks[0] == ranks[1], "ranks disagree"
    messages = ranks[0]
    for name, (_, _, match) in BAD.items():
        assert match in messages[name], (name, messages[name])
    assert "layer 0 (Linear) is not marked @seqpipe_ds.sliceable" in messages["unsliceable model"]
    assert "normalizer" in messages["unsliceable model"]
    assert set(messages["unsplit backward"]) == {n for n, s in SCHEDULES.items() if s.splits_backward} != set()
    for name, message in messages["unsplit backward"].items():
        assert f"schedule {name!r} splits every backward" in message, message
        assert "layer 0 (_bad_configs.<locals>.PositionWise) is not marked @seqpipe_ds.splits_backward" in message
    assert f"plan file {plan_path} has no plan for" in messages["no matching plan"]
    assert "pp=4" in messages["no matching plan"]  # it lists what the file does contain
    assert "sum to 15, not to the 16 tokens" in messages["config file"]


def test_pretrain_script_fills_seq_length_from_the_command_line(tmp_path):
    # A new user's section names no sequence length: --seq-length says it, once.
    from seqpipe_ds import megatron_args
    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "10", "--deepspeed", "--deepspeed_config"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"seqpipe": {"enabled": True, "seq_slices": 4}}))
    config = megatron_args.deepspeed_config(megatron_args.parse_args(argv + [str(path)], world_size=1))
    assert seqpipe_config.parse(config).seq_length == 32
    path.write_text(json.dumps({"seqpipe": {"enabled": True, "seq_slices": 4, "seq_length": 64}}))
    with pytest.raises(ValueError, match="seqpipe.seq_length = 64"):
        megatron_args.deepspeed_config(megatron_args.parse_args(argv + [str(path)], world_size=1))
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))  # no section: none is added
    assert "seqpipe" not in megatron_args.deepspeed_config(megatron_args.parse_args(argv + [str(path)], world_size=1))
