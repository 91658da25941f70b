#!/usr/bin/env bash
# README command 1: set up the environment, then compare seqpipe with stock DeepSpeed pipelining on
# the embedded default (CPU, 2 stages on localhost via `deepspeed --hostfile`, small GPT, bundled corpus).
# Extra arguments go to seqpipe-bench (see --help).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
mkdir -p runs/bench
exec "$root/.venv/bin/seqpipe-bench" --out runs/bench --png runs/bench/timeline.png "$@"
