"""Each patch in seqpipe_ds.patches: the failure without it and the fix with it, in fresh subprocesses."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
from launcher import _free_port

# Every probe prints one line "RESULT <json>" last; `PATCH` is True/False, set by run_procs.
MEGATRON_PROBE = """
import os, torch
if PATCH:
    from seqpipe_ds import patches
    first, second = patches.apply_all(), patches.apply_all()
import megatron.core.tensor_parallel as tp
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.utils import GlobalMemoryBuffer

torch.distributed.init_process_group("gloo")
parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))

def seed():
    tp.model_parallel_cuda_manual_seed(1234)

def fork():
    # set the tracked state directly (independent of seed()); the default generator must not move
    # across a fork region, the tracked state must advance, and restoring it must replay the stream
    tracker, state = tp.get_cuda_rng_tracker(), torch.manual_seed(7).get_state()
    tracker.set_states({"model-parallel-rng": state})
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before) and not torch.equal(a, b)
    tracker.set_states({"model-parallel-rng": state})
    with tracker.fork():
        assert torch.equal(torch.rand(4), a)

def buffer():
    assert GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x").device.type == "cpu"

def gather_output():
    config = ModelParallelConfig(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]),
                                 use_cpu_initialization=True, params_dtype=torch.float32)
    layer = tp.ColumnParallelLinear(4, 6, config=config, init_method=torch.nn.init.xavier_normal_,
                                    gather_output=True)
    out, _ = layer(torch.randn(3, 4))
    assert out.shape == (3, 6)

result = {}
for check in (seed, fork, buffer, gather_output):
    try:
        check()
        result[check.__name__] = "ok"
    except Exception as exc:
        result[check.__name__] = f"{type(exc).__name__}: {exc}"
if PATCH:
    result["applied"] = [first, second, patches.applied()]
torch.distributed.destroy_process_group()
print("RESULT", json.dumps(result))
"""

DEEPSPEED_PROBE = """
import torch
from deepspeed.accelerator import get_accelerator
# record (instead of JIT-building) any load of the shm comm op
builder_cls = type(get_accelerator().create_op_builder("ShareMemCommBuilder"))
loads = []
builder_cls.load = lambda self, *a, **k: loads.append(self.NAME)
if PATCH:
    from seqpipe_ds.patches import deepspeed_shm, gloo_exit  # not apply_all: spares the megatron-core import
    applied = [deepspeed_shm.apply(), gloo_exit.apply()]
import deepspeed, deepspeed.comm as dist
deepspeed.init_distributed(dist_backend="gloo")
x = torch.ones(3) * (dist.get_rank() + 1)
dist.all_reduce(x)
y = torch.ones(3) * (dist.get_rank() + 1)
dist.inference_all_reduce(y)
expected = sum(range(1, dist.get_world_size() + 1))
print("RESULT", json.dumps({"loads": loads, "sums": [x.tolist(), y.tolist()], "expected": expected,
                            "applied": applied if PATCH else None}))
