#!/usr/bin/env bash
# The CUDA check of sliced attention (benchmarks/gpu_check.py), for the GPU machine: Python 3.12,
# a CUDA torch, no package registry. deepspeed, megatron-core and their missing pure-Python
# dependencies travel as wheels in the git-ignored .whl/ of the checkout (see
# ../shared/gpu-wheels/README.md); run once beforehand, on the machine that has the checkout:
#     echo /.whl/ >> .git/info/exclude && mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/
# and carry .whl along. Runs in well under 8 minutes (the timeout below); writes
# benchmarks/results/gpu_check.json. Extra arguments go to gpu_check.py (e.g. --device cpu --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .whl ] && [ -d ../shared/gpu-wheels ]; then
    mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/
fi
if ! compgen -G ".whl/*.whl" > /dev/null; then
    echo "gpu_check.sh: no wheels in .whl/ (see the comment at the top of this script)" >&2
    exit 2
fi
site="$PWD/.site"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
# seqpipe_ds as setup.py lays it out (patches/ becomes seqpipe_ds.patches), without needing
# setuptools on that machine: a copy beside the wheels.
rm -rf "$site/seqpipe_ds"
cp -r seqpipe_ds "$site/seqpipe_ds"
cp -r patches "$site/seqpipe_ds/patches"
export PYTHONPATH="$site"
mkdir -p benchmarks/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 450 python3 benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json "$@"
