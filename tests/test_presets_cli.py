"""--model-preset in seqpipe-bench and seqpipe-plan profile: the preset fills the model flags left
unset and brings its GPTConfig options (SwiGLU, RMSNorm, ...) to the built or profiled layers."""
import json

import pytest

import launcher


@pytest.mark.timeout(30)
def test_bench_and_plan_take_a_preset(capsys):
    from seqpipe_ds.cli import bench, plan
    from seqpipe_ds.model import GPTConfig, presets
    args = bench._parser().parse_args(["--model-preset", "llama2-7b", "--num-layers", "2"])
    presets.fill_shape(args, bench.DEFAULT_SHAPE)
    assert GPTConfig(**bench._model(args)) == presets.gpt_config("llama2-7b", num_layers=2)
    args = bench._parser().parse_args([])
    presets.fill_shape(args, bench.DEFAULT_SHAPE)
    shape = dict(bench.DEFAULT_SHAPE)  # without a preset: the built-in shape and no options
    shape["max_position_embeddings"] = shape.pop("seq_length")
    assert bench._model(args) == shape
    assert plan.main(["profile", "--num-layers", "1", "--micro-batch-size", "1", "--seq-length", "64",
                      "--out", "x"]) == 1
    assert ("--hidden-size, --num-attention-heads, --vocab-size required (or --model-preset)"
            in capsys.readouterr().err)


def profile_preset(out):
    from seqpipe_ds.cli import plan
    return plan.main(["profile", "--model-preset", "llama2-7b", "--num-layers", "1", "--hidden-size", "64",
                      "--num-attention-heads", "4", "--vocab-size", "64", "--seq-length", "16", "--micro-batch-size",
                      "1", "--context-samples", "1", "--warmup", "0", "--repeats", "1", "--quiet", "--out", out])


@pytest.mark.timeout(120)
def test_profile_a_preset_with_a_smaller_shape(tmp_path):
    out = tmp_path / "profile.json"
    assert launcher.run(profile_preset, 1, out=str(out)) == [0]
    config = json.loads(out.read_text())["config"]
    assert (config["model_preset"], config["hidden_size"], config["seq_length"]) == ("llama2-7b", 64, 16)
