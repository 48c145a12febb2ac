#!/usr/bin/env bash
# The main job: installs dependencies, builds, and heals the project's tiny Gemma-4 model
# (models/tiny) with QLoRA on chat data (configs/demo-heal.yaml), printing the plan, a
# progress line per logging step and the validation loss as it falls; the PEFT adapter
# lands in build/demo-heal/. Also plans the four released Gemma 4 configs.
# Arguments are key=value overrides for the heal (e.g. max_steps=20, as CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
./build/torchless-surgery plan configs/models/gemma-4-*/config.json
rm -rf build/demo-heal
./build/torchless-train --config configs/demo-heal.yaml "$@"
echo
echo "metrics:  build/demo-heal/metrics.jsonl"
echo "adapter:  build/demo-heal/adapter_config.json, build/demo-heal/adapter_model.safetensors"
echo "report:   build/demo-heal/report.md (loss.png, generation.png)"
