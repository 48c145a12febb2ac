#!/usr/bin/env bash
# Issue 9, classes 1, 4 and 6: an output path never destroys an input (however spelled:
# trailing slash, "..", a symlink), --force replaces only our own outputs, merge checks what
# an adapter means, and configs / inputs transformers would read differently are refused.
# Each refusal: exit 1, one stderr line naming the fault, every input byte-identical.
# usage: output_paths.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0 passes=0
source "$(dirname "$0")/expect.bash"
surgery=$build/torchless-surgery merge=$build/torchless-merge train=$build/torchless-train
forward=$build/torchless-forward

cp -r "$src/models/tiny" "$tmp/base"
# A one-step adapter for the merge cases.
cat >"$tmp/heal.yaml" <<YAML
base_model: $tmp/base
adapter: qlora
lora_r: 4
lora_alpha: 8
datasets:
  - path: $src/data/demo/heal.jsonl
    type: chat
sequence_len: 64
max_steps: 1
output_dir: $tmp/adapter
YAML
ok "$train" --config "$tmp/heal.yaml"
base_h=$(tree_hash "$tmp/base") adapter_h=$(tree_hash "$tmp/adapter")

# --- 1. outputs and inputs ---------------------------------------------------------------
ok "$merge" --base "$tmp/base" --adapter "$tmp/adapter" --out "$tmp/M"
# The reported case: a trailing slash on an existing output with --force replaced nothing and deleted M.
ok "$merge" --base "$tmp/base" --adapter "$tmp/adapter" --out "$tmp/M/" --force
[ -f "$tmp/M/model.safetensors" ] && [ -f "$tmp/M/torchless_merge.json" ] && passes=$((passes + 1)) ||
  { fails=$((fails + 1)); echo "FAIL trailing_slash_force: $tmp/M lost"; }
ls -a "$tmp" | grep -q partial && { fails=$((fails + 1)); echo "FAIL: a .partial directory was left"; }
expect merge_out_is_base "is the input" "$merge" --base "$tmp/base" --adapter "$tmp/adapter" --out "$tmp/base/" --force
expect merge_out_dotdot "is the input" "$merge" --base "$tmp/base" --adapter "$tmp/adapter" --out "$tmp/adapter/../base" --force
ln -s "$tmp/base" "$tmp/link"
expect merge_out_symlink "is the input" "$merge" --base "$tmp/base" --adapter "$tmp/adapter" --out "$tmp/link" --force
expect merge_out_parent "contains the input" "$merge" --base "$tmp/base" --adapter "$tmp/adapter" --out "$tmp" --force
expect merge_out_inside "lies inside the input" "$merge" --base "$tmp/base" --adapter "$tmp/adapter" --out "$tmp/adapter/sub" --force
expect init_over_own_config "contains the input" "$surgery" init "$tmp/base/config.json" "$tmp/base" --force
expect init_copy_from "is the input" "$surgery" init "$src/configs/demo-model.json" "$tmp/link/" --copy-from "$tmp/base" --force
expect convert_into_src "lies inside the input" "$surgery" convert "$tmp/base" "$tmp/base/bf16" --dtype bf16 --force
expect expand_over_src "is the input" "$surgery" expand "$tmp/base" "$tmp/base" --duplicate 4:6 --force
expect upscale_over_src "is the input" "$surgery" upscale "$tmp/link" "$tmp/base/." --slices 0:6 --force
printf 'x\n' >"$tmp/calib.jsonl"
expect prune_over_calibration "lies inside the input" "$surgery" prune "$tmp/base" "$tmp/calib.jsonl/x" --keep 1 --calibration "$tmp/calib.jsonl"
expect exists_without_force "output directory exists (pass --force" "$surgery" convert "$tmp/base" "$tmp/M"
mkdir -p "$tmp/mine" && echo "notes" >"$tmp/mine/notes.txt"
notes_h=$(tree_hash "$tmp/mine")
expect force_not_ours "--force replaces only a directory written by torchless" "$surgery" convert "$tmp/base" "$tmp/mine" --force
unchanged force_not_ours "$tmp/mine" "$notes_h"
ok "$surgery" convert "$tmp/base" "$tmp/C/" --dtype bf16
ok "$surgery" convert "$tmp/base" "$tmp/C" --dtype f32 --force  # ours: replaced
[ -f "$tmp/C/torchless_convert.json" ] && passes=$((passes + 1)) || { fails=$((fails + 1)); echo "FAIL: convert record"; }

