#!/usr/bin/env bash
# Step time of the tiny-model QLoRA heal with 1 and 2 MPI ranks on the CPU, and the share of
# it rank 0 spends in collectives (the trainer's `timing:` line). The global batch is the
# same (4 rows × 128 tokens): 1 rank accumulates 2 micro-batches of 2 rows, 2 ranks take one
# each. Each rank gets THREADS OpenMP threads (default 1).
#   bash bench/ddp_step.sh [BUILD_DIR] [STEPS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build} steps=${2:-20} threads=${3:-1}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/heal.yaml" <<YAML
base_model: $PWD/models/tiny
adapter: qlora
lora_r: 8
lora_alpha: 16
lora_target_linear: true
datasets:
  - path: $PWD/data/demo/heal.jsonl
    type: chat
sequence_len: 128
micro_batch_size: 2
max_steps: $steps
logging_steps: $steps
seed: 7
YAML
for ranks in 1 2; do
  mpirun --oversubscribe --bind-to none -x OMP_NUM_THREADS="$threads" -np "$ranks" \
    "$build/torchless-train" --config "$tmp/heal.yaml" output_dir="$tmp/out$ranks" \
    gradient_accumulation_steps=$((2 / ranks)) >"$tmp/log$ranks" 2>&1
  echo "$ranks rank(s): $(grep '^timing:' "$tmp/log$ranks")"
done
