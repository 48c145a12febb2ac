#!/usr/bin/env bash
# Issue 9, classes 2, 3 and 5 on the trainer: value ranges and duplicate keys, data with no
# trained tokens, a reused output_dir (another run's checkpoints are refused, never resumed
# or pruned), write failures, kills during a save and during pruning, and SIGINT, which
# saves and resumes to the same bytes as an uninterrupted run.
# usage: train_runs.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0 passes=0
source "$(dirname "$0")/expect.bash"
train=$build/torchless-train

head -n 24 "$src/data/demo/heal.jsonl" >"$tmp/data.jsonl"
cat >"$tmp/heal.yaml" <<YAML
base_model: $src/models/tiny
adapter: qlora
lora_r: 4
lora_alpha: 8
datasets:
  - path: $tmp/data.jsonl
    type: chat
sequence_len: 64
micro_batch_size: 1
max_steps: 6
learning_rate: 3.0e-3
logging_steps: 1
seed: 5
output_dir: $tmp/run
YAML
y=$tmp/heal.yaml
inputs_h() { echo "$(tree_hash "$y") $(tree_hash "$tmp/data.jsonl") $(tree_hash "$src/models/tiny")"; }
in_h=$(inputs_h)

# --- 3. ranges, duplicate keys, zero trained tokens ----------------------------------------
expect lr_negative "learning_rate must be in [0, inf) (got -1)" "$train" --config "$y" learning_rate=-1
expect lr_nan "learning_rate must be in [0, inf) (got nan)" "$train" --config "$y" learning_rate=.nan
expect beta1_one "adam_beta1 must be in [0, 1) (got 1)" "$train" --config "$y" adam_beta1=1.0
expect beta2_negative "adam_beta2 must be in [0, 1)" "$train" --config "$y" adam_beta2=-0.5
expect eps_negative "adam_epsilon must be in [0, inf)" "$train" --config "$y" adam_epsilon=-1e-8
expect wd_negative "weight_decay must be in [0, inf)" "$train" --config "$y" weight_decay=-0.1
expect max_steps_negative "max_steps must be at least 0 (got -5)" "$train" --config "$y" max_steps=-5
expect cosine_min_over_one "cosine_min_lr_ratio must be in [0, 1] (got 1.5)" "$train" --config "$y" cosine_min_lr_ratio=1.5
expect warmup_ratio "warmup_ratio must be in [0, 1]" "$train" --config "$y" warmup_ratio=2
expect warmup_steps "warmup_steps must be at least 0" "$train" --config "$y" warmup_steps=-1
expect grad_norm "max_grad_norm must be in [0, inf)" "$train" --config "$y" max_grad_norm=.nan
expect dropout_nan "lora_dropout must be in [0, 1)" "$train" --config "$y" lora_dropout=.nan
expect alpha_zero "lora_alpha must be in (0, inf)" "$train" --config "$y" lora_alpha=0
expect val_nan "val_set_size must be in [0, 1)" "$train" --config "$y" val_set_size=.nan
expect epochs_nan "num_epochs must be in [0, inf)" "$train" --config "$y" max_steps=0 num_epochs=.nan
expect logging_zero "logging_steps must be at least 1" "$train" --config "$y" logging_steps=0
expect save_negative "save_steps must be at least 0" "$train" --config "$y" save_steps=-2
expect seed_negative "seed must be at least 0 (got -1)" "$train" --config "$y" seed=-1
cp "$y" "$tmp/dup.yaml" && echo "learning_rate: 1.0e-4" >>"$tmp/dup.yaml"
expect duplicate_key "dup.yaml: key 'learning_rate' appears twice (line" "$train" --config "$tmp/dup.yaml"
head -n 4 "$tmp/data.jsonl" | sed 's/"role": *"assistant"/"role": "user"/g' >"$tmp/users.jsonl"
expect no_assistant_turns "the training data has no trained tokens (4 examples)" \
  "$train" --config "$y" "datasets=[{path: $tmp/users.jsonl, type: chat}]"
