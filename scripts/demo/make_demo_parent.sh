#!/usr/bin/env bash
# Reproduces models/tiny-chat, the heal demo's parent: models/tiny (the project's tiny Gemma-4,
# trained on the Jargon File by make_demo_model.sh) fine-tuned in full for 300 steps on the
# demo's chat data, data/demo/heal.jsonl, without the heal's validation split
# (configs/demo-parent.yaml: val_set_size 0.05 and seed 7, as configs/demo-heal.yaml), then
# stored in bf16 as models/tiny is. The heal demo damages this model and heals it back toward
# it, so the parent must know the heal's data: a heal on data its parent never saw fine-tunes
# past the parent and shows nothing about repair. 1m33s on 2 cores; two runs write the same bytes.
# Needs: a build (bash scripts/build.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf build/demo/parent
./build/torchless-train --config configs/demo-parent.yaml
./build/torchless-surgery convert build/demo/parent/model build/demo/tiny-chat-bf16 --dtype bf16 --force
mkdir -p models/tiny-chat
cp build/demo/tiny-chat-bf16/model.safetensors build/demo/tiny-chat-bf16/config.json models/tiny-chat/
cp models/tiny/tokenizer.json models/tiny/tokenizer_config.json models/tiny/chat_template.jinja models/tiny-chat/
echo "models/tiny-chat updated"
