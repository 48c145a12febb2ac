#!/usr/bin/env bash
# A rank that dies or hangs ends the whole mpirun job within a bounded time, naming the
# rank (issue 11, acceptance 3):
#   SIGKILL of rank 1 mid-run: the job ends within 60 s, the message names rank 1, the last
#     checkpoint is intact, and resuming with -np 2 gives the uninterrupted run's adapter bytes;
#   SIGSTOP of rank 1 (a hang): rank 0's collective times out after ddp_timeout (5 s here)
#     and it ends the job naming itself and the collective.
# usage: ddp_failure.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
source "$(dirname "$0")/mpi.bash"
train=$build/torchless-train
write_heal_yaml "$tmp/heal.yaml"
common=(save_steps=4 max_steps=24)

# Starts a 2-rank run in the background, waits for OUT/checkpoint-STEP, signals rank 1 and
# measures how long the job takes to end. Sets $elapsed and $status.
interrupt() {
  local out=$1 step=$2 sig=$3
  shift 3
  mpi 2 "$train" --config "$tmp/heal.yaml" output_dir="$tmp/$out" "${common[@]}" "$@" >"$tmp/$out.log" 2>&1 &
  local job=$! pid="" t
  for _ in $(seq 600); do
    [ -d "$tmp/$out/checkpoint-$step" ] && break
    sleep 0.1
  done
  pid=$(rank_pid "$tmp/$out" 1)
  if [ -z "$pid" ] || [ -f "$tmp/$out/adapter_model.safetensors" ]; then
    fail "$out: could not signal rank 1 mid-run (pid '$pid'); log: $(tail -3 "$tmp/$out.log")"
  fi
  t=$(date +%s)
  kill "-$sig" "$pid"
  wait "$job"
  status=$?
  elapsed=$(($(date +%s) - t))
  [ "$sig" = STOP ] && kill -KILL "$pid" 2>/dev/null
}

mpi 2 "$train" --config "$tmp/heal.yaml" output_dir="$tmp/ref" "${common[@]}" >"$tmp/ref.log" 2>&1 ||
  fail "uninterrupted run failed: $(tail -5 "$tmp/ref.log")"

interrupt killed 8 KILL
echo "SIGKILL of rank 1: job ended after ${elapsed} s with status $status"
[ "$status" -ne 0 ] || fail "killed run exited 0"
[ "$elapsed" -le 60 ] || fail "killed run took $elapsed s to end (limit 60)"
grep -m1 "rank 1" "$tmp/killed.log" || fail "no message names rank 1: $(tail -5 "$tmp/killed.log")"
last=$(ls -d "$tmp"/killed/checkpoint-* | grep -E 'checkpoint-[0-9]+$' | sort -t- -k2 -n | tail -1)
for f in adapter_model.safetensors adapter_config.json optimizer.safetensors trainer_state.json; do
  [ -s "$last/$f" ] || fail "last checkpoint $last lacks $f"
done
mpi 2 "$train" --config "$tmp/heal.yaml" output_dir="$tmp/killed" "${common[@]}" resume_from_checkpoint=auto \
  >"$tmp/resumed.log" 2>&1 || fail "resume failed: $(tail -5 "$tmp/resumed.log")"
grep -q "resumed from $last" "$tmp/resumed.log" || fail "did not resume from $last: $(grep resume "$tmp/resumed.log")"
cmp -s "$tmp/ref/adapter_model.safetensors" "$tmp/killed/adapter_model.safetensors" ||
  fail "resumed run's final adapter differs from the uninterrupted run's"
diff <(fingerprints "$tmp/ref/metrics.jsonl") <(fingerprints "$tmp/killed/metrics.jsonl") >/dev/null ||
  fail "resumed run's per-step weights differ from the uninterrupted run's"

interrupt hung 4 STOP ddp_timeout=5
echo "SIGSTOP of rank 1: job ended after ${elapsed} s with status $status"
[ "$status" -ne 0 ] || fail "hung run exited 0"
[ "$elapsed" -le 30 ] || fail "hung run took $elapsed s to end (ddp_timeout 5)"
grep -m1 "rank 0: .* did not complete within 5 s" "$tmp/hung.log" ||
  fail "no timeout message from rank 0: $(tail -5 "$tmp/hung.log")"
echo "ddp failure: $fails failed"
[ "$fails" -eq 0 ]
