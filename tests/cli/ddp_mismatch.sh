#!/usr/bin/env bash
# Ranks that would train on different configs, data or base models are refused at start-up
# with a message naming the rank and what differs (issue 11, acceptance 4). mpirun's MPMD
# form gives each rank its own command line.
# usage: ddp_mismatch.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
source "$(dirname "$0")/mpi.bash"
train=$build/torchless-train
# Two directories with byte-identical configs whose relative paths resolve to each
# directory's own data file and model.
for d in a b; do
  mkdir -p "$tmp/$d"
  cp -r "$src/models/tiny" "$tmp/$d/model"
  head -50 "$src/data/demo/heal.jsonl" >"$tmp/$d/heal.jsonl"
  cat >"$tmp/$d/heal.yaml" <<YAML
base_model: model
datasets:
  - path: heal.jsonl
    type: chat
sequence_len: 64
max_steps: 1
output_dir: $tmp/out
YAML
done

refused() {  # NAME NEEDLE (rank 0's command) -- (rank 1's command)
  local name=$1 needle=$2
  shift 2
  local i
  for ((i = 1; i <= $#; i++)); do [ "${!i}" = -- ] && break; done
  local r0=("${@:1:i-1}") r1=("${@:i+1}")
  local t=$(date +%s)
  mpirun --oversubscribe -x OMP_NUM_THREADS=1 -np 1 "${r0[@]}" : -np 1 "${r1[@]}" >"$tmp/$name.out" 2>"$tmp/$name.err"
  local rc=$?
  local n
  n=$(grep -c "^torchless-train:" "$tmp/$name.err")
  if [ "$rc" -ne 0 ] && [ "$n" -eq 1 ] && grep -qF -- "$needle" "$tmp/$name.err" && [ ! -e "$tmp/out/adapter_model.safetensors" ]; then
    echo "ok   $name ($(($(date +%s) - t)) s): $(grep '^torchless-train:' "$tmp/$name.err")"
  else
    fail "$name: exit $rc, $n torchless-train lines, wanted '$needle':"
    sed 's/^/    /' "$tmp/$name.err" | head -20
  fi
}

refused config "rank 1: config ($tmp/a/heal.yaml and its overrides) differs from rank 0's" \
  "$train" --config "$tmp/a/heal.yaml" -- "$train" --config "$tmp/a/heal.yaml" learning_rate=1e-3
echo '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "changed"}]}' >>"$tmp/b/heal.jsonl"
refused data "rank 1: data file 1 ($tmp/a/heal.jsonl) differs from rank 0's" \
  "$train" --config "$tmp/a/heal.yaml" -- "$train" --config "$tmp/b/heal.yaml"
cp "$tmp/a/heal.jsonl" "$tmp/b/heal.jsonl"
echo " " >>"$tmp/b/model/config.json"
refused base "rank 1: base checkpoint index of $tmp/a/model differs from rank 0's" \
  "$train" --config "$tmp/a/heal.yaml" -- "$train" --config "$tmp/b/heal.yaml"
# The same pair with nothing changed starts and trains.
cp "$tmp/a/model/config.json" "$tmp/b/model/config.json"
mpirun --oversubscribe -x OMP_NUM_THREADS=1 -np 1 "$train" --config "$tmp/a/heal.yaml" : \
  -np 1 "$train" --config "$tmp/b/heal.yaml" >"$tmp/same.out" 2>&1 || fail "identical ranks refused: $(tail -3 "$tmp/same.out")"
echo "ddp mismatch: $fails failed"
[ "$fails" -eq 0 ]