"""


def run_procs(probe, patch, nprocs=1, timeout=90):
    """Run `probe` as `nprocs` gloo ranks on one host; return [(returncode, result dict or None, stderr)]."""
    port = _free_port()
    code = f"import json\nPATCH = {patch}\n{textwrap.dedent(probe)}"
    base = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
    procs = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", code], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in range(nprocs)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
            out.append((p.returncode, json.loads(lines[-1][7:]) if lines else None, stderr[-3000:]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.fixture(scope="module")
def megatron_runs():
    """The megatron probe at TP=2 without and with the patches: {patch: [result per rank]}."""
    runs = {}
    for patch in (False, True):
        procs = run_procs(MEGATRON_PROBE, patch, nprocs=2)
        assert all(rc == 0 and res for rc, res, _ in procs), procs
        runs[patch] = [res for _, res, _ in procs]
    return runs


@pytest.mark.timeout(150)
@pytest.mark.parametrize("check", ["seed", "fork", "buffer", "gather_output"])
def test_megatron_cpu_shim(megatron_runs, check):
    for res in megatron_runs[False]:
        assert "Torch not compiled with CUDA enabled" in res[check]  # fails on CPU without the patch
    for res in megatron_runs[True]:
        assert res[check] == "ok", res[check]


@pytest.mark.timeout(150)
def test_apply_all_idempotent(megatron_runs):
    for res in megatron_runs[True]:
        expected = ["megatron_cpu", "deepspeed_shm", "gloo_exit", "gloo_device", "clip_norm", "cross_entropy_dtype"]
        assert res["applied"] == [expected] * 3


@pytest.mark.timeout(60)
def test_megatron_shim_skipped_with_cuda():
    probe = """
    import torch
    torch.cuda.is_available = lambda: True  # pretend to be a GPU machine
    import megatron.core.tensor_parallel.random as mrandom
    names = ["current_device", "get_rng_state", "manual_seed"]
    before = [getattr(torch.cuda, n) for n in names] + [mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state]
    from seqpipe_ds import patches
    applied = patches.apply_all()
    after = [getattr(torch.cuda, n) for n in names] + [mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state]
    print("RESULT", json.dumps({"applied": applied, "unchanged": before == after}))
    """
    [(rc, res, err)] = run_procs(probe, patch=True)
    assert rc == 0, err
    # DS_ACCELERATOR=cpu keeps deepspeed_shm; clip_norm and cross_entropy_dtype are needed with CUDA as well
    assert res["applied"] == ["deepspeed_shm", "clip_norm", "cross_entropy_dtype"] and res["unchanged"]


@pytest.mark.timeout(60)
def test_deepspeed_shm_op_built_without_patch():
    [(rc, res, err)] = run_procs(DEEPSPEED_PROBE, patch=False)
    # no rc check: without gloo_exit this process may hit the exit abort after printing its result
    assert res and res["loads"] == ["deepspeed_shm_comm"], err


@pytest.mark.timeout(120)
def test_deepspeed_shm_patch_clean_exit():
    for _ in range(3):
        procs = run_procs(DEEPSPEED_PROBE, patch=True, nprocs=2)
        for rc, res, err in procs:
            assert rc == 0, err
            assert res["loads"] == [] and res["applied"] == [True, True]
            assert res["sums"] == [[res["expected"]] * 3] * 2  # gloo all_reduce and inference_all_reduce


@pytest.mark.timeout(90)
def test_gloo_exit_destroys_groups_before_finalization():
    # The abort itself is a race; what the patch guarantees is that no group is left for finalization.
    probe = """
    import atexit, torch, torch.distributed as dist
    # registered before the patch, so it runs after the patch's hook (atexit is last in, first out)
    atexit.register(lambda: print("RESULT", json.dumps({"alive_at_exit": dist.is_initialized()})))
    if PATCH:
        from seqpipe_ds.patches import gloo_exit
        assert gloo_exit.apply() and gloo_exit.apply()
    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(3))
    """
    alive = {patch: [res["alive_at_exit"] for _, res, _ in run_procs(probe, patch, nprocs=2)] for patch in (False, True)}
    assert alive == {False: [True, True], True: [False, False]}


GLOO_DEVICE_PROBE = """
import os, torch, torch.distributed as dist
from torch.distributed import ProcessGroupGloo  # torch's own class, as other code imports it
if PATCH:
    from seqpipe_ds.patches import gloo_device, gloo_exit
    applied = [gloo_device.apply(), gloo_device.apply()]
    gloo_exit.apply()
dist.init_process_group("gloo")
from megatron.core import parallel_state
parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
groups = [dist.new_group([0, 1]) for _ in range(6)] + [dist.new_group([r]) for r in range(2)]
rank, ok = dist.get_rank(), []
for group in [None, *groups[:6]]:  # collectives and point-to-point on groups that share the device
    x = torch.ones(2) * (rank + 1)
    dist.all_reduce(x, group=group)
    y = torch.arange(3.0) if rank == 0 else torch.zeros(3)
    (dist.send if rank == 0 else dist.recv)(y, 1 - rank, group=group)
    ok.append(x.tolist() == [3.0, 3.0] and y.tolist() == [0.0, 1.0, 2.0])
