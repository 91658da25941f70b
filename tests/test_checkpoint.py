"""seqpipe_ds.checkpoint: a resumed run with dropout continues bit for bit (every rank's RNG state is
in the checkpoint), and a checkpoint without RNG state or with a damaged file stops every rank with
one error that says what is wrong, instead of a rank dying inside DeepSpeed's load and its peers
with the transport's "Connection closed by peer".

The end-to-end cases run examples/pretrain_gpt.py under the real launcher (test_example's helpers;
~25 s a launch), sharing two training runs; the manifest and the checks run in-process or on two
gloo processes (tests/launcher.py).
"""
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

import launcher
from seqpipe_ds import checkpoint, megatron_args
from seqpipe_ds.schedules import SCHEDULES
from test_example import EXAMPLE, LAUNCH_TIMEOUT, PIPELINE, SEQPIPE, TINY_GPT, finish, free_port, start, train, \
    write_ds_config

# Later on the command line than TINY_GPT's zeros, so these win.
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def copy_tag(ckpt, tag, dest):
    """A checkpoint directory holding only ``tag`` of ``ckpt``, with ``latest`` naming it; the tests
    that damage or repoint a checkpoint work on such a copy."""
    shutil.copytree(ckpt / tag, dest / tag)
    (dest / "latest").write_text(tag)
    return dest


def launch_per_rank(script_args, cwd):
    """Both ranks of a 2-stage run, each under a launcher of its own (as on two nodes), so that each
    output is one rank's and no launcher kills a rank before it printed; returns
    ([(exit code, output)] by rank, seconds)."""
    hostfile = cwd / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    started = time.monotonic()
    procs = [start(["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
                    "--master_port", port], EXAMPLE, script_args, cwd) for rank in range(2)]
    results = [finish(proc, started + LAUNCH_TIMEOUT) for proc in procs]
    return results, time.monotonic() - started


def load_args(tmp_path, ckpt, extra=()):
    config = write_ds_config(tmp_path / "seqpipe.json", SEQPIPE)
    return [*TINY_GPT, *PIPELINE, *DROPOUT, "--load", str(ckpt), *extra, "--deepspeed", "--deepspeed_config",
            str(config)]


def assert_every_rank_fails_with(results, elapsed, error, *fragments):
    """Each rank's output ends in the traceback of ``error`` (the start of the exception's line,
    behind torch's "[rankN]: " prefix), which holds every fragment."""
    for rank, (code, out) in enumerate(results):
        assert code != 0, f"rank {rank} exited 0; output ends:\n{out[-3000:]}"
        lines = [line for line in out.splitlines() if line.startswith(f"[rank{rank}]: {error}")]
        assert lines, f"rank {rank} did not report {error!r}; output ends:\n{out[-3000:]}"
        for fragment in fragments:
            assert fragment in lines[-1], f"rank {rank}: {fragment!r} missing from {lines[-1]!r}"
        assert "Connection closed by peer" not in out, f"rank {rank} died in a collective:\n{out[-3000:]}"
    # Both ranks stop at the check; a rank waiting for a dead peer would sit out the timeout.
    assert elapsed < LAUNCH_TIMEOUT / 2, f"failing took {elapsed:.0f} s"


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    """Four seqpipe iterations with dropout, checkpointed after iterations 2 and 4."""
    tmp_dir = tmp_path_factory.mktemp("dropout")
    ckpt = tmp_dir / "ckpt"
    curves, _ = train(tmp_dir, "whole", SEQPIPE, [*DROPOUT, "--save", str(ckpt), "--save-interval", "2"])
    return curves["loss"], ckpt


@pytest.fixture(scope="module")
def resumed_without_rng(dropout_run, tmp_path_factory):
    """The run resumed from iteration 2 with --no-load-rng, saving its iteration-4 checkpoint with
    --no-save-rng."""
    _, ckpt = dropout_run
    tmp_dir = tmp_path_factory.mktemp("no-rng")
    source = copy_tag(ckpt, "global_step2", tmp_dir / "source")
    saved = tmp_dir / "saved"
    curves, _ = train(tmp_dir, "resumed", SEQPIPE, [*DROPOUT, "--load", str(source), "--no-load-rng",
                                                    "--save", str(saved), "--no-save-rng"])
    return curves["loss"], saved


@pytest.mark.timeout(600)
def test_checkpoints_have_a_manifest_and_latest_names_the_last(dropout_run):
    _, ckpt = dropout_run
    assert (ckpt / "latest").read_text() == "global_step4"
    for tag in ("global_step2", "global_step4"):
        files = json.loads((ckpt / tag / checkpoint.MANIFEST).read_text())["files"]
        on_disk = sorted(p.name for p in (ckpt / tag).iterdir() if p.name != checkpoint.MANIFEST)
        assert sorted(files) == on_disk and any(name.startswith("layer_") for name in files)
    # Each stage's model-states file (the one its ranks read on load) holds the RNG states of its
    # data-parallel ranks: one here.
    for states in sorted((ckpt / "global_step2").glob("mp_rank_*_model_states.pt")):
        rng = torch.load(states, map_location="cpu", weights_only=False)[checkpoint.RNG_STATE_KEY]
        assert len(rng) == 1 and "rng_tracker_states" in rng[0], states.name


