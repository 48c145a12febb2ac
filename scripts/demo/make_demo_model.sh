#!/usr/bin/env bash
# Reproduces models/tiny/model.safetensors: a 2.4M-parameter Gemma-4 (E2B-shaped: per-layer
# embeddings, KV sharing, double-wide MLP, sliding + full attention) trained from scratch by
# torchless itself (adapter: full) on the Jargon File (public domain, Debian jargon-text),
# with the project's own tokenizer (models/tiny/tokenizer.json). Layers: sliding ×3, full |
# sliding, full (2 KV-shared): the layers with their own K/V end "sliding, full" as in the
# released E2B/E4B, the one layout where llama.cpp's choice of K/V source agrees with
# transformers' (train/surgery/llama_cpp.h). 3000 steps of one 256-token row (configs/demo-pretrain.yaml),
# so that greedy decoding does not loop; about 25 minutes on 2 busy cores.
# Needs: a build (bash scripts/build.sh), apt-get download, python3 (standard library only).
set -euo pipefail
# One OpenMP thread: on a shared machine two spin-waiting threads ran 10-20x slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
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
