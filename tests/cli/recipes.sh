#!/usr/bin/env bash
# Each full-scale recipe in configs/ plans without weights (the released configs in shared/).
# usage: recipes.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
fails=0
check() {  # recipe, expected text in the "after" plan
  local out
  out=$("$build/torchless-surgery" plan --recipe "$src/configs/$1" 2>&1) || { echo "FAIL $1: $out"; fails=$((fails + 1)); return; }
  grep -qF -- "$2" <<<"$(sed -n '/^after/,$p' <<<"$out")" || { echo "FAIL $1: no '$2' in:"; echo "$out"; fails=$((fails + 1)); }
}
check recipe-31b-duplicate.yaml "layers            68 (56 sliding, 12 full; 0 KV-shared)"
check recipe-26b-prune.yaml "experts           109 (top 8, width 704)"
check recipe-e4b-upscale.yaml "layers            66 (55 sliding, 11 full; 32 KV-shared)"
check recipe-e4b-upscale.yaml "per-layer embeddings        4559115520"
# A recipe and the equivalent flags make the same checkpoint, byte for byte.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'operation: expand\nduplicate: [0, 2]\nidentity_mode: zero-out\n' >"$tmp/r.yaml"
"$build/torchless-surgery" expand "$src/models/tiny" "$tmp/a" --recipe "$tmp/r.yaml" >/dev/null &&
  "$build/torchless-surgery" expand "$src/models/tiny" "$tmp/b" --duplicate 0:2 --identity-mode zero-out >/dev/null &&
  cmp -s "$tmp/a/model.safetensors" "$tmp/b/model.safetensors" && cmp -s "$tmp/a/config.json" "$tmp/b/config.json" ||
  { echo "FAIL: --recipe and --duplicate differ"; fails=$((fails + 1)); }
# The published §2 slices move KV-shared layers 24–33 in front of non-shared ones: refused, saying why.
source "$src/tests/cli/expect.bash"
passes=0
sed -e 's/^slices: .*/slices: "0:18,10:26,18:34,26:42"/' \
  -e "s|^base_config: |base_config: $(cd "$src" && pwd)/configs/|" "$src/configs/recipe-e4b-upscale.yaml" >"$tmp/published.yaml"
expect published-slices "output layer 32 copies layer 24, which is KV-shared" \
  "$build/torchless-surgery" plan --recipe "$tmp/published.yaml"
echo "recipes: $((6 - fails)) of 6 passed"
[ "$fails" -eq 0 ]
