"""One way for the tests to run a function on N processes (gloo, CPU), with a hard timeout.

``run(fn, world_size, **kwargs)`` spawns ``world_size`` processes that each call ``fn(**kwargs)``
with RANK/WORLD_SIZE/MASTER_* set, and returns the per-rank results (rank order). A rank that
raises makes the call fail with every failing rank's traceback; a run that exceeds ``timeout``
is killed whole and fails, so a deadlock can never hang the suite.
"""
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback

import torch

DIST_TIMEOUT_MIN = "3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, kwargs, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                      SEQPIPE_DIST_TIMEOUT_MIN=DIST_TIMEOUT_MIN)
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        result = fn(**kwargs)
        from seqpipe_ds import parallel
        parallel.destroy()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # the parent reports it; the process must still exit
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        os._exit(1)


def run(fn, world_size: int, timeout: float = 240, **kwargs):
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, kwargs, out_dir)) for r in range(world_size)]
        for p in procs:
            p.start()
        # One deadline for the whole world: a rank stuck in a collective holds the others.
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        outcomes = [_read(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]
    errors = [f"--- rank {r} ---\n{o['error']}" for r, o in enumerate(outcomes) if o is not None and not o["ok"]]
    if errors:
        raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
    if hung:
        raise TimeoutError(f"distributed run exceeded {timeout}s; ranks still running: {hung}")
    missing = [r for r, o in enumerate(outcomes) if o is None]
    if missing:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"ranks {missing} died without a result (exit codes {codes})")
    return [o["result"] for o in outcomes]


def _read(path):
    return torch.load(path, weights_only=False) if os.path.exists(path) else None
