#!/usr/bin/env bash
# Peak memory of torchless-merge against the largest shard of the base (issue: it must stay
# under 2x): a larger E2B-shaped init in bf16 split into 8 MB shards, a LoRA adapter trained
# on it for one step, then the merge.
set -euo pipefail
cd "$(dirname "$0")/.."
w=build/bench-merge
rm -rf "$w" && mkdir -p "$w"
./build/torchless-surgery init bench/larger-model.json "$w/init" --seed 2 --copy-from models/tiny >/dev/null
./build/torchless-surgery convert "$w/init" "$w/base" --dtype bf16 --max-shard-size 8MB >/dev/null
cat >"$w/heal.yaml" <<YAML
base_model: base
adapter: lora
lora_r: 16
datasets:
  - path: ../../data/demo/heal.jsonl
    type: chat
max_steps: 1
sequence_len: 128
output_dir: adapter
YAML
./build/torchless-train --config "$w/heal.yaml" >/dev/null
largest=$(ls -l "$w"/base/*.safetensors | awk '{print $5}' | sort -n | tail -1)
line=$(./build/torchless-merge --base "$w/base" --adapter "$w/adapter" --out "$w/merged")
echo "$line"
rss=$(echo "$line" | sed -E 's/.*peak RSS ([0-9.]+) MiB.*/\1/')
awk -v rss="$rss" -v shard="$largest" 'BEGIN { printf "largest shard %.1f MiB, peak RSS %.1f MiB: %.2fx the largest shard\n", shard/1048576, rss, rss*1048576/shard }'
