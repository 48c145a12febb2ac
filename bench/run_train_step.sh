#!/usr/bin/env bash
# Runs the training-step benchmark for torchless and for transformers+PEFT (the peer) on the
# same checkpoints in the same run, and prints the ratios. The peer needs the Python packages
# of scripts/golden/requirements.txt; PYTHON selects the interpreter (default python3).
#   bash bench/run_train_step.sh [MODEL_DIR ...]     (default: models/tiny and a larger init)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  ./build/torchless-surgery init bench/larger-model.json build/bench-larger --seed 1 --copy-from models/tiny --force >/dev/null
  models=(models/tiny build/bench-larger)
fi
for m in "${models[@]}"; do
  ours=$(./build/bench/bench_train_step "$m" 256 4 5 f32)
  ours16=$(./build/bench/bench_train_step "$m" 256 4 5 bf16)
  peer=$("$py" bench/peer_train_step.py "$m" 256 4 5 2>/dev/null | tail -1)
  echo "$ours"
  echo "$ours16"
  echo "$peer"
  "$py" - "$ours" "$ours16" "$peer" <<'PY'
import json, sys
a, a16, b = (json.loads(x) for x in sys.argv[1:4])
for ours in (a, a16):
    print(f"{ours['model']} (torchless matmul {ours['matmul']}): tokens/s torchless/peer = "
          f"{ours['tokens_per_s'] / b['tokens_per_s']:.2f}x, peak RSS torchless/peer = "
          f"{ours['peak_rss_mib'] / b['peak_rss_mib']:.2f}x")
PY
done
