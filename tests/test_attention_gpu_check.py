"""The GPU check's code paths, on CPU: gpu_check.py at toy sizes, the shell script's syntax, and
the CUDA kernels' wrappers (argument order, log-sum-exp padding, GQA) on meta tensors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import launcher
from seqpipe_ds.attention import BlockAttention, kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_gpu_check(out):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check
    return gpu_check.main(["--device", "cpu", "--tiny", "--out", out])


@pytest.mark.timeout(180)
def test_gpu_check_runs_on_cpu(tmp_path):
    out = str(tmp_path / "gpu_check.json")
    assert launcher.run(run_gpu_check, 1, out=out)[0] == 0
    with open(out) as f:
        report = json.load(f)
    assert report["failed"] == []
    assert set(report["checks"]) == {f"{check} {dtype}" for dtype in ("fp32", "bf16")
                                     for check in ("blocks", "gpt", "gpt split", "gpt documents")}
    assert report["checks"]["gpt split fp32"]["grad"] <= 1e-5
    assert report["checks"]["gpt documents fp32"]["grad"] <= 1e-5
    assert report["checks"]["gpt fp32"]["grad"] <= 1e-5 and report["checks"]["gpt fp32"]["tensors"] > 10
    assert list(report["layer"]["slices"]) == ["1", "2", "4"]
    assert all(r["seconds"] > 0 for r in report["layer"]["slices"].values())


@pytest.mark.timeout(30)
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_check.sh")], check=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kernel", [kernels.CudaFlash, kernels.CudaEfficient], ids=lambda k: k.name)
def test_cuda_kernels_fit_their_ops_on_meta(kernel):
    # The meta device runs the aten ops' schema and shape functions: a wrong argument order, count
    # or type, or gradients of the wrong (GQA) shape, fail here without a GPU. The numbers (and
    # the efficient kernel's log-sum-exp padding, which meta does not check) need the GPU check.
    q = torch.empty(2, 4, 37, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    own, cached = [[torch.empty(2, 2, n, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2)] for n in (37, 45)]
    out = BlockAttention.apply(kernel, q, *own, *cached)
    assert out.shape == q.shape
    out.backward(torch.empty_like(out))
    assert q.grad.shape == q.shape
    assert [t.grad.shape for t in own + cached] == [t.shape for t in own + cached]


@pytest.mark.timeout(30)
def test_kernel_choice():
    assert kernels.select(torch.empty(1, device="cpu")) is kernels.CpuFlash
    with pytest.raises(ValueError, match="no kernel"):
        kernels.select(torch.empty(1, device="meta"))
