#!/usr/bin/env bash
# Every malformed input is refused by the command line tools with exactly one line on
# stderr that names the file and the fault, exit status 1, and no crash.
# usage: malformed_inputs.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0 passes=0

# mk FILE HEADER DATA_BYTES [DECLARED_HEADER_LEN]: a safetensors file from a header string.
mk() {
  local f=$1 hdr=$2 n=${4:-${#2}}
  printf "$(printf '\\x%02x' $((n & 255)) $(((n >> 8) & 255)) $(((n >> 16) & 255)) $(((n >> 24) & 255)) 0 0 0 0)" >"$f"
  printf '%s' "$hdr" >>"$f"
  head -c "$3" /dev/zero >>"$f"
}

source "$(dirname "$0")/expect.bash"

case_dir() {  # a checkpoint directory with a valid config and the given model.safetensors
  local d=$tmp/$1
  mkdir -p "$d"
  cp "$src/tests/golden/dense_kv/config.json" "$d/"
  echo "$d"
}

surgery=$build/torchless-surgery
good='{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}'

d=$(case_dir truncated); mk "$d/model.safetensors" "$good" 8
expect truncated "model.safetensors" "$surgery" check "$d"

d=$(case_dir tiny); printf 'abc' >"$d/model.safetensors"
expect shorter_than_8_bytes "model.safetensors" "$surgery" check "$d"

d=$(case_dir hdrlen); mk "$d/model.safetensors" "$good" 16 5000
expect header_past_end "model.safetensors" "$surgery" check "$d"

d=$(case_dir badjson); mk "$d/model.safetensors" '{"a":{"dtype":"F32",' 0
expect bad_json "model.safetensors" "$surgery" check "$d"

d=$(case_dir dtype); mk "$d/model.safetensors" '{"a":{"dtype":"Q4","shape":[2,2],"data_offsets":[0,16]}}' 16
expect unknown_dtype "Q4" "$surgery" check "$d"

d=$(case_dir overlap)
mk "$d/model.safetensors" '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}' 12
expect overlapping_offsets "model.safetensors" "$surgery" check "$d"

d=$(case_dir mismatch); mk "$d/model.safetensors" '{"a":{"dtype":"F32","shape":[3,2],"data_offsets":[0,16]}}' 16
expect offsets_do_not_match_shape 'tensor "a": shape [3, 2] of F32 needs 24 bytes' "$surgery" check "$d"

d=$(case_dir shard)
cp "$src/tests/golden/e4b_sharded/"* "$d/" && rm "$d/model-00003-of-00008.safetensors"
expect missing_shard "model-00003-of-00008.safetensors" "$surgery" check "$d"

d=$(case_dir badindex); printf '{"weight_map": ' >"$d/model.safetensors.index.json"
expect bad_index_json "model.safetensors.index.json" "$surgery" check "$d"

d=$(case_dir noweights)
expect no_weights "$d" "$surgery" check "$d"

d=$(case_dir missing_tensor)
mk "$d/model.safetensors" '{"model.embed_tokens.weight":{"dtype":"F32","shape":[512,64],"data_offsets":[0,131072]}}' 131072
expect missing_tensor "missing tensor 'model.norm.weight'" "$surgery" check "$d"

d=$(case_dir badconfig); echo '{"model_type": "gemma4_text", "hidden_size": 64' >"$d/config.json"
expect bad_config_json "config.json: invalid JSON" "$surgery" check "$d"

d=$(case_dir layertypes)
sed 's/"num_hidden_layers": 6/"num_hidden_layers": 7/' "$src/tests/golden/dense_kv/config.json" >"$d/config.json"
expect layer_types_length "layer_types has 6 entries but num_hidden_layers is 7" "$surgery" plan "$d"

expect no_such_dir "no such file or directory" "$surgery" plan "$tmp/nothing-here"
expect convert_into_existing "output directory exists" "$surgery" convert "$src/tests/golden/dense_kv" "$tmp"

d=$(case_dir fwd_missing_input)
expect forward_bad_input "model.safetensors" "$build/torchless-forward" --model "$src/tests/golden/dense_kv" --input "$d/model.safetensors"

echo "malformed inputs: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
