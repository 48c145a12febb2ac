#!/usr/bin/env bash
# Issue 27: SIGINT or SIGTERM during a data-parallel run. mpirun starts each rank in a process
# group of its own, so a signal reaches the ranks it is sent to (a scheduler signals them all; a
# `kill` may pick one): the ranks agree on it at the next step boundary, rank 0 alone saves
# one checkpoint (no "Directory not empty", no MPI_ABORT), every rank exits 128 + the signal and
# so does mpirun, and resuming with -np 2 gives the uninterrupted run's adapter bytes and its
# whole metrics.jsonl, byte for byte.
#   SIGINT to both ranks → mpirun exits 130;
#   SIGTERM to rank 1 only → rank 0 learns of it at the boundary too, mpirun exits 143.
# usage: ddp_signal.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
source "$(dirname "$0")/mpi.bash"
source "$(dirname "$0")/expect.bash"  # tree_hash
train=$build/torchless-train
write_heal_yaml "$tmp/heal.yaml"
common=(save_steps=0 max_steps=30)
inputs_h() { echo "$(tree_hash "$tmp/heal.yaml") $(tree_hash "$src/data/demo/heal.jsonl") $(tree_hash "$src/models/tiny")"; }
in_h=$(inputs_h)

mpi 2 "$train" --config "$tmp/heal.yaml" output_dir="$tmp/ref" "${common[@]}" >"$tmp/ref.log" 2>&1 ||
  fail "uninterrupted run failed: $(tail -5 "$tmp/ref.log")"

# interrupt OUT SIGNAL RANKS...: a 2-rank run writing to OUT, signalled after its step 3.
interrupt() {
  local out=$1 sig=$2
  shift 2
  mpi 2 "$train" --config "$tmp/heal.yaml" output_dir="$tmp/$out" "${common[@]}" >"$tmp/$out.log" 2>"$tmp/$out.err" &
  local job=$! r pid
  for _ in $(seq 1200); do grep -q "^step 3/30" "$tmp/$out.log" && break; sleep 0.05; done
  for r in "$@"; do
    pid=$(rank_pid "$tmp/$out" "$r")
    [ -n "$pid" ] && kill "-$sig" "$pid" || fail "$out: no rank $r to signal"
  done
  wait "$job"
  status=$?
}
# check_stopped OUT SIGNAL STATUS: one checkpoint, said once, resumed to the reference's bytes.
check_stopped() {
  local out=$1 sig=$2 want=$3 n step
  [ "$status" -eq "$want" ] || fail "$out: mpirun exited $status, wanted $want: $(tail -5 "$tmp/$out.err")"
  n=$(grep -c "torchless-train: interrupted by $sig after step [0-9]*; checkpoint saved" "$tmp/$out.err")
  [ "$n" -eq 1 ] || fail "$out: $n 'interrupted by $sig' lines on stderr, wanted 1: $(cat "$tmp/$out.err")"
  grep -q "MPI_ABORT\|Directory not empty\|rank [01]: " "$tmp/$out.err" && fail "$out: a rank failed: $(cat "$tmp/$out.err")"
  step=$(grep -o "interrupted by $sig after step [0-9]*" "$tmp/$out.err" | grep -o "[0-9]*$")
  [ "$(ls -d "$tmp/$out"/checkpoint-* 2>/dev/null | wc -l)" -eq 1 ] && [ -f "$tmp/$out/checkpoint-$step/trainer_state.json" ] ||
    fail "$out: not exactly checkpoint-$step: $(ls -a "$tmp/$out")"
  ls -a "$tmp/$out" | grep -q "partial\|deleting" && fail "$out: a temporary was left: $(ls -a "$tmp/$out")"
  [ ! -f "$tmp/$out/adapter_model.safetensors" ] || fail "$out: ran to the end (signal too late?)"
  # The checkpoint's metrics length is rank 0's: the lines of the steps done so far.
  [ "$(grep -o '"metrics_bytes": [0-9]*' "$tmp/$out/checkpoint-$step/trainer_state.json" | grep -o '[0-9]*$')" -eq \
    "$(head -n "$step" "$tmp/ref/metrics.jsonl" | wc -c)" ] || fail "$out: the checkpoint's metrics_bytes is not step $step's"
  mpi 2 "$train" --config "$tmp/heal.yaml" output_dir="$tmp/$out" "${common[@]}" resume_from_checkpoint=auto \
    >"$tmp/$out.resumed.log" 2>&1 || fail "$out: resume failed: $(tail -5 "$tmp/$out.resumed.log")"
  grep -q "resumed from $tmp/$out/checkpoint-$step at step $step" "$tmp/$out.resumed.log" ||
    fail "$out: did not resume from checkpoint-$step: $(grep resume "$tmp/$out.resumed.log")"
  cmp -s "$tmp/ref/adapter_model.safetensors" "$tmp/$out/adapter_model.safetensors" ||
    fail "$out: the resumed run's adapter differs from the uninterrupted run's"
  cmp -s "$tmp/ref/metrics.jsonl" "$tmp/$out/metrics.jsonl" ||
    fail "$out: metrics.jsonl differs from the uninterrupted run's ($(wc -l <"$tmp/$out/metrics.jsonl") lines, $(wc -l <"$tmp/ref/metrics.jsonl") wanted)"
  echo "$out: $sig after step $step, mpirun exited $status, resumed to the same bytes"
}

interrupt int_both INT 0 1
check_stopped int_both SIGINT 130
interrupt term_rank1 TERM 1
check_stopped term_rank1 SIGTERM 143
[ "$(inputs_h)" = "$in_h" ] || fail "an input changed"
echo "ddp signal: $fails failed"
[ "$fails" -eq 0 ]
