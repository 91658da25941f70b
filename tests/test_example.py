"""examples/pretrain_gpt.py under the real `deepspeed` launcher: stock pipelining and seqpipe give
the same loss curve, a checkpoint resumes it, and bad arguments stop every rank at once.

A tiny model keeps each launch to ~25 s on 2 CPU cores, most of it process start-up. The helpers
here (launching, reading loss logs) are shared with test_megatron_ds_patch.py.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pretrain_gpt.py"
# The launcher installed beside this interpreter, so the ranks run in the same environment.
DEEPSPEED = Path(sys.executable).parent / "deepspeed"

LAUNCH_TIMEOUT = 240  # per launch; a clean one takes ~25 s here, a failing one ~15 s
RTOL = 1e-5
SEQ = 64
TINY_GPT = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", str(SEQ),
            "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "4", "--log-interval", "1",
            # Megatron's default hidden dropout (0.1) is layout-invariant; attention dropout is not
            # (its masks come from torch's generator: seqpipe_ds.ATTENTION_DROPOUT_NOTICE).
            "--attention-dropout", "0"]
PIPELINE = ["--global-batch-size", "8", "--pipeline-model-parallel-size", "2"]
ONE_PROCESS = ["--global-batch-size", "8", "--pipeline-model-parallel-size", "1"]
EVAL = ["--eval-iters", "1"]  # one validation batch at the last iteration
# Uneven slices, the longest first as in the TeraPipe paper's plans.
SEQPIPE = {"enabled": True, "schedule": "terapipe", "seq_length": SEQ, "seq_slices": [24, 16, 16, 8]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env():
    """On one host the launcher starts the ranks with a copy of its own environment (runner.py and
    launch.py pass os.environ on; .deepspeed_env and the launcher's export list are only read
    for multi-node runners such as pdsh), so what is set here reaches every rank. seqpipe_ds is
    installed in the interpreter's environment, so PYTHONPATH is not needed."""
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                # A rank stuck in a collective fails within the launch timeout rather than 10 min.
                SEQPIPE_DIST_TIMEOUT_MIN="3")


def start(launcher_args, script, script_args, cwd):
    # A session of its own: on a timeout the whole tree (launcher, launch.py, ranks) is killed.
    return subprocess.Popen([str(DEEPSPEED), *launcher_args, str(script), *script_args], cwd=cwd,
                            env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, deadline):
    """(exit code, output) of a started launch, killing its process group at the deadline."""
    try:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch did not finish within its timeout; output ends:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:  # interrupted (e.g. by pytest-timeout): leave no ranks behind
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def launch_on_one_host(script, script_args, cwd, processes=2, timeout=LAUNCH_TIMEOUT):
    """`deepspeed --hostfile` with `localhost slots=N`; returns (exit code, output)."""
    hostfile = Path(cwd) / "hostfile"
    hostfile.write_text(f"localhost slots={processes}\n")
    launcher_args = ["--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
                     "--master_port", str(free_port())]
    return finish(start(launcher_args, script, script_args, cwd), time.monotonic() + timeout)


def write_ds_config(path, seqpipe=None):
    config = {"steps_per_print": 10 ** 6}
    if seqpipe:
        config["seqpipe"] = seqpipe
    path.write_text(json.dumps(config))
    return path


def read_log(path):
    """--log-file records as {key: {iteration: value}} for loss and valid_loss."""
    curves = {"loss": {}, "valid_loss": {}}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        for key, curve in curves.items():
            if key in record:
                curve[record["iteration"]] = record[key]
    return curves


def assert_same_curve(actual, expected, what, rtol=RTOL):
    assert sorted(actual) == sorted(expected), f"{what}: iterations {sorted(actual)} vs {sorted(expected)}"
    bad = {i: (actual[i], expected[i]) for i in expected if not abs(actual[i] - expected[i]) <= rtol * abs(expected[i])}
    assert not bad, f"{what}: relative difference above {rtol} at iterations {bad}"


def train(tmp_dir, name, seqpipe=None, extra=(), script=EXAMPLE, layout=PIPELINE, processes=2):
    """Trains the tiny GPT (by default at PP=2 on two processes); returns (log curves, launcher output)."""
    tmp_dir = Path(tmp_dir)
    log = tmp_dir / f"{name}.jsonl"
    config = write_ds_config(tmp_dir / f"{name}.json", seqpipe)
    code, out = launch_on_one_host(script, [*TINY_GPT, *layout, "--log-file", str(log), *extra,
                                            "--deepspeed", "--deepspeed_config", str(config)], tmp_dir,
                                   processes=processes)
    assert code == 0, f"{name} run exited with {code}; output ends:\n{out[-4000:]}"
    return read_log(log), out


@pytest.fixture(scope="module")
def seqpipe_run(tmp_path_factory):
    """One seqpipe run that also checkpoints after iterations 2 and 4; shared by two tests."""
    tmp_dir = tmp_path_factory.mktemp("seqpipe")
    curves, out = train(tmp_dir, "seqpipe", SEQPIPE, [*EVAL, "--save", str(tmp_dir / "ckpt"), "--save-interval", "2"])
    return curves, out, tmp_dir / "ckpt"


