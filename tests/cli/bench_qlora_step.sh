#!/usr/bin/env bash
# The QLoRA step bench that scripts/gpu-check.sh runs on the GPU, here on the CPU backend: the
# same code path (the trainer's backend choice, TimedOps' table by op family) on models/tiny
# cut to 2 layers. Its JSON line holds tokens/s, the measured and planned peaks and the op
# table, whose families' seconds add up to the total; bad arguments exit 2.
# usage: bench_qlora_step.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
fails=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL $*"; fails=$((fails + 1)); }

bench=$build/bench/bench_qlora_step
if ! "$bench" --config "$src/models/tiny/config.json" --layers 2 --seq 64 --steps 2 --backend cpu >"$tmp/out" 2>"$tmp/err"; then
  fail "bench exited $?:"; cat "$tmp/err"
else
  python3 - "$tmp/out" <<'PY' || fails=$((fails + 1))
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
assert r["impl"] == "torchless-cpu" and r["layers"] == 2 and r["full_layers"] == 6 and r["seq"] == 64, r
assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["planned_peak_bytes"] > 0, r
ops = r["ops"]
fam = {f["family"]: f for f in ops["by_family"]}
for f in ("nf4 matmul", "matmul", "attention", "norm", "rope", "loss", "optimizer", "elementwise"):
    assert fam.get(f, {}).get("calls", 0) > 0, (f, fam.keys())
assert abs(sum(f["seconds"] for f in ops["by_family"]) - ops["seconds"]) < 1e-9
assert sum(f["calls"] for f in ops["by_family"]) == ops["calls"] == sum(o["calls"] for o in ops["by_op"])
PY
  grep -q "^nf4 matmul " "$tmp/err" || fail "no family table on stderr: $(cat "$tmp/err")"
fi
"$bench" --config "$src/models/tiny/config.json" --layers 7 >/dev/null 2>"$tmp/err"
rc=$?
[ $rc -eq 2 ] && grep -q "at most the config's 6" "$tmp/err" || fail "--layers 7: exit $rc: $(cat "$tmp/err")"
"$bench" --layers 2 >/dev/null 2>&1
[ $? -eq 2 ] || fail "no --config: not exit 2"
[ "$fails" -eq 0 ] && echo "bench_qlora_step: ok"
[ "$fails" -eq 0 ]
