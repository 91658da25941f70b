#!/usr/bin/env bash
# The README's throughput figures: batch 1 (the default model), then batch 4 and 8 on a smaller one.
# Each run prints its table; results land in runs/bench-b*/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
bench="$root/.venv/bin/seqpipe-bench"
"$bench" --out runs/bench-b1 --png runs/bench-b1/timeline.png
for b in 4 8; do
  "$bench" --hidden-size 512 --num-attention-heads 8 --batch-size "$b" --uniform 4 8 --repeats 3 --warmup 1 \
    --out "runs/bench-b$b"
done