expect huge_sequence_len "sequence_len: 1000000 tokens, more than the model's context of 4096 (max_position_embeddings in" \
  "$train" --config "$y" sequence_len=1000000 "datasets=[{path: $src/data/demo/heal.jsonl, type: chat}]"
grep -q "lower sequence_len" "$tmp/err" || { fails=$((fails + 1)); echo "FAIL huge_sequence_len: no setting named"; }
# output_dir inside a model the run only reads (here the reference it measures against): refused.
cp -r "$src/models/tiny" "$tmp/reference"
expect output_in_reference "lies inside the input $tmp/reference" \
  "$train" --config "$y" eval_reference_model="$tmp/reference" output_dir="$tmp/reference/run"
check output_in_reference_untouched '[ ! -e "$tmp/reference/run" ]'
# The same refusal from --dry-run on a bare config (no weights, no data read).
expect huge_sequence_len_plan "sequence_len: 300000 tokens, more than the model's context of 262144" \
  "$train" --config "$y" --dry-run sequence_len=300000 base_model="$src/configs/models/gemma-4-31B-it"
check inputs_kept_on_refusal '[ "$(inputs_h)" = "$in_h" ]'
check no_output_on_refusal '[ ! -e "$tmp/run" ]'

# --- 2. a reused output_dir ------------------------------------------------------------------
ok "$train" --config "$y" output_dir="$tmp/ref"                       # uninterrupted reference
ok "$train" --config "$y" save_steps=1 save_total_limit=2              # run A, finished
check run_a_kept '[ -d "$tmp/run/checkpoint-4" ] && [ -d "$tmp/run/checkpoint-5" ] && [ ! -d "$tmp/run/checkpoint-3" ]'
out_h=$(tree_hash "$tmp/run")
expect reused_other_config "belongs to another run (checkpoint-" "$train" --config "$y" seed=6 save_steps=1 save_total_limit=2
expect auto_never_resumes_other "set overwrite_output_dir: true" "$train" --config "$y" seed=6 resume_from_checkpoint=auto
unchanged reused_output_dir_untouched "$tmp/run" "$out_h"
ok "$train" --config "$y" output_dir="$tmp/b" seed=6 max_steps=3 save_steps=1
expect explicit_foreign_checkpoint "checkpoint is of run" "$train" --config "$y" output_dir="$tmp/c" resume_from_checkpoint="$tmp/b/checkpoint-2"
ok "$train" --config "$y" seed=6 max_steps=3 save_steps=1 save_total_limit=5 overwrite_output_dir=true
check overwrite_removed_run_a '[ -d "$tmp/run/checkpoint-2" ] && [ ! -d "$tmp/run/checkpoint-5" ] && [ ! -d "$tmp/run/checkpoint-4" ]'
mkdir -p "$tmp/notours" && echo keep >"$tmp/notours/thesis.tex"
expect output_dir_not_ours "holds no torchless run; refusing to write into it" "$train" --config "$y" output_dir="$tmp/notours"
expect output_dir_is_data "contains the input" "$train" --config "$y" output_dir="$tmp"

