#!/usr/bin/env bash
# README command 1: set up the environment, then compare seqpipe with stock DeepSpeed pipelining on
# the embedded default (CPU, 2 stages on localhost via `deepspeed --hostfile`, small GPT, bundled corpus).
# A few minutes on 2 cores, every phase with progress. Extra arguments go to seqpipe-bench (see --help):
# `--full` is the README's full-size comparison (hidden 1024, uniform 4 and 8, 2 + 5 iterations).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
mkdir -p runs/bench
exec "$root/.venv/bin/seqpipe-bench" --out runs/bench --png runs/bench/timeline.png "$@"
