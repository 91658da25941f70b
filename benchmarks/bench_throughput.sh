#!/usr/bin/env bash
# The README's throughput tables: batch 1 (README command 1's default) and batch 8 (both schedules,
# uniform 4 and 8 slices, planned). Each run prints its table; results land in runs/bench-b*/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
bench="$root/.venv/bin/seqpipe-bench"
"$bench" --out runs/bench-b1 --png runs/bench-b1/timeline.png
"$bench" --batch-size 8 --uniform 4 8 --out runs/bench-b8 --png runs/bench-b8/timeline.png
