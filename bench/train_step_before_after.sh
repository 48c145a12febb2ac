#!/usr/bin/env bash
# One CPU training step before and after a change, beside the peer, in one run: the same
# bench/train_step.cpp built from two commits (BEFORE: the older build folder; this checkout's
# build/ is "after"), and transformers + PEFT under bf16 autocast (the peer's fastest mode on
# these models in every earlier run), taken in turn per shape so that all three see the same
# machine. Prints each run's JSON line, then one table of tokens/s and the ratios.
#   BEFORE=/path/to/old/checkout/build PYTHON=/venv/bin/python bash bench/train_step_before_after.sh
# Shapes: bench/larger-model.json and bench/e2b-model.json at 256 tokens × 4 rows and
# 1024 tokens × 1 row, bf16 QLoRA for torchless (NF4 projections, bf16 products).
# STEPS timed steps per run (default 3; E2B_STEPS for the E2B-shaped model, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
before=${BEFORE:?BEFORE=the build folder of the older commit (with bench/bench_train_step)}
py=${PYTHON:-python3} steps=${STEPS:-3} e2b_steps=${E2B_STEPS:-2}
[ -x "$before/bench/bench_train_step" ] || { echo "no $before/bench/bench_train_step: build it there first" >&2; exit 2; }
for m in larger e2b; do
  ./build/torchless-surgery init "bench/$m-model.json" "build/bench-$m" --seed 1 --copy-from models/tiny --force >/dev/null
done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for shape in "build/bench-larger 256 4" "build/bench-larger 1024 1" "build/bench-e2b 256 4" "build/bench-e2b 1024 1"; do
  read -r m s rows <<<"$shape"
  n=$steps
  [ "$m" = build/bench-e2b ] && n=$e2b_steps
  echo "{\"shape\": \"$m $s x $rows\"}" >>"$out"
  "$before/bench/bench_train_step" "$m" "$s" "$rows" "$n" bf16 qlora | sed 's/^{/{"which":"before",/' | tee -a "$out"
  ./build/bench/bench_train_step "$m" "$s" "$rows" "$n" bf16 qlora | sed 's/^{/{"which":"after",/' | tee -a "$out"
  "$py" bench/peer_train_step.py "$m" "$s" "$rows" "$n" bf16 lora 2>/dev/null | tail -1 | sed 's/^{/{"which":"peer",/' |
    tee -a "$out"
done
"$py" - "$out" <<'PY'
import json, sys
rows, cur = [], None
for line in open(sys.argv[1]):
    if not line.strip():
        continue
    j = json.loads(line)
    if "shape" in j:
        cur = {"shape": j["shape"]}
        rows.append(cur)
    else:
        cur[j["which"]] = j
print("\n| shape | before tokens/s | after tokens/s | peer bf16 autocast | before / peer | after / peer | after / before |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    b, a, p = (r.get(k, {}).get("tokens_per_s") for k in ("before", "after", "peer"))
    ratio = lambda x, y: f"{x / y:.2f}x" if x and y else "n/a"
    fmt = lambda x: f"{x:,.0f}" if x else "n/a"
    print(f"| {r['shape']} | {fmt(b)} | {fmt(a)} | {fmt(p)} | {ratio(b, p)} | **{ratio(a, p)}** | {ratio(a, b)} |")
PY
