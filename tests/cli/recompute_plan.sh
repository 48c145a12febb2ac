#!/usr/bin/env bash
# `gradient_checkpointing: auto` (the default) in the dry-run of the 31B QLoRA heal (sequence
# 2048, r 16 on every projection, backend cuda, no GPU needed): on an 80 GiB budget every layer
# keeps its activations and the plan stays under 78 GiB; with max_memory_gib 22 every layer is
# recomputed and the plan is at most 22 GiB; an unknown budget recomputes every layer.
# usage: recompute_plan.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
fails=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/h.yaml" <<YAML
base_model: $src/configs/models/gemma-4-31B-it
adapter: qlora
lora_r: 16
lora_alpha: 32
lora_target_linear: true
sequence_len: 2048
micro_batch_size: 1
backend: cuda
datasets:
  - path: x.jsonl
    type: completion
YAML
check() {  # name, overrides..., then the expected checkpointing words and the peak bound (GiB)
  local name=$1 want=$2 bound=$3
  shift 3
  local out
  out=$("$build/torchless-train" --config "$tmp/h.yaml" --dry-run "$@" 2>&1) || { echo "FAIL $name: $out"; fails=$((fails + 1)); return; }
  grep -qF -- "$want" <<<"$out" || { echo "FAIL $name: no '$want' in:"; echo "$out"; fails=$((fails + 1)); return; }
  local peak
  peak=$(sed -n 's/^peak per GPU *\([0-9.]*\) GiB.*/\1/p' <<<"$out")
  awk -v p="$peak" -v b="$bound" 'BEGIN {exit !(p + 0 > 0 && p + 0 <= b)}' ||
    { echo "FAIL $name: peak '$peak' GiB not under $bound"; fails=$((fails + 1)); }
}
check budget_80 "60 of 60 layers keep their activations, 0 recomputed (auto, for a budget of 80.0 GiB" 78 max_memory_gib=80
check budget_22 "0 of 60 layers keep their activations, 60 recomputed (auto, for a budget of 22.0 GiB" 22 max_memory_gib=22
check no_budget "0 of 60 layers keep their activations, 60 recomputed (auto, with no budget known" 22
check forced_off "60 of 60 layers keep their activations, 0 recomputed (gradient_checkpointing: false)" 78 gradient_checkpointing=false
out=$("$build/torchless-train" --config "$tmp/h.yaml" --dry-run gradient_checkpointing=sometimes 2>&1)
grep -qF "gradient_checkpointing 'sometimes' is not one of auto, true, false" <<<"$out" || { echo "FAIL bad value: $out"; fails=$((fails + 1)); }
[ "$fails" -eq 0 ] && echo "recompute_plan: ok"
[ "$fails" -eq 0 ]
