#!/usr/bin/env bash
# Peak memory of torchless-merge against the largest shard of the base (it must stay under
# 2x): an init of MODEL_JSON in bf16 split into SHARD-sized shards, a LoRA adapter trained on
# it for one step, then the merge.
#   bash bench/merge_memory.sh [MODEL_JSON [SHARD]]     (default: bench/merge-model.json, 200MB)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-bench/merge-model.json}
shard=${2:-200MB}
w=build/bench-merge
rm -rf "$w" && mkdir -p "$w"
./build/torchless-surgery init "$model" "$w/init" --seed 2 --copy-from models/tiny >/dev/null
./build/torchless-surgery convert "$w/init" "$w/base" --dtype bf16 --max-shard-size "$shard" >/dev/null
rm -rf "$w/init"
cat >"$w/heal.yaml" <<YAML
base_model: base
adapter: lora
lora_r: 8
lora_target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
datasets:
  - path: ../../data/demo/heal.jsonl
    type: chat
max_steps: 1
sequence_len: 64
micro_batch_size: 1
output_dir: adapter
YAML
./build/torchless-train --config "$w/heal.yaml" >/dev/null
largest=$(ls -l "$w"/base/*.safetensors | awk '{print $5}' | sort -n | tail -1)
line=$(./build/torchless-merge --base "$w/base" --adapter "$w/adapter" --out "$w/merged")
echo "$line"
rss=$(echo "$line" | sed -E 's/.*peak RSS ([0-9.]+) MiB.*/\1/')
awk -v rss="$rss" -v shard="$largest" 'BEGIN { printf "largest shard %.1f MiB, peak RSS %.1f MiB: %.2fx the largest shard\n", shard/1048576, rss, rss*1048576/shard }'
