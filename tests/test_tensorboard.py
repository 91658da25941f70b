"""--tensorboard-dir: examples/pretrain_gpt.py writes Megatron-LM's scalars, read back here from the event
file with TensorBoard's own reader, equal to the JSON-lines log.

The one launch (seqpipe, 2 stages) also trains on the embedded corpus encoded with GPT2BPETokenizer
(a BPE trained in test_preprocess.py), which encoding with the tokenizers package made possible.
"""
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from test_example import SEQPIPE, train
from test_preprocess import write_tokenizer_files

GLOBAL_BATCH = 8  # test_example.PIPELINE's


@pytest.mark.timeout(400)
def test_tensorboard_scalars_are_read_back_equal_to_the_run_log(tmp_path):
    vocab, merges, _ = write_tokenizer_files(tmp_path)
    board = tmp_path / "tb"
    curves, _ = train(tmp_path, "tb", SEQPIPE, ["--eval-iters", "1", "--tensorboard-dir", str(board),
                                                "--tensorboard-log-interval", "2", "--tokenizer-type",
                                                "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges])
    assert len(list(board.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    events = EventAccumulator(str(board))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert set(scalars) == {"lm loss", "lm loss vs samples", "learning-rate", "learning-rate vs samples",
                            "batch-size", "iteration-time", "throughput", "mem-max-allocated-bytes",
                            "lm loss validation", "lm loss validation vs samples"}
    # every --tensorboard-log-interval (2) iterations; the validation at the last one
    for tag in ("lm loss", "learning-rate", "batch-size", "iteration-time", "throughput", "mem-max-allocated-bytes"):
        assert sorted(scalars[tag]) == [2, 4], tag
    assert sorted(scalars["lm loss vs samples"]) == [2 * GLOBAL_BATCH, 4 * GLOBAL_BATCH]
    for step, loss in scalars["lm loss"].items():
        assert loss == pytest.approx(curves["loss"][step], rel=1e-6)  # stored as float32
    assert scalars["lm loss validation"] == {4: pytest.approx(curves["valid_loss"][4], rel=1e-6)}
    assert scalars["batch-size"] == {2: GLOBAL_BATCH, 4: GLOBAL_BATCH}
    assert all(t > 0 for t in scalars["iteration-time"].values())
    assert all(m > 2 ** 20 for m in scalars["mem-max-allocated-bytes"].values())
    # the GPT-2 BPE vocabulary (1000, padded to 1024) is what the model predicts over, not bytes (384)
    assert abs(curves["loss"][1] - math.log(1024)) < 0.5
