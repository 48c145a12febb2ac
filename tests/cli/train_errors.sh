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
echo "train errors: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
