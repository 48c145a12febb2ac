#!/usr/bin/env bash
# Reproduces models/tiny/model.safetensors: a 2.4M-parameter Gemma-4 (E2B-shaped: per-layer
# embeddings, KV sharing, double-wide MLP, sliding + full attention) trained from scratch by
# torchless itself (adapter: full) on the Jargon File (public domain, Debian jargon-text),
# with the project's own tokenizer (models/tiny/tokenizer.json).
# Needs: a build (bash scripts/build.sh), apt-get download, python3 (standard library only).
set -euo pipefail
cd "$(dirname "$0")/../.."
work=build/demo
mkdir -p "$work"
if [ ! -f "$work/jargon/usr/share/doc/jargon-text/jargon.txt.gz" ]; then
  (cd "$work" && apt-get download jargon-text && dpkg-deb -x jargon-text_*.deb jargon)
fi
python3 scripts/demo/make_demo_data.py "$work/jargon/usr/share/doc/jargon-text/jargon.txt.gz" "$work"
./build/torchless-surgery init configs/demo-model.json "$work/init" --seed 1 --copy-from models/tiny --force
rm -rf "$work/pretrain"
./build/torchless-train --config configs/demo-pretrain.yaml
./build/torchless-surgery convert "$work/pretrain/model" "$work/tiny-bf16" --dtype bf16 --force
cp "$work/tiny-bf16/model.safetensors" "$work/tiny-bf16/config.json" models/tiny/
echo "models/tiny updated"
