#!/usr/bin/env bash
# The main job: installs dependencies, builds, and tells a heal's story on the project's tiny
# Gemma-4 (configs/demo-heal.yaml): its parent models/tiny-chat (trained on the heal's chat
# data) is damaged by an upscale and healed with QLoRA by distillation from the parent,
# printing the plan (with the teacher's mode), the parent's held-out level, a progress line
# per logging step and the validation loss and KL to the parent as they fall; the PEFT adapter
# and the report (parent / before / after) land in build/demo-heal/. Also plans the four
# released Gemma 4 configs. configs/demo-heal-ce.yaml heals the same damage with
# cross-entropy only, for comparison.
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
echo "report:   build/demo-heal/report.md (parent / before / after; loss.png, generation.png)"
