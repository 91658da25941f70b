#!/usr/bin/env bash
# End-to-end training throughput with packed documents (log-normal lengths, mean 512 tokens, byte-level):
# examples/pretrain_gpt.py on 2 pipeline stages with --reset-attention-mask --reset-position-ids
# --eod-mask-loss under stock DeepSpeed pipelining (dense document mask) and under seqpipe (slice-1f1b,
# 4 slices: block attention per document segment), and both without the flags (plain causal attention over
# the same tokens), which separates the pipelining's gain from the documents'; then seqpipe-compare's
# table (mean tokens/s after the first iteration, ratio to the first run). The figures of
# benchmarks/results/documents_e2e_cpu.txt: bash benchmarks/bench_documents_e2e.sh runs/documents_e2e 8 2048
# Usage: bash benchmarks/bench_documents_e2e.sh [OUT_DIR] [ITERATIONS] [SEQ]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-runs/documents_e2e}
iters=${2:-8}
seq=${3:-2048}
cd "$root"
mkdir -p "$out"
.venv/bin/python benchmarks/bench_documents.py --corpus "$out/lognormal" --documents 4000
printf "localhost slots=2\n" > "$out/hostfile"
echo '{"steps_per_print": 1000000}' > "$out/stock.json"
echo '{"steps_per_print": 1000000, "seqpipe": {"enabled": true, "schedule": "slice-1f1b", "seq_slices": 4}}' \
    > "$out/seqpipe.json"
model=(--num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length "$seq" --micro-batch-size 1
       --global-batch-size 1 --pipeline-model-parallel-size 2 --lr 1e-4 --train-iters "$iters" --log-interval 1000
       --attention-dropout 0 --data-path "$out/lognormal" --split 1,0,0 --eval-iters 0)
documents=(--reset-attention-mask --reset-position-ids --eod-mask-loss)
run() {  # name, config, extra flags: one launch, one thread per stage
    local name=$1 config=$2
    shift 2
    rm -f "$out/$name.jsonl"
    OMP_NUM_THREADS=1 .venv/bin/deepspeed --hostfile "$out/hostfile" --no_ssh_check --master_addr 127.0.0.1 \
        examples/pretrain_gpt.py "${model[@]}" "$@" --log-file "$out/$name.jsonl" \
        --deepspeed --deepspeed_config "$out/$config.json" > "$out/$name.log" 2>&1
}
run stock-documents stock "${documents[@]}"
run seqpipe-documents seqpipe "${documents[@]}"
run stock-causal stock
run seqpipe-causal seqpipe
.venv/bin/seqpipe-compare "$out"/{stock-documents,seqpipe-documents,stock-causal,seqpipe-causal}.jsonl \
    --labels "stock, documents (dense mask)" "seqpipe, documents" "stock, causal" "seqpipe, causal" \
    | tee "$out/compare.txt"
