#!/usr/bin/env bash
# The README's throughput tables, each one seqpipe-bench run (ratios within a run): batch 1 (README
# command 1's default), batches 2 and 4, and batch 8 with uniform 4 and 8 slices and a per-stage memory
# limit of 0.85x what stock's fastest configuration needs without recomputation. Each run prints its
# table; results land in runs/bench-b*/ (bench.json, and for batches 1 and 8 the timeline PNG). Extra
# arguments go to every run (e.g. --repeats 5 where the machine's speed drifts between iterations).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
bench="$root/.venv/bin/seqpipe-bench"
"$bench" --out runs/bench-b1 --png runs/bench-b1/timeline.png "$@"
for batch in 2 4; do
    "$bench" --batch-size "$batch" --out "runs/bench-b$batch" "$@"
done
"$bench" --batch-size 8 --uniform 4 8 --memory-limit 0.85x --out runs/bench-b8 --png runs/bench-b8/timeline.png "$@"