mine = dist.new_group([rank])  # only this rank's
dist.all_reduce(torch.ones(1), group=mine)
loops = sum(open(f"/proc/self/task/{t}/comm").read().strip() == "gloo_tcp_loop" for t in os.listdir("/proc/self/task"))
backends = [g._get_backend(torch.device("cpu")) for g in (dist.group.WORLD, groups[0])]
print("RESULT", json.dumps({"ok": ok, "loops": loops, "groups": len(dist.distributed_c10d._world.pg_map),
                            "gloo": [isinstance(b, ProcessGroupGloo) for b in backends],
                            "late": gloo_device.apply() if PATCH else None,
                            "applied": applied if PATCH else None}))
dist.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_gloo_groups_share_one_device_and_network_thread():
    runs = {patch: run_procs(GLOO_DEVICE_PROBE, patch, nprocs=2) for patch in (False, True)}
    for patch, procs in runs.items():
        for rc, res, err in procs:
            assert rc == 0 and res, err
            assert res["ok"] == [True] * 7 and res["gloo"] == [True, True], res
    for (_, off, _), (_, on, _) in zip(runs[False], runs[True]):
        assert off["groups"] == on["groups"] > 20  # megatron-core's groups and ours
        assert off["loops"] >= off["groups"] and on["loops"] == 1  # one thread per device
        assert on["applied"] == [True, True] and on["late"] is True


@pytest.mark.timeout(60)
def test_gloo_device_patch_is_refused_once_groups_exist():
    probe = """
    import torch.distributed as dist
    dist.init_process_group("gloo")
    from seqpipe_ds.patches import gloo_device
    cls = dist.distributed_c10d.ProcessGroupGloo
    applied = gloo_device.apply()
    print("RESULT", json.dumps({"applied": applied, "unchanged": dist.distributed_c10d.ProcessGroupGloo is cls}))
    dist.destroy_process_group()
    """
    [(rc, res, err)] = run_procs(probe, patch=True)
    assert rc == 0, err
    assert res == {"applied": False, "unchanged": True}


@pytest.mark.timeout(30)
def test_unverified_version_warns():
    from seqpipe_ds.patches._common import warn_if_unverified
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_unverified("megatron_cpu", "megatron-core", ("0.16",))
        warn_if_unverified("megatron_cpu", "megatron-core", ("9.9",))
    assert len(caught) == 1 and "unverified" in str(caught[0].message)


def _cross_entropies():
    import torch
    import torch.nn.functional as F
    from megatron.core import tensor_parallel

    from seqpipe_ds import parallel
    parallel.initialize()
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 50, (3, 7), generator=g)
    out = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        logits = (4 * torch.randn(3, 7, 50, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        reference = logits.detach().double().requires_grad_()  # before: megatron works in place on fp32 logits
        expected = F.cross_entropy(reference.view(-1, 50), target.view(-1), reduction="none").view(3, 7)
        expected.sum().backward()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, target)
        loss.sum().backward()
        out[str(dtype)] = (str(loss.dtype), str(logits.grad.dtype), (loss.double() - expected).abs().max().item(),
                           (logits.grad.double() - reference.grad).abs().max().item())
    return out


@pytest.mark.timeout(120)
def test_cross_entropy_keeps_float64_and_promotes_the_rest_to_float32():
    import launcher
    out = launcher.run(_cross_entropies, 1)[0]
    loss_dtype, grad_dtype, loss_err, grad_err = out["torch.float64"]
    assert (loss_dtype, grad_dtype) == ("torch.float64", "torch.float64") and loss_err < 1e-13 and grad_err < 1e-15
    assert out["torch.float32"][:2] == ("torch.float32", "torch.float32") and out["torch.float32"][2] < 1e-5
    assert out["torch.bfloat16"][:2] == ("torch.float32", "torch.bfloat16")  # bf16 logits: fp32 loss, as before
