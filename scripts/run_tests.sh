#!/usr/bin/env bash
# README command 2: set up the environment, then run the whole test suite on CPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