@pytest.mark.timeout(900)
def test_seqpipe_stock_pipelining_and_one_process_give_the_same_loss_curve(seqpipe_run, tmp_path):
    """With Megatron's default hidden dropout (0.1): the same masks in every layout."""
    sliced, sliced_out, _ = seqpipe_run
    stock, stock_out = train(tmp_path, "stock", extra=EVAL)
    single, _ = train(tmp_path, "single", extra=EVAL, layout=ONE_PROCESS, processes=1)
    without_dropout, _ = train(tmp_path, "no-dropout", extra=["--hidden-dropout", "0"], layout=ONE_PROCESS,
                               processes=1)
    assert "engine: PipelineEngine" in stock_out
    assert "engine: SeqPipeEngine" in sliced_out
    assert sorted(stock["loss"]) == [1, 2, 3, 4] and sorted(stock["valid_loss"]) == [4]
    for name, run in (("stock DeepSpeed", stock), ("one process", single)):
        assert_same_curve(sliced["loss"], run["loss"], f"training loss vs {name}")
        assert_same_curve(sliced["valid_loss"], run["valid_loss"], f"validation loss vs {name}")
    # the dropout is on: without it the curve leaves the one above by far more than the bound it holds
    apart = max(abs(without_dropout["loss"][i] - single["loss"][i]) / single["loss"][i] for i in (1, 2, 3, 4))
    assert apart > 10 * RTOL, f"hidden dropout 0.1 and 0 train curves only {apart:.1e} apart"


LLAMA_STYLE = ["--position-embedding-type", "rope", "--swiglu", "--normalization", "RMSNorm", "--group-query-attention",
               "--num-query-groups", "2", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
               "--use-flash-attn", "--recompute-granularity", "full", "--recompute-method", "uniform"]


@pytest.mark.timeout(600)
def test_llama_style_model_gives_the_same_loss_curve(tmp_path):
    sliced, sliced_out = train(tmp_path, "llama-seqpipe", SEQPIPE, LLAMA_STYLE)
    stock, _ = train(tmp_path, "llama-stock", extra=LLAMA_STYLE)
    assert sorted(stock["loss"]) == [1, 2, 3, 4]
    assert_same_curve(sliced["loss"], stock["loss"], "Llama-style training loss")
    assert "--use-flash-attn: no FlashAttention on cpu; a no-op" in sliced_out


@pytest.mark.timeout(600)
def test_resume_from_checkpoint_continues_the_loss_curve(seqpipe_run, tmp_path):
    whole, _, ckpt = seqpipe_run
    # load_checkpoint reads the tag to load from `latest`; point it at the mid-run checkpoint.
    (ckpt / "latest").write_text("global_step2")
    resumed, _ = train(tmp_path, "resumed", SEQPIPE, [*EVAL, "--load", str(ckpt)])
    assert sorted(resumed["loss"]) == [3, 4], "the resumed run must start after iteration 2"
    assert_same_curve(resumed["loss"], {i: whole["loss"][i] for i in (3, 4)}, "resumed training loss")
    assert_same_curve(resumed["valid_loss"], whole["valid_loss"], "resumed validation loss")


# Launch-dependent checks; tests/test_megatron_args.py covers every argument check in-process.
BAD_ARGUMENTS = {
    "pipeline size not dividing the launch": (
        ["--pipeline-model-parallel-size", "3"],
        "the launch has 2 processes, which tensor-parallel size 1 × pipeline-parallel size 3 = 3 does not divide"),
    "unknown Megatron argument": (
        ["--pipeline-model-parallel-size", "2", "--apply-query-key-layer-scaling"],
        "unsupported arguments: --apply-query-key-layer-scaling"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_fail_fast_on_every_rank(case, tmp_path):
    extra, message = BAD_ARGUMENTS[case]
    # One launcher per rank, as on two nodes (--no_ssh --node_rank K). A single launcher kills
    # the remaining ranks about a second after the first one fails, so whether the others had
    # printed their message yet would be a race; separate launchers let each rank finish alone.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    started = time.monotonic()
    procs = [start(["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
                    "--master_port", port], EXAMPLE, [*TINY_GPT, *extra, "--deepspeed"], tmp_path)
             for rank in range(2)]
    results = [finish(proc, started + LAUNCH_TIMEOUT) for proc in procs]
    elapsed = time.monotonic() - started
    for rank, (code, out) in enumerate(results):
        assert code != 0, f"rank {rank} exited 0 despite {extra}"
        assert f"error: {message}" in out, f"rank {rank} did not report {message!r}; output ends:\n{out[-3000:]}"
    # Failing before any communication; a rank waiting for its peer would sit out the timeout.
    assert elapsed < LAUNCH_TIMEOUT / 2, f"failing took {elapsed:.0f} s"
