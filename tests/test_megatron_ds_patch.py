"""patches/megatron_deepspeed_pretrain_gpt.diff turns the Megatron-DeepSpeed-style stock script into
the seqpipe version: it applies cleanly, changes only what patches/README.md describes, and the
patched script trains on SeqPipeEngine with the stock script's loss curve."""
import difflib
import shutil
import subprocess

import pytest

from test_example import ROOT, SEQPIPE, assert_same_curve, train

STOCK = ROOT / "examples" / "megatron_deepspeed_style" / "pretrain_gpt_stock.py"
DIFF = ROOT / "patches" / "megatron_deepspeed_pretrain_gpt.diff"


def apply_patch(workdir):
    """Applies the diff where it is meant to go: pretrain_gpt.py at the top of a checkout."""
    shutil.copy(STOCK, workdir / "pretrain_gpt.py")
    # git apply works outside a repository too, as plain patch(1) would.
    for cmd in (["git", "apply", "--check", str(DIFF)], ["git", "apply", str(DIFF)]):
        done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}"
    return workdir / "pretrain_gpt.py"


@pytest.mark.timeout(600)
def test_patched_script_runs_seqpipe_with_the_stock_loss_curve(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    patched = apply_patch(checkout)

    # The whole change to the script: one import added, one call renamed.
    changes = [line[2:].strip() for line in difflib.ndiff(STOCK.read_text().splitlines(),
                                                            patched.read_text().splitlines())
               if line[:2] in ("- ", "+ ")]
    assert sorted(changes) == sorted(["import seqpipe_ds", "engine, _, _, _ = deepspeed.initialize(",
                                      "engine, _, _, _ = seqpipe_ds.initialize("])

    stock, stock_out = train(tmp_path, "stock", script=STOCK)
    sliced, sliced_out = train(tmp_path, "seqpipe", SEQPIPE, script=patched)
    assert "engine: PipelineEngine" in stock_out
    assert "engine: SeqPipeEngine" in sliced_out
    assert sorted(stock["loss"]) == [1, 2, 3, 4]
    assert_same_curve(sliced["loss"], stock["loss"], "training loss of the patched script")
