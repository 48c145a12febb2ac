#!/usr/bin/env bash
# recipes.md §2 end to end on the project's tiny model: upscale (6 → 9 layers, PLE widened),
# a short QLoRA heal with the before/after generation check, the merge, and a check that
# the merged checkpoint is complete and has the upscaled shape.
# usage: upscale_heal_merge.sh BUILD_DIR SOURCE_DIR
set -eu
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
"$build/torchless-surgery" upscale "$src/models/tiny" "$tmp/up" --slices 0:4,1:4,4:6 >"$tmp/upscale.log"
grep -q '"num_hidden_layers": 9' "$tmp/up/config.json" || fail "upscaled config: $(cat "$tmp/up/config.json")"
grep -q '"num_kv_shared_layers": 2' "$tmp/up/config.json" || fail "KV-shared tail not kept"
"$build/torchless-train" --config "$src/configs/demo-heal.yaml" upscale_from= upscale_slices= base_model="$tmp/up" output_dir="$tmp/heal" \
  max_steps=4 eval_steps=2 save_steps=0 eval_table_size=2 eval_max_new_tokens=16 >"$tmp/train.log" 2>&1 ||
  fail "train: $(tail -3 "$tmp/train.log")"
grep -q "^step 0/4 | measures | generation rep-4 .* loops " "$tmp/train.log" || fail "no generation check before training"
grep -q "^step 2/4 | measures | generation rep-4 " "$tmp/train.log" || fail "no generation check at eval_steps"
grep -q "^step 4/4 | measures | generation rep-4 " "$tmp/train.log" || fail "no generation check after training"
for f in report.md report.json loss.png generation.png; do [ -s "$tmp/heal/$f" ] || fail "heal report: no $f"; done
[ "$(head -c 4 "$tmp/heal/loss.png" | tail -c 3)" = PNG ] || fail "loss.png is not a PNG"
grep -q "| loop fraction |" "$tmp/heal/report.md" || fail "report.md: no loop fraction row"
grep -q "generation rep-4 [0-9.]* → [0-9.]*" "$tmp/train.log" || fail "no before → after summary"
[ "$(grep -c '"step":0' "$tmp/heal/generations.jsonl")" -eq 2 ] || fail "generations.jsonl: want 2 records at step 0"
[ "$(grep -c '"step":2' "$tmp/heal/generations.jsonl")" -eq 2 ] || fail "generations.jsonl: want 2 records at step 2"
[ "$(grep -c '"step":4' "$tmp/heal/generations.jsonl")" -eq 2 ] || fail "generations.jsonl: want 2 records at step 4"
"$build/torchless-merge" --base "$tmp/up" --adapter "$tmp/heal" --out "$tmp/merged" >"$tmp/merge.log" ||
  fail "merge: $(cat "$tmp/merge.log")"
"$build/torchless-surgery" check "$tmp/merged" >"$tmp/check.log" || fail "check: $(cat "$tmp/check.log")"
grep -q '"num_hidden_layers": 9' "$tmp/merged/config.json" || fail "merged config lost the upscale"
for f in tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$tmp/merged/$f" ] || fail "merged checkpoint lacks $f"
done
echo "upscale → heal → merge: ok ($(grep -o 'generation rep-4 [0-9.]* → [0-9.]*' "$tmp/train.log"))"
