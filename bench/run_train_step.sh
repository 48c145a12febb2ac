#!/usr/bin/env bash
# The CPU training step, torchless beside transformers + PEFT (the peer) on the same
# checkpoints in one run: 4 rows × 256 tokens, LoRA r 16 on every projection, gradient
# checkpointing, AdamW (bench/train_step.cpp, bench/peer_train_step.py). Prints each run's
# JSON line, then one table: tokens/s, useful GFLOP/s against the measured GEMM peak
# (bench/gemm_peak.cpp), and the ratios to the peer's best.
#   bash bench/run_train_step.sh [MODEL_DIR ...]
# Default models: models/tiny, bench/larger-model.json (8 layers, hidden 512) and
# bench/e2b-model.json (5 layers at E2B's hidden 1536 and vocab 262,144), initialised
# into build/. PYTHON: an interpreter with scripts/golden/requirements.txt (default python3).
# STEPS timed steps per run (default 5; E2B_STEPS for the E2B-shaped model, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3} steps=${STEPS:-5} e2b_steps=${E2B_STEPS:-2}
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  for m in larger e2b; do
    cfg=bench/$m-model.json
    ./build/torchless-surgery init "$cfg" "build/bench-$m" --seed 1 --copy-from models/tiny --force >/dev/null
  done
  models=(models/tiny build/bench-larger build/bench-e2b)
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
peak=$(./build/bench/bench_gemm_peak)
echo "$peak" | tee -a "$out"
native_bf16=$("$py" -c 'import json,sys; print(int(json.loads(sys.argv[1])["bf16_gflop_per_s"] is not None))' "$peak")
for m in "${models[@]}"; do
  n=$steps
  [ "$m" = build/bench-e2b ] && n=$e2b_steps
  runs=("f32 qlora" "f32 lora")
  [ "$native_bf16" = 1 ] && runs=("bf16 qlora" "bf16 lora" "f32 qlora")
  for r in "${runs[@]}"; do
    # shellcheck disable=SC2086 # two words by design
    ./build/bench/bench_train_step "$m" 256 4 "$n" $r | tee -a "$out"
  done
  for r in "fp32 lora" "bf16 lora" "fp32 qlora"; do
    # shellcheck disable=SC2086
    "$py" bench/peer_train_step.py "$m" 256 4 "$n" $r 2>/dev/null | tail -1 | tee -a "$out"
  done
done
"$py" - "$out" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
peak = lines[0]
best_peak = peak["bf16_gflop_per_s"] or peak["f32_gflop_per_s"]
print(f"\nGEMM peak ({peak['isa']}, {peak['shape']}): fp32 {peak['f32_gflop_per_s']:.0f} GFLOP/s, "
      + (f"bf16 {peak['bf16_gflop_per_s']:.0f} GFLOP/s" if peak["bf16_gflop_per_s"] else
         "bf16: no bf16 instructions (torchless' bf16 runs the fp32 path; the peer's autocast emulates)"))
models = list(dict.fromkeys(l["model"] for l in lines[1:]))
print("\n| model | run | tokens/s | useful GFLOP/s (% of peak) | peak RSS MiB |\n|---|---|---|---|---|")
for m in models:
    ours = [l for l in lines[1:] if l["model"] == m and l["impl"] == "torchless"]
    peer = [l for l in lines[1:] if l["model"] == m and l["impl"] != "torchless"]
    for l in ours:
        g = l["useful_gflop_per_s"]
        print(f"| {m} | torchless {l['matmul']} {l['adapter']} | {l['tokens_per_s']:,.0f} | "
              f"{g:.1f} ({100 * g / best_peak:.0f}%) | {l['peak_rss_mib']:,.0f} |")
    for l in peer:
        name = f"peer {l['precision']}{' autocast' if l['precision'] == 'bf16' else ''} {l['adapter']}"
        if "error" in l:
            print(f"| {m} | {name} | not run: {l['error']} | | |")
        else:
            # The same model and tokens: useful FLOPs per token are the same as ours.
            g = ours[0]["useful_gflop_per_s"] / ours[0]["tokens_per_s"] * l["tokens_per_s"] if ours else 0
            print(f"| {m} | {name} | {l['tokens_per_s']:,.0f} | {g:.1f} ({100 * g / best_peak:.0f}%) | "
                  f"{l['peak_rss_mib']:,.0f} |")
    ok = [l for l in peer if "error" not in l]
    if ours and ok:
        a, b = max(ours, key=lambda l: l["tokens_per_s"]), max(ok, key=lambda l: l["tokens_per_s"])
        rss = min(l["peak_rss_mib"] for l in ok)
        print(f"| {m} | **ratio**: torchless' best / peer's best | **{a['tokens_per_s'] / b['tokens_per_s']:.2f}x** | | "
              f"**{a['peak_rss_mib'] / rss:.2f}x** of the peer's smallest |")
PY
