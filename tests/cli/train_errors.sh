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
# The CPU backend's OpenMP threads sleep when idle unless the user chose otherwise
# (core/cpu/thread_policy.h): the tool sets OMP_WAIT_POLICY=PASSIVE and re-executes itself,
# and the backend line says whose policy it runs with.
policy_line() { env -u TORCHLESS_SET_OMP_WAIT_POLICY "$@" "$train" --config "$tmp/heal.yaml" backend=cpu --dry-run 2>&1 | head -1; }
check_policy() {
  local name=$1 want=$2 line
  shift 2
  line=$(policy_line "$@")
  if grep -qF -- "$want" <<<"$line"; then passes=$((passes + 1)); else
    fails=$((fails + 1)); echo "FAIL $name: wanted '$want' in: $line"; fi
}
check_policy wait_policy_default "OMP_WAIT_POLICY=PASSIVE (torchless' default" -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT
check_policy wait_policy_user "OMP_WAIT_POLICY=ACTIVE (from the environment)" -u GOMP_SPINCOUNT OMP_WAIT_POLICY=ACTIVE
check_policy spin_count_user "GOMP_SPINCOUNT=5000 (from the environment)" -u OMP_WAIT_POLICY GOMP_SPINCOUNT=5000
# --dry-run of a config that makes its base by upscaling (the demo), before the base exists:
# the plan, not a filesystem error.
if "$train" --config "$src/configs/demo-heal.yaml" --dry-run output_dir="$tmp/dry" base_model="$tmp/dry-up" \
    >"$tmp/dry.log" 2>&1 && grep -q '^upscale ' "$tmp/dry.log" && grep -q '^model .*(10 layers' "$tmp/dry.log"; then
  passes=$((passes + 1)); else fails=$((fails + 1)); echo "FAIL dry_run_upscale: $(cat "$tmp/dry.log")"; fi
# The 31B QLoRA plan per GPU (seq 2048, micro-batch 1, r 16 on every projection, gradient
# checkpointing) from the bare released config: at most 22 GiB with the CUDA backend's bf16
# activations, with or without a GPU on this machine (issue 10; Unsloth reports 22 GB).
cat >"$tmp/31b.yaml" <<YAML
base_model: $src/configs/models/gemma-4-31B-it
adapter: qlora
lora_r: 16
lora_alpha: 16
lora_target_linear: true
sequence_len: 2048
micro_batch_size: 1
gradient_checkpointing: true
datasets:
  - path: $src/data/demo/heal.jsonl
    type: chat
output_dir: $tmp/out31
YAML
if "$train" --config "$tmp/31b.yaml" backend=cuda --dry-run >"$tmp/plan31" 2>&1; then
  peak=$(sed -n 's/^peak per GPU *\([0-9.]*\) GiB.*/\1/p' "$tmp/plan31")
  if [ -n "$peak" ] && grep -q "bf16 activations" "$tmp/plan31" && awk -v p="$peak" 'BEGIN { exit !(p <= 22.0 && p > 18.0) }'; then
    passes=$((passes + 1)); echo "ok 31B plan: $peak GiB per GPU"
  else fails=$((fails + 1)); echo "FAIL plan_31b: $(cat "$tmp/plan31")"; fi
else fails=$((fails + 1)); echo "FAIL plan_31b exited non-zero: $(cat "$tmp/plan31")"; fi
echo "train errors: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
