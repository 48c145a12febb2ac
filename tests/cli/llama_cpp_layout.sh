#!/usr/bin/env bash
# torchless-surgery knows llama.cpp's KV-sharing rule (train/surgery/llama_cpp.h): check passes the four
# released layouts and the tiny model, and flags a layout made for the purpose (the tiny model's
# shape with its own-K/V layers ending "full, sliding", which transformers runs and llama.cpp
# cannot); upscale and expand report the layout they write and, with --require-llama-cpp,
# refuse one llama.cpp cannot run.
# usage: llama_cpp_layout.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
source "$src/tests/cli/expect.bash"
passes=0 fails=0
ok() { passes=$((passes + 1)); }
bad() { echo "FAIL $*"; fails=$((fails + 1)); }
s="$build/torchless-surgery"

for m in gemma-4-E2B-it gemma-4-E4B-it gemma-4-31B-it gemma-4-26B-A4B-it; do
  cfg="$src/configs/models/$m/config.json"
  out=$("$s" check --require-llama-cpp "$cfg" 2>&1) && grep -q "llama.cpp: KV-sharing layout runnable" <<<"$out" && ok ||
    bad "released $m: $out"
done
out=$("$s" check --require-llama-cpp "$src/models/tiny" 2>&1) &&
  grep -q "layers 4-5 share K/V; layer 2 is sliding_attention, layer 3 is full_attention" <<<"$out" && ok || bad "tiny: $out"

# Made for the purpose: layers sliding, sliding, full, sliding | sliding, full (2 KV-shared). The
# shared sliding layer 4 reads layer 3 in transformers; llama.cpp would make it read layer 2.
sed -e 's/"sliding_attention", "sliding_attention", "sliding_attention",/"sliding_attention", "sliding_attention", "full_attention",/' \
  -e 's/"full_attention", "sliding_attention", "full_attention"\]/"sliding_attention", "sliding_attention", "full_attention"]/' \
  "$src/configs/demo-model.json" >"$tmp/bad.json"
"$s" init "$tmp/bad.json" "$tmp/bad" --seed 3 >"$tmp/init.log" 2>&1 || bad "init: $(cat "$tmp/init.log")"
grep -q "llama.cpp: cannot run" "$tmp/init.log" && ok || bad "init summary: $(cat "$tmp/init.log")"
want="KV-shared layer 4 (sliding_attention) reads layer 3 in transformers but layer 2 (full_attention) in llama.cpp"
out=$("$s" check "$tmp/bad" 2>&1) && grep -qF "llama.cpp: cannot run this KV-sharing layout: $want" <<<"$out" &&
  grep -qF "the last of those must be full_attention with a sliding_attention layer before it" <<<"$out" && ok ||
  bad "check on the made-up layout (exit 0, flagged): $out"
expect check-require "$want" "$s" check --require-llama-cpp "$tmp/bad"

# upscale: 0:4,3:4,4:6 makes own-K/V layers s,s,s,f,f: the shared sliding layer reads layer 2, llama.cpp layer 3.
out=$("$s" upscale "$src/models/tiny" "$tmp/up" --slices 0:4,3:4,4:6 2>&1) &&
  grep -qF "llama.cpp: cannot run this KV-sharing layout: KV-shared layer 5 (sliding_attention) reads layer 2" <<<"$out" &&
  ok || bad "upscale summary: $out"
expect upscale-require "KV-shared layer 5 (sliding_attention) reads layer 2" \
  "$s" upscale "$src/models/tiny" "$tmp/up2" --slices 0:4,3:4,4:6 --require-llama-cpp
[ ! -e "$tmp/up2" ] && ok || bad "a refused upscale wrote $tmp/up2"
out=$("$s" upscale "$src/models/tiny" "$tmp/up3" --slices 0:4,1:4,4:6 --require-llama-cpp 2>&1) &&
  grep -q "llama.cpp: KV-sharing layout runnable" <<<"$out" && ok || bad "runnable upscale: $out"
# expand keeps the K/V producers, so a runnable model stays runnable.
out=$("$s" expand "$src/models/tiny" "$tmp/ex" --duplicate 0:2 --require-llama-cpp 2>&1) &&
  grep -q "llama.cpp: KV-sharing layout runnable (layers 6-7 share K/V" <<<"$out" && ok || bad "expand: $out"

echo "llama_cpp_layout: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