@pytest.mark.timeout(600)
def test_resume_with_dropout_is_bit_identical(dropout_run, tmp_path):
    whole, ckpt = dropout_run
    source = copy_tag(ckpt, "global_step2", tmp_path / "ckpt")
    resumed, _ = train(tmp_path, "resumed", SEQPIPE, [*DROPOUT, "--load", str(source)])
    assert resumed["loss"] == {i: whole[i] for i in (3, 4)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("schedule", [name for name in SCHEDULES if name != SEQPIPE["schedule"]])
def test_resume_under_every_schedule_is_bit_identical(schedule, tmp_path):
    """The other registered schedules (the fixture runs SEQPIPE's): nothing of a step, a deferred
    weight gradient neither, is left pending across a checkpoint."""
    config = {**SEQPIPE, "schedule": schedule}
    ckpt = tmp_path / "ckpt"
    whole, _ = train(tmp_path, "whole", config, [*DROPOUT, "--save", str(ckpt), "--save-interval", "2"])
    source = copy_tag(ckpt, "global_step2", tmp_path / "source")
    resumed, _ = train(tmp_path, "resumed", config, [*DROPOUT, "--load", str(source)])
    assert len(whole["loss"]) == 4 and resumed["loss"] == {i: whole["loss"][i] for i in (3, 4)}


@pytest.mark.timeout(600)
def test_resume_without_loading_rng_runs_with_other_dropout_masks(dropout_run, resumed_without_rng):
    whole, _ = dropout_run
    resumed, saved = resumed_without_rng
    assert sorted(resumed) == [3, 4]
    # The generators restart from --seed, so the masks and the losses differ: what the exact
    # resume above depends on.
    assert all(resumed[i] != whole[i] for i in (3, 4)), (resumed, whole)
    # --no-save-rng: no stage's model-states file has RNG state, so every rank finds it missing.
    files = sorted((saved / "global_step4").glob("mp_rank_*_model_states.pt"))
    assert len(files) == 2
    assert not any(checkpoint.RNG_STATE_KEY in torch.load(f, map_location="cpu", weights_only=False) for f in files)


@pytest.mark.timeout(600)
def test_checkpoint_without_rng_state_stops_every_rank(resumed_without_rng, tmp_path):
    _, saved = resumed_without_rng
    results, elapsed = launch_per_rank(load_args(tmp_path, saved), tmp_path)
    assert_every_rank_fails_with(
        results, elapsed, f"ValueError: Unable to load rng state from checkpoint {saved / 'global_step4'}: ",
        "saved with --no-save-rng", "Specify --no-load-rng")


@pytest.mark.timeout(600)
def test_damaged_files_stop_every_rank_naming_them(dropout_run, tmp_path):
    _, ckpt = dropout_run
    source = copy_tag(ckpt, "global_step2", tmp_path / "ckpt")
    tag_dir = source / "global_step2"
    layer = sorted(tag_dir.glob("layer_*-model_states.pt"))[-1]
    size = layer.stat().st_size
    os.truncate(layer, size // 2)
    states = tag_dir / "mp_rank_01_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    states.write_bytes(bytes(data))
    results, elapsed = launch_per_rank(load_args(tmp_path, source), tmp_path)
    assert_every_rank_fails_with(
        results, elapsed, f"ValueError: checkpoint {tag_dir}: ",
        f"file {layer.name} is truncated ({size // 2} bytes, manifest says {size})",
        f"file {states.name} is corrupted (sha256 ")


def test_no_rng_flags_are_megatrons():
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "1"]
    default = megatron_args.parse_args(base, world_size=1)
    assert default.save_rng and default.load_rng
    flagged = megatron_args.parse_args([*base, "--no-save-rng", "--no-load-rng"], world_size=1)
    assert not flagged.save_rng and not flagged.load_rng


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    checkpoint.write_atomic(str(target), "old")
    checkpoint.write_atomic(str(target), "new")
    assert target.read_text() == "new"

    def fail(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_atomic(str(target), "partial")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"], "the temporary file is left behind"


def _checks_on_two_ranks(root):
    """On each of two gloo ranks (data-parallel): writes a small checkpoint's manifest, damages the
    checkpoint in turn and records what verify said each time (the tag or the error), and
    round-trips and gathers the RNG state."""
    from seqpipe_ds import parallel
    parallel.initialize(1, 1, seed=7)
    rank = dist.get_rank()
    ckpt = Path(root) / "ckpt"
    tag_dir = ckpt / "global_step1"
    names = ["a.pt", "b.pt", os.path.join("sub", "c.pt")]
    if rank == 0:
        (tag_dir / "sub").mkdir(parents=True)
        for i, name in enumerate(names):
            torch.save({"weight": torch.arange(1000.0) * i}, tag_dir / name)
        (ckpt / "latest").write_text("global_step1")
    dist.barrier()
    checkpoint.write_manifest(str(tag_dir))
    manifest = tag_dir / checkpoint.MANIFEST
    seen = {"manifest": json.loads(manifest.read_text()),
            "listing": sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file()),
            "verdicts": {}}

    def check(case, damage=None, undo=None):
        if rank == 0 and damage:
            damage()
        dist.barrier()
        try:
            seen["verdicts"][case] = checkpoint.verify(str(ckpt))
        except ValueError as e:
            seen["verdicts"][case] = f"ValueError: {e}"
        dist.barrier()
        if rank == 0 and undo:
            undo()

    original = {name: (tag_dir / name).read_bytes() for name in names}

    def restore(name):
        return lambda: (tag_dir / name).write_bytes(original[name])

    def flip_a_bit(name):
        data = bytearray(original[name])
        data[-100] ^= 0x01
        return lambda: (tag_dir / name).write_bytes(bytes(data))

    check("intact")
    check("truncated", lambda: os.truncate(tag_dir / "a.pt", 100), restore("a.pt"))
    check("corrupted", flip_a_bit("b.pt"), restore("b.pt"))  # b.pt: hashed by rank 1 only
    check("missing", lambda: (tag_dir / "a.pt").unlink(), restore("a.pt"))
    text = manifest.read_text()
    check("bad manifest", lambda: manifest.write_text(text[:50]), lambda: manifest.write_text(text))
    check("no manifest, intact", manifest.unlink)
    check("no manifest, truncated", lambda: os.truncate(tag_dir / names[2], 300), restore(names[2]))
    check("latest names no directory", lambda: (ckpt / "latest").write_text("global_step9"))
    check("no latest", (ckpt / "latest").unlink)

    torch.manual_seed(100 + rank)  # the ranks' generators differ, so the gathered order shows
    state = checkpoint.get_rng_state()
    seen["own torch state"] = state["torch_rng_state"]
    seen["gathered torch states"] = [s["torch_rng_state"] for s in checkpoint._gather_rng_states()]

    def draw():
        with tensor_parallel.get_cuda_rng_tracker().fork():
            tracked = torch.rand(3)
        return random.random(), np.random.rand(), torch.rand(3), tracked
    first = draw()
    checkpoint.set_rng_state(state)
    again = draw()
    seen["rng round trip"] = all(bool((a == b).all()) if torch.is_tensor(a) else a == b for a, b in zip(first, again))
    return seen


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    return launcher.run(_checks_on_two_ranks, 2, timeout=240, root=str(root)), root / "ckpt" / "global_step1"


@pytest.mark.timeout(300)
def test_every_rank_gets_the_same_verdict(two_ranks):
    (first, second), _ = two_ranks
    assert first["verdicts"] == second["verdicts"]


@pytest.mark.timeout(300)
def test_manifest_lists_every_file_with_size_and_sha256(two_ranks):
    (seen, _), tag_dir = two_ranks
    # The files are back to the bytes the manifest was written from.
    expected = {str(p.relative_to(tag_dir)): {"size": p.stat().st_size,
                                              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                for p in tag_dir.rglob("*.pt")}
    assert seen["manifest"]["files"] == expected
    assert seen["listing"] == sorted([*expected, checkpoint.MANIFEST]), "a temporary file was left behind"


@pytest.mark.timeout(300)
def test_verify_names_each_damaged_file(two_ranks):
    (seen, _), tag_dir = two_ranks
    size = seen["manifest"]["files"]["a.pt"]["size"]
    verdicts = seen["verdicts"]
    prefix = f"ValueError: checkpoint {tag_dir}: "
    assert verdicts["intact"] == verdicts["no manifest, intact"] == "global_step1"
    assert verdicts["truncated"] == prefix + f"file a.pt is truncated (100 bytes, manifest says {size})"
    assert verdicts["corrupted"].startswith(prefix + "file b.pt is corrupted (sha256 ")
    assert verdicts["missing"] == prefix + "file a.pt is missing"
    assert verdicts["bad manifest"].startswith(prefix + f"file {checkpoint.MANIFEST} is unreadable (JSONDecodeError")
    c_pt = os.path.join("sub", "c.pt")
    assert verdicts["no manifest, truncated"].startswith(prefix + f"file {c_pt} cannot be loaded (RuntimeError: ")
    missing_tag = tag_dir.parent / "global_step9"
    assert verdicts["latest names no directory"] == f"ValueError: checkpoint {missing_tag}: no such directory"
    assert verdicts["no latest"] is None


@pytest.mark.timeout(300)
def test_rng_state_round_trips_and_is_gathered_by_data_parallel_rank(two_ranks):
    seen, _ = two_ranks
    assert all(rank_seen["rng round trip"] for rank_seen in seen)
    own = [rank_seen["own torch state"] for rank_seen in seen]
    assert not torch.equal(*own)
    for rank_seen in seen:
        assert all(torch.equal(gathered, mine) for gathered, mine in zip(rank_seen["gathered torch states"], own))