# --- 5. faults ---------------------------------------------------------------------------
# Killed during a save (SIGKILL while checkpoint-3 is half written), then restarted.
TORCHLESS_TEST_KILL=save:3 "$train" --config "$y" output_dir="$tmp/k" save_steps=1 >"$tmp/k.log" 2>&1
rc=$?
check killed_in_save '[ $rc -eq 137 ] && ls -a "$tmp/k" | grep -q "^\.checkpoint-3\.partial-" && [ ! -d "$tmp/k/checkpoint-3" ]'
ok "$train" --config "$y" output_dir="$tmp/k" save_steps=1 resume_from_checkpoint=auto
check restart_after_kill_in_save 'grep -q "removed .*\.checkpoint-3\.partial-" "$tmp/ok.out" && grep -q "resumed from $tmp/k/checkpoint-2 at step 2" "$tmp/ok.out"'
check no_partial_left '! ls -a "$tmp/k" | grep -q "partial\|deleting"'
check kill_in_save_same_bytes 'cmp -s "$tmp/k/adapter_model.safetensors" "$tmp/ref/adapter_model.safetensors" && cmp -s "$tmp/k/metrics.jsonl" "$tmp/ref/metrics.jsonl"'
# Killed while pruning (checkpoint-1 renamed aside and half deleted), then restarted.
TORCHLESS_TEST_KILL=prune:0 "$train" --config "$y" output_dir="$tmp/p" save_steps=1 save_total_limit=1 >"$tmp/p.log" 2>&1
rc=$?
check killed_in_prune '[ $rc -eq 137 ] && ls -a "$tmp/p" | grep -q "^\.checkpoint-1\.deleting-" && [ ! -d "$tmp/p/checkpoint-1" ] && [ -d "$tmp/p/checkpoint-2" ]'
ok "$train" --config "$y" output_dir="$tmp/p" save_steps=1 save_total_limit=1 resume_from_checkpoint=auto
check restart_after_kill_in_prune 'grep -q "resumed from $tmp/p/checkpoint-2 at step 2" "$tmp/ok.out" && ! ls -a "$tmp/p" | grep -q "deleting\|partial"'
check kill_in_prune_same_bytes 'cmp -s "$tmp/p/adapter_model.safetensors" "$tmp/ref/adapter_model.safetensors"'
# A write failure (metrics.jsonl on a full disk) ends the run with exit 1 and one line,
# keeping the last good checkpoint, which then resumes.
ok "$train" --config "$y" output_dir="$tmp/f"
rm "$tmp/f/metrics.jsonl" && ln -s /dev/full "$tmp/f/metrics.jsonl"
expect metrics_enospc "metrics.jsonl: cannot append a record: No space left on device" "$train" --config "$y" output_dir="$tmp/f" save_steps=1 logging_steps=2
check enospc_kept_checkpoint '[ -f "$tmp/f/checkpoint-1/trainer_state.json" ] && [ ! -d "$tmp/f/checkpoint-2" ]'
rm "$tmp/f/metrics.jsonl" && : >"$tmp/f/metrics.jsonl"
ok "$train" --config "$y" output_dir="$tmp/f" save_steps=1 logging_steps=2 resume_from_checkpoint=auto
check enospc_resumed 'grep -q "resumed from $tmp/f/checkpoint-1 at step 1" "$tmp/ok.out"'
# A metrics.jsonl shorter than its checkpoint recorded is refused, not padded with NULs.
: >"$tmp/k/metrics.jsonl"
expect metrics_shorter "shorter than the" "$train" --config "$y" output_dir="$tmp/k" save_steps=1 resume_from_checkpoint="$tmp/k/checkpoint-5"
# SIGINT: finishes the step, saves, exits 130 with a message; resuming gives the same bytes.
# The signal arrives when step 2 is done (TORCHLESS_TEST_SIGINT: a real SIGINT, raised at that
# point, so that the run cannot finish first on a fast machine).
TORCHLESS_TEST_SIGINT=2 "$train" --config "$y" output_dir="$tmp/s" >"$tmp/s.log" 2>"$tmp/s.err"
rc=$?
check sigint_exit '[ $rc -eq 130 ] && [ "$(wc -l <"$tmp/s.err")" -eq 1 ] && grep -q "interrupted by SIGINT after step [0-9]; checkpoint saved" "$tmp/s.err"'
step=$(grep -o "after step [0-9]*" "$tmp/s.err" | grep -o "[0-9]*$")
check sigint_checkpoint '[ -n "$step" ] && [ -f "$tmp/s/checkpoint-$step/trainer_state.json" ] && [ ! -f "$tmp/s/adapter_model.safetensors" ]'
ok "$train" --config "$y" output_dir="$tmp/s" resume_from_checkpoint=auto
check sigint_resume_same_bytes 'cmp -s "$tmp/s/adapter_model.safetensors" "$tmp/ref/adapter_model.safetensors" && cmp -s "$tmp/s/metrics.jsonl" "$tmp/ref/metrics.jsonl"'
check no_nul_in_metrics '[ "$(tr -d "\000" <"$tmp/s/metrics.jsonl" | wc -c)" -eq "$(wc -c <"$tmp/s/metrics.jsonl")" ]'
echo "train runs: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
