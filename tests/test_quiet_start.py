"""A quiet start: seqpipe_ds.quiet filters megatron-core's "Transformer Engine and Apex are not
installed" UserWarnings and DeepSpeed's "Setting accelerator to CPU" log line, and nothing else.

DS_ACCELERATOR and PYTHONWARNINGS are unset in these processes, as on a user's first run: DeepSpeed
auto-detects (and, without a GPU, logs its CPU fallback) and Python's default warning filters apply.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What seqpipe_ds imports that prints the notices.
LIBRARIES = "import deepspeed, megatron.core.optimizer, megatron.core.distributed"
BIN = Path(sys.executable).parent
TIMEOUT = 120
NOISE = ("Transformer Engine and Apex are not installed", "Setting accelerator to CPU")
# Real warnings raised after the filters are in: an unrelated one, one with megatron's text from
# elsewhere, and another warning on DeepSpeed's logger.
REAL_WARNINGS = """\
import logging, warnings
warnings.warn("an unrelated warning")
warnings.warn("Transformer Engine and Apex are not installed. Falling back to nothing", UserWarning)
logging.getLogger("DeepSpeed").warning("a real DeepSpeed warning")
"""


def _env():
    """A user's first run: DeepSpeed auto-detects, and Python's own warning filters apply."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS")}
    return dict(env, OMP_NUM_THREADS="1")


def _output(argv):
    """(stdout, stderr): DeepSpeed's logger writes to stdout, warnings go to stderr."""
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


@pytest.mark.timeout(2 * TIMEOUT + 30)
def test_known_notices_are_filtered_and_real_warnings_stay():
    # Loaded by path, ahead of the seqpipe_ds package, as its first import does.
    # The libraries alone, without seqpipe_ds (whose first import is seqpipe_ds.quiet), are noisy.
    noisy = "".join(_output([sys.executable, "-c", LIBRARIES]))
    assert all(notice in noisy for notice in NOISE), f"the notices this filters no longer appear:\n{noisy}"
    out, err = _output([sys.executable, "-c", f"import seqpipe_ds\n{REAL_WARNINGS}"])
    assert out.splitlines()[-1].endswith("[WARNING] [<string>:5:<module>] a real DeepSpeed warning"), out
    assert NOISE[1] not in out and err.count(NOISE[0]) == 1, out + err  # the one left is the test's own
    warned = [line for line in err.splitlines() if "UserWarning" in line]
    assert warned == ["<string>:3: UserWarning: an unrelated warning",
                      "<string>:4: UserWarning: Transformer Engine and Apex are not installed. Falling back to nothing"]


# Every entry point imports the seqpipe_ds package first (and through it deepspeed and megatron.core),
# whose first import installs the filters.
@pytest.mark.timeout(2 * TIMEOUT + 30)
@pytest.mark.parametrize("command", ["seqpipe-bench", "seqpipe-data"])
def test_help_prints_no_library_warning(command):
    out, err = _output([str(BIN / command), "--help"])
    assert out.startswith(f"usage: {command}")
    assert err == ""
