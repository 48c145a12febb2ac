#!/usr/bin/env bash
# The main job, until the trainer lands: installs dependencies, builds, plans the four
# released Gemma 4 configs, and runs the forward pass of the tiny E2B-shaped model on the
# CPU next to transformers' recorded logits and loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
models=../shared/models
if [ -d "$models" ]; then
  ./build/torchless-surgery plan "$models"/gemma-4-*/config.json
fi
for v in e2b e4b dense_kv moe; do
  ./build/torchless-forward --model tests/golden/$v --input tests/golden/$v/forward.safetensors
done
