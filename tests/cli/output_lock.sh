#!/usr/bin/env bash
# Issue 27, "two writers, one folder": an output folder in use is locked for its writer's life.
# While a torchless-train runs on output_dir, a second train on it (the same config, or another
# one, whose run-identity check raced) and a torchless-merge --force into it are each refused with
# one line naming the running process's pid, their inputs untouched; the running train carries on,
# logs every step once and keeps its checkpoints. A lock dies with its process: after a kill -9
# the folder is usable at once. (The refused commands run under `timeout`: without the lock they
# would train for good.)
# usage: output_lock.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
fails=0 passes=0
source "$(dirname "$0")/expect.bash"
train=$build/torchless-train merge=$build/torchless-merge

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
max_steps: 100000
learning_rate: 1.0e-3
logging_steps: 1
save_steps: 3
save_total_limit: 2
seed: 5
output_dir: $tmp/run
YAML
y=$tmp/heal.yaml
# An adapter to merge, from a one-step run elsewhere.
"$train" --config "$y" max_steps=1 save_steps=0 output_dir="$tmp/adapter" >"$tmp/adapter.log" 2>&1 ||
  { fails=$((fails + 1)); echo "FAIL: the adapter run failed: $(tail -3 "$tmp/adapter.log")"; }
inputs_h() { echo "$(tree_hash "$y") $(tree_hash "$tmp/data.jsonl") $(tree_hash "$src/models/tiny") $(tree_hash "$tmp/adapter")"; }
in_h=$(inputs_h)

# The holder: a long run, stopped with SIGINT at the end.
"$train" --config "$y" >"$tmp/a.log" 2>"$tmp/a.err" &
pid=$!
for _ in $(seq 600); do [ -d "$tmp/run/checkpoint-3" ] && break; sleep 0.05; done
check holder_started '[ -d "$tmp/run/checkpoint-3" ] && kill -0 $pid'
expect second_train_same_config "output_dir $tmp/run is in use by process $pid (torchless-train)" timeout 120 "$train" --config "$y"
expect second_train_other_config "output_dir $tmp/run is in use by process $pid (torchless-train)" \
  timeout 120 "$train" --config "$y" seed=6 overwrite_output_dir=true
expect merge_force_into_running_train "output $tmp/run is in use by process $pid (torchless-train)" \
  "$merge" --base "$src/models/tiny" --adapter "$tmp/adapter" --out "$tmp/run" --force
check inputs_unchanged '[ "$(inputs_h)" = "$in_h" ]'
check holder_still_running 'kill -0 $pid'
kill -INT $pid
wait $pid
rc=$?
check holder_exit_130 '[ $rc -eq 130 ]'
last=$(grep -o '"step":[0-9]*' "$tmp/run/metrics.jsonl" | tail -1 | cut -d: -f2)
# Every step logged exactly once, in order, and the run's checkpoints and record still there.
check metrics_each_step_once '[ -n "$last" ] && diff <(grep -o "\"step\":[0-9]*" "$tmp/run/metrics.jsonl" | cut -d: -f2) <(seq 1 "$last") >/dev/null'
check holder_checkpoint_kept '[ -f "$tmp/run/checkpoint-$last/trainer_state.json" ] && [ -f "$tmp/run/torchless_run.json" ]'
check no_lock_left '[ ! -e "$tmp/run/.torchless.lock" ]'
# The merge is allowed once the run has ended (its folder is ours, --force replaces it).
"$merge" --base "$src/models/tiny" --adapter "$tmp/adapter" --out "$tmp/run" --force >"$tmp/m.log" 2>&1
check merge_after_the_run '[ $? -eq 0 ] && [ -f "$tmp/run/torchless_merge.json" ] && [ ! -e "$tmp/run/.torchless.lock" ]'

# A kill -9 leaves the lock file but not the lock: the next run takes the folder.
"$train" --config "$y" output_dir="$tmp/k" max_steps=40 >"$tmp/k.log" 2>&1 &
pid=$!
for _ in $(seq 600); do [ -d "$tmp/k/checkpoint-3" ] && break; sleep 0.05; done
kill -9 $pid
wait $pid 2>/dev/null
check killed_left_lock_file '[ -f "$tmp/k/.torchless.lock" ]'
"$train" --config "$y" output_dir="$tmp/k" max_steps=40 resume_from_checkpoint=auto >"$tmp/k2.log" 2>&1
check restart_after_kill '[ $? -eq 0 ] && grep -q "resumed from $tmp/k/checkpoint-" "$tmp/k2.log" && [ ! -e "$tmp/k/.torchless.lock" ]'
echo "output lock: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