# --- 4. merge validates meaning -----------------------------------------------------------
cp -r "$tmp/adapter" "$tmp/bad_r"
sed -i 's/"r": 4/"r": 8/' "$tmp/bad_r/adapter_config.json"
bad_r_h=$(tree_hash "$tmp/bad_r")
expect adapter_r_vs_shapes "gives it r 8; merging would use the wrong scale" "$merge" --base "$tmp/base" --adapter "$tmp/bad_r" --out "$tmp/o1"
unchanged adapter_r_vs_shapes "$tmp/bad_r" "$bad_r_h"
cp -r "$tmp/adapter" "$tmp/bad_t"
sed -i -z 's/"target_modules": \[[^]]*\]/"target_modules": ["q_proj"]/' "$tmp/bad_t/adapter_config.json"
expect adapter_outside_targets "which target_modules [\"q_proj\"] in adapter_config.json does not name" "$merge" --base "$tmp/base" --adapter "$tmp/bad_t" --out "$tmp/o2"
cp -r "$tmp/adapter" "$tmp/bad_a"
sed -i 's/"lora_alpha": 8.0/"lora_alpha": 0.0/' "$tmp/bad_a/adapter_config.json"
expect adapter_alpha "lora_alpha 0 must be positive" "$merge" --base "$tmp/base" --adapter "$tmp/bad_a" --out "$tmp/o3"
cp -r "$tmp/base" "$tmp/liar"
sed -i 's/"intermediate_size": [0-9]*/"intermediate_size": 96/' "$tmp/liar/config.json"
liar_h=$(tree_hash "$tmp/liar")
expect merge_base_contradicts_config "but the config implies" "$merge" --base "$tmp/liar" --adapter "$tmp/adapter" --out "$tmp/o4"
unchanged merge_base_contradicts_config "$tmp/liar" "$liar_h"
[ ! -e "$tmp/o1" ] && [ ! -e "$tmp/o2" ] && [ ! -e "$tmp/o4" ] && passes=$((passes + 1)) || { fails=$((fails + 1)); echo "FAIL: a refused merge wrote output"; }

# --- 6. the model transformers builds -----------------------------------------------------
# Layer 2 of the tiny model is sliding: a map ending there would be run as full by transformers.
expect upscale_last_sliding "transformers forces the last layer to full_attention" "$surgery" upscale "$tmp/base" "$tmp/u" --slices 0:3
cp -r "$tmp/base" "$tmp/slast"
sed -i -z 's/"full_attention"\n  \]/"sliding_attention"\n  ]/' "$tmp/slast/config.json"
grep -q '"sliding_attention"$' <(tr -d ' \n' <"$tmp/slast/config.json" | grep -o '"layer_types":\[[^]]*\]' | tr ',' '\n' | tail -1 | tr -d ']') ||
  { fails=$((fails + 1)); echo "FAIL: could not make a config ending on a sliding layer"; }
slast_h=$(tree_hash "$tmp/slast")
# torchless-forward reads its input as strictly as the loaders.
mk_st() {  # FILE HEADER DATA_BYTES: a safetensors file of zero bytes
  local n=${#2}
  printf "$(printf '\\x%02x' $((n & 255)) $(((n >> 8) & 255)) $(((n >> 16) & 255)) $(((n >> 24) & 255)) 0 0 0 0)" >"$1"
  printf '%s' "$2" >>"$1"
  head -c "$3" /dev/zero >>"$1"
}
mk_st "$tmp/float_ids.safetensors" '{"input_ids":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}' 8
expect forward_float_ids "tensor 'input_ids' has dtype F32, expected I64 or I32" "$forward" --model "$tmp/base" --input "$tmp/float_ids.safetensors"
mk_st "$tmp/short_logits.safetensors" '{"input_ids":{"dtype":"I64","shape":[1,2],"data_offsets":[0,16]},"logits":{"dtype":"F32","shape":[1,2,3],"data_offsets":[16,40]}}' 40
expect forward_logits_shape "tensor 'logits' has shape [1, 2, 3], expected [1, 2," "$forward" --model "$tmp/base" --input "$tmp/short_logits.safetensors"
mk_st "$tmp/labels.safetensors" '{"input_ids":{"dtype":"I64","shape":[1,2],"data_offsets":[0,16]},"labels":{"dtype":"I64","shape":[2],"data_offsets":[16,32]}}' 32
expect forward_labels_shape "tensor 'labels' has shape [2] but input_ids [1, 2]" "$forward" --model "$tmp/base" --input "$tmp/labels.safetensors"
mk_st "$tmp/ids1d.safetensors" '{"input_ids":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}}' 16
expect forward_ids_rank "has shape [4], expected [batch, sequence]" "$forward" --model "$tmp/base" --input "$tmp/ids1d.safetensors"
# A config whose layer_types end on sliding_attention is run with a full last layer, as
# transformers builds it: the same logits as the model that says full_attention there.
le64() { for v in "$@"; do printf "$(printf '\\x%02x' $((v & 255)) $(((v >> 8) & 255)) 0 0 0 0 0 0)"; done; }
ids_hdr='{"input_ids":{"dtype":"I64","shape":[1,12],"data_offsets":[0,96]},"labels":{"dtype":"I64","shape":[1,12],"data_offsets":[96,192]}}'
mk_st "$tmp/ids.safetensors" "$ids_hdr" 0
le64 2 105 2364 107 818 1037 1999 525 3011 40 106 1 >>"$tmp/ids.safetensors"
le64 2 105 2364 107 818 1037 1999 525 3011 40 106 1 >>"$tmp/ids.safetensors"
ok "$surgery" check "$tmp/slast"
"$forward" --model "$tmp/base" --input "$tmp/ids.safetensors" | grep '^loss' >"$tmp/loss_full"
"$forward" --model "$tmp/slast" --input "$tmp/ids.safetensors" | grep '^loss' >"$tmp/loss_slast"
if [ -s "$tmp/loss_full" ] && cmp -s "$tmp/loss_full" "$tmp/loss_slast"; then passes=$((passes + 1)); else
  fails=$((fails + 1)); echo "FAIL last_layer_forced_full: $(cat "$tmp/loss_full") vs $(cat "$tmp/loss_slast")"; fi
unchanged check_last_sliding "$tmp/slast" "$slast_h"
unchanged base_untouched "$tmp/base" "$base_h"
unchanged adapter_untouched "$tmp/adapter" "$adapter_h"
echo "output paths: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
