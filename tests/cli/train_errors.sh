#!/usr/bin/env bash
# torchless-train refuses bad input with one stderr line and exit status 1.
# usage: train_errors.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0 passes=0
source "$(dirname "$0")/expect.bash"
cat >"$tmp/heal.yaml" <<YAML
base_model: $src/models/tiny
adapter: qlora
datasets:
  - path: $src/data/demo/heal.jsonl
    type: chat
max_steps: 1
output_dir: $tmp/out
YAML
train=$build/torchless-train
expect unknown_key "unknown key 'lora_rnak' (did you mean 'lora_r'?)" "$train" --config "$tmp/heal.yaml" lora_rnak=4
expect bad_adapter "adapter 'qlora2' is not one of qlora, lora, full" "$train" --config "$tmp/heal.yaml" adapter=qlora2
expect missing_dataset "nothing.jsonl: cannot open dataset" "$train" --config "$tmp/heal.yaml" "datasets=[{path: $tmp/nothing.jsonl, type: chat}]"
printf 'not yaml: [\n' >"$tmp/bad.yaml"
expect bad_yaml "bad.yaml: invalid YAML" "$train" --config "$tmp/bad.yaml"
expect bad_base "is not a directory" "$train" --config "$tmp/heal.yaml" base_model=$tmp/none
expect bad_backend "backend 'gpu' is not one of auto, cpu, cuda" "$train" --config "$tmp/heal.yaml" backend=gpu
# backend: cuda without a usable GPU (no CUDA backend built, or no device): one line, exit 1.
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  expect cuda_without_gpu "backend: cuda was asked for but" "$train" --config "$tmp/heal.yaml" backend=cuda --dry-run
  expect forward_cuda_without_gpu "backend: cuda was asked for but" "$build/torchless-forward" --backend cuda \
    --model "$src/tests/golden/dense_kv" --input "$src/tests/golden/dense_kv/model.safetensors"
  expect forward_bad_backend "--backend: 'tpu' is not a backend (auto, cpu, cuda)" "$build/torchless-forward" \
    --backend tpu --model "$src/tests/golden/dense_kv" --input "$src/tests/golden/dense_kv/model.safetensors"
fi
# auto says what it chose before anything else.
"$train" --config "$tmp/heal.yaml" --dry-run >"$tmp/plan" 2>&1
if head -1 "$tmp/plan" | grep -qE '^backend +(cpu|cuda) \(auto: '; then passes=$((passes + 1)); else
  fails=$((fails + 1)); echo "FAIL auto_prints_choice: $(head -1 "$tmp/plan")"; fi
echo "train errors: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
