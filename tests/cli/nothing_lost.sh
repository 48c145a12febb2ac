#!/usr/bin/env bash
# Issue 27, "nothing lost, round two": the examples a hostile user found, each refused with exit
# status 1 and one stderr line naming the fault, every input hashing the same afterwards.
#   outputs that overwrite inputs (forward --output, generate -o, eval --report --out);
#   leaks (a stale .partial of a killed merge or convert removed by the next one);
#   unbounded work (inputs and --max-new-tokens beyond the context, memory planned first);
#   accepted but wrong (damaged bitsandbytes state, a config that contradicts its weights, a
#   per_layer_config transformers refuses, an adapter_config.json array, a message without
#   content, NaN sampling and NaN adapters, an expansion that inserts nothing);
#   unclear messages (which key differs, why a dataset is empty, a damaged trainer_state.json,
#   --max-new-tokens 0, invalid UTF-8).
# The locks, signals under mpirun and the partial-folder clean-up of a real kill have their own
# tests: output_lock.sh, ddp_signal.sh, test_output_dir.cpp.
# usage: nothing_lost.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0 passes=0
source "$(dirname "$0")/expect.bash"
train=$build/torchless-train merge=$build/torchless-merge surgery=$build/torchless-surgery
forward=$build/torchless-forward gen=$build/torchless-generate ev=$build/torchless-eval
# safetensors_edit FILE PYTHON: rewrites FILE with its header `h` (a dict) and data `d` (a
# bytearray) as the Python statements leave them (stdlib only).
safetensors_edit() {
  python3 - "$1" "$2" <<'PY'
import json, struct, sys
path, code = sys.argv[1], sys.argv[2]
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
h = json.loads(raw[8:8 + n])
d = bytearray(raw[8 + n:])
exec(code)
head = json.dumps(h).encode()
head += b" " * (-len(head) % 8)
open(path, "wb").write(struct.pack("<Q", len(head)) + head + bytes(d))
PY
}

cp -r "$src/models/tiny" "$tmp/base"
head -n 24 "$src/data/demo/heal.jsonl" >"$tmp/data.jsonl"
cat >"$tmp/heal.yaml" <<YAML
base_model: $tmp/base
adapter: qlora
lora_r: 4
lora_alpha: 8
datasets:
  - path: $tmp/data.jsonl
    type: chat
sequence_len: 64
micro_batch_size: 1
max_steps: 2
learning_rate: 3.0e-3
save_steps: 1
seed: 5
output_dir: $tmp/adapter
YAML
y=$tmp/heal.yaml
ok "$train" --config "$y"
printf 'A kluge is a clumsy but working fix.\n' >"$tmp/text.txt"
printf '{"prompt": "Hello"}\n' >"$tmp/prompts.jsonl"
ln -s "$tmp/base/tokenizer.json" "$tmp/link.json"
base_h=$(tree_hash "$tmp/base") adapter_h=$(tree_hash "$tmp/adapter") data_h=$(tree_hash "$tmp/data.jsonl")
text_h=$(tree_hash "$tmp/text.txt") prompts_h=$(tree_hash "$tmp/prompts.jsonl") y_h=$(tree_hash "$y")

# --- outputs that overwrite inputs ---------------------------------------------------------
expect forward_output_is_model_weights "--output $tmp/base/model.safetensors lies inside the input $tmp/base" \
  "$forward" --model "$tmp/base" --text "$tmp/text.txt" --output "$tmp/base/model.safetensors"
expect forward_output_is_its_text "--output $tmp/text.txt is the input" \
  "$forward" --model "$tmp/base" --text "$tmp/text.txt" --output "$tmp/text.txt"
expect generate_out_is_tokenizer "--out $tmp/base/tokenizer.json lies inside the input" \
  "$gen" -m "$tmp/base" --prompts "$tmp/prompts.jsonl" -o "$tmp/base/tokenizer.json" -n 2
expect generate_out_is_its_prompts "--out $tmp/prompts.jsonl is the input" \
  "$gen" -m "$tmp/base" --prompts "$tmp/prompts.jsonl" -o "$tmp/prompts.jsonl" -n 2
expect generate_out_symlink_into_model "--out $tmp/base/tokenizer.json lies inside the input" \
  "$gen" -m "$tmp/base" --prompts "$tmp/prompts.jsonl" -o "$tmp/link.json" -n 2
expect generate_out_in_adapter "lies inside the input $tmp/adapter" \
  "$gen" -m "$tmp/base" --adapter "$tmp/adapter" --prompts "$tmp/prompts.jsonl" -o "$tmp/adapter/out.jsonl" -n 2
expect eval_report_into_adapter "--out $tmp/adapter is the input" \
  "$ev" -m "$tmp/base" --adapter "$tmp/adapter" --prompts "$tmp/prompts.jsonl" -n 2 --report --out "$tmp/adapter"
expect eval_report_without_out "--report needs --out DIR" \
  "$ev" -m "$tmp/base" --adapter "$tmp/adapter" --prompts "$tmp/prompts.jsonl" -n 2 --report
check symlink_still_a_link '[ -L "$tmp/link.json" ]'
# Allowed outputs are written whole, then renamed (no temporary left).
ok "$forward" --model "$tmp/base" --text "$tmp/text.txt" --output "$tmp/fwd.safetensors"
ok "$gen" -m "$tmp/base" --prompts "$tmp/prompts.jsonl" -o "$tmp/gen.jsonl" -n 2
check outputs_whole '[ -s "$tmp/fwd.safetensors" ] && [ -s "$tmp/gen.jsonl" ] && ! ls "$tmp" | grep -q "\.tmp$"'

# --- leaks: a killed merge's or convert's hidden partial, removed by the next write ---------
mkdir -p "$tmp/.M.partial-0badf0" "$tmp/.C.old-0badf0" && head -c 4096 /dev/zero >"$tmp/.M.partial-0badf0/model.safetensors"
touch "$tmp/.M.partial-0badf0/.torchless.lock"  # as a killed writer leaves it: the file, not the lock
ok "$merge" --base "$tmp/base" --adapter "$tmp/adapter" --out "$tmp/M"
check merge_removed_stale_partial '[ ! -e "$tmp/.M.partial-0badf0" ] && grep -q "removed $tmp/.M.partial-0badf0 (left by an interrupted run)" "$tmp/ok.out"'
ok "$surgery" convert "$tmp/base" "$tmp/C" --dtype f32
check convert_removed_stale_old '[ ! -e "$tmp/.C.old-0badf0" ] && [ -f "$tmp/C/torchless_convert.json" ]'
check no_partial_left '! ls -a "$tmp" | grep -q "partial\|\.old-"'

# --- unbounded work ----------------------------------------------------------------------
for _ in $(seq 7000); do printf 'the quick brown fox jumps over '; done >"$tmp/long.txt"
long_h=$(tree_hash "$tmp/long.txt")
expect forward_over_context "tokens, more than the model's context of 4096 (max_position_embeddings in $tmp/base/config.json)" \
  timeout 60 "$forward" --model "$tmp/base" --text "$tmp/long.txt"
python3 -c 'import json,sys; print(json.dumps({"prompt": open(sys.argv[1]).read()}))' "$tmp/long.txt" >"$tmp/long.jsonl"
expect generate_prompt_over_context "more than the model's context of 4096" \
  timeout 60 "$gen" -m "$tmp/base" --prompts "$tmp/long.jsonl" -n 2
expect generate_max_new_over_context "--max-new-tokens 100000: 100000 tokens, more than the model's context of 4096" \
  timeout 60 "$gen" -m "$tmp/base" -p hi -n 100000
expect eval_max_new_1e9 "--max-new-tokens 1000000000: 1000000000 tokens, more than the model's context of 4096" \
  timeout 60 "$ev" -m "$tmp/base" --prompts "$tmp/prompts.jsonl" -n 1e9
expect eval_prompt_and_max_new_over_context "prompts.jsonl prompt 1 (" \
  timeout 60 "$ev" -m "$tmp/base" --prompts "$tmp/prompts.jsonl" -n 4090
python3 -c 'import json,sys; print(json.dumps({"question": "2+2?", "choices": ["4", "5"], "answer": 0})); print(json.dumps({"question": open(sys.argv[1]).read(), "choices": ["yes", "no"], "answer": 0}))' "$tmp/long.txt" >"$tmp/mc.jsonl"
expect eval_mc_over_context "mc.jsonl item 2 (question and option):" timeout 60 "$ev" -m "$tmp/base" --mc "$tmp/mc.jsonl"
grep -q "more than the model's context of 4096" "$tmp/err" && passes=$((passes + 1)) || { fails=$((fails + 1)); echo "FAIL eval_mc_over_context: $(cat "$tmp/err")"; }
# Within the context but not within memory: the pass is planned before it allocates (a model
# whose context allows 10⁸ positions; the logits and activations of these millions of tokens
# would need far more than the machine has).
cp -r "$tmp/base" "$tmp/wide" && sed -i 's/"max_position_embeddings": 4096/"max_position_embeddings": 100000000/' "$tmp/wide/config.json"
for _ in $(seq 40); do cat "$tmp/long.txt"; done >"$tmp/longer.txt"
expect forward_over_memory "but the machine has" timeout 120 "$forward" --model "$tmp/wide" --text "$tmp/longer.txt"
grep -q "needs about .* GiB" "$tmp/err" && passes=$((passes + 1)) || { fails=$((fails + 1)); echo "FAIL forward_over_memory: no plan in $(cat "$tmp/err")"; }
unchanged long_text "$tmp/long.txt" "$long_h"

# --- accepted but wrong ------------------------------------------------------------------
# A bitsandbytes checkpoint whose nested_absmax holds inf: check said "ok", forward gave -nan.
cp -r "$src/tests/golden/dense_kv-bnb4bit" "$tmp/bnb"
safetensors_edit "$tmp/bnb/model.safetensors" '
import struct
k = "model.layers.0.self_attn.q_proj.weight.nested_absmax"
o = h[k]["data_offsets"][0]
d[o:o + 4] = struct.pack("<f", float("inf"))'
bnb_h=$(tree_hash "$tmp/bnb")
expect check_bnb_nested_absmax_inf "q_proj.weight.nested_absmax' holds inf at index 0" "$surgery" check "$tmp/bnb"
expect forward_bnb_nested_absmax_inf "q_proj.weight.nested_absmax' holds inf at index 0" \
  "$forward" --model "$tmp/bnb" --input "$src/tests/golden/dense_kv/forward.safetensors"
unchanged damaged_bnb "$tmp/bnb" "$bnb_h"
# A base whose config contradicts its weights: convert and expand refuse what check refuses.
cp -r "$tmp/base" "$tmp/hidden" && sed -i 's/"hidden_size": 128/"hidden_size": 96/' "$tmp/hidden/config.json"
cp -r "$tmp/base" "$tmp/transposed"
safetensors_edit "$tmp/transposed/model.safetensors" 'k = "model.layers.0.mlp.down_proj.weight"; h[k]["shape"] = h[k]["shape"][::-1]'
cp -r "$tmp/base" "$tmp/intdtype"
safetensors_edit "$tmp/intdtype/model.safetensors" 'h["model.layers.1.self_attn.o_proj.weight"]["dtype"] = "I16"'
liars_h="$(tree_hash "$tmp/hidden") $(tree_hash "$tmp/transposed") $(tree_hash "$tmp/intdtype")"
expect convert_wrong_hidden_size "but the config implies" "$surgery" convert "$tmp/hidden" "$tmp/o1" --dtype bf16
expect expand_wrong_hidden_size "but the config implies" "$surgery" expand "$tmp/hidden" "$tmp/o2" --duplicate 0:2
expect convert_transposed "tensor 'model.layers.0.mlp.down_proj.weight' has shape [384, 128] but the config implies [128, 384]" \
  "$surgery" convert "$tmp/transposed" "$tmp/o3"
expect expand_transposed "tensor 'model.layers.0.mlp.down_proj.weight' has shape [384, 128]" \
  "$surgery" expand "$tmp/transposed" "$tmp/o4" --duplicate 0:2
expect convert_integer_dtype "tensor 'model.layers.1.self_attn.o_proj.weight' has dtype I16, expected a float type" \
  "$surgery" convert "$tmp/intdtype" "$tmp/o5" --max-shard-size 1MB
expect expand_integer_dtype "has dtype I16, expected a float type" "$surgery" expand "$tmp/intdtype" "$tmp/o6" --duplicate 0:2
check contradicting_bases_unchanged '[ "$(tree_hash "$tmp/hidden") $(tree_hash "$tmp/transposed") $(tree_hash "$tmp/intdtype")" = "$liars_h" ]'
check nothing_written '! ls "$tmp" | grep -q "^o[0-9]$"'
# A last layer that says sliding, with sliding-shaped weights and a per_layer_config: transformers
# forces it to full and then refuses the model ("not homogeneous"); so do check and forward.
cp -r "$src/tests/golden/dense_kv" "$tmp/plc"
python3 - "$tmp/plc/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["layer_types"][-1] = "sliding_attention"
del c["per_layer_config"]["5"]
json.dump(c, open(sys.argv[1], "w"), indent=2)
PY
safetensors_edit "$tmp/plc/model.safetensors" '
for k in [k for k in h if k.startswith("model.layers.5.")]: del h[k]
end = len(d)
for k in [k for k in list(h) if k.startswith("model.layers.4.")]:
    a, b = h[k]["data_offsets"]
    h[k.replace("layers.4.", "layers.5.")] = dict(h[k], data_offsets=[end, end + b - a])
    d += d[a:b]; end += b - a'
plc_h=$(tree_hash "$tmp/plc")
expect check_not_homogeneous "per_layer_config: layer type 'full_attention' is not homogeneous across layers" "$surgery" check "$tmp/plc"
expect forward_not_homogeneous "transformers refuses to load it" \
  "$forward" --model "$tmp/plc" --input "$src/tests/golden/dense_kv/forward.safetensors"
unchanged not_homogeneous "$tmp/plc" "$plc_h"
# merge: an adapter_config.json that is a JSON array has no settings at all.
cp -r "$tmp/adapter" "$tmp/arr" && printf '[{"r": 4, "lora_alpha": 8}]\n' >"$tmp/arr/adapter_config.json"
arr_h=$(tree_hash "$tmp/arr")
expect merge_adapter_config_array "adapter_config.json: is a JSON array, not an object" \
  "$merge" --base "$tmp/base" --adapter "$tmp/arr" --out "$tmp/o7"
unchanged adapter_config_array "$tmp/arr" "$arr_h"
# A chat message without "content" trained as an empty turn.
printf '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}\n' >"$tmp/nocontent.jsonl"
nc_h=$(tree_hash "$tmp/nocontent.jsonl")
expect train_message_without_content "nocontent.jsonl:1: message 1 has no 'content'" \
  "$train" --config "$y" output_dir="$tmp/o8" "datasets=[{path: $tmp/nocontent.jsonl, type: chat}]"
unchanged message_without_content "$tmp/nocontent.jsonl" "$nc_h"
# NaN sampling, and an adapter with a NaN that generated "<pad>…" without a word.
expect generate_temperature_nan "sampling options out of range: --temperature nan" "$gen" -m "$tmp/base" -p hi -t nan
cp -r "$tmp/adapter" "$tmp/nan"
safetensors_edit "$tmp/nan/adapter_model.safetensors" '
import struct
k = sorted(k for k in h if k.endswith("lora_B.weight"))[0]
o = h[k]["data_offsets"][0]
d[o:o + 4] = struct.pack("<f", float("nan"))'
nan_h=$(tree_hash "$tmp/nan")
expect generate_nan_adapter "holds nan at flat index 0; a LoRA weight must be finite" \
  "$gen" -m "$tmp/base" --adapter "$tmp/nan" -p hi -n 4
expect merge_nan_adapter "holds nan at flat index 0" "$merge" --base "$tmp/base" --adapter "$tmp/nan" --out "$tmp/o9"
unchanged nan_adapter "$tmp/nan" "$nan_h"
# expand --insert-identity every=N with N ≥ the layer count wrote an unchanged copy.
expect expand_every_6_of_6 "--insert-identity every=6 inserts no layer into a model of 6 layers" \
  "$surgery" expand "$tmp/base" "$tmp/o10" --insert-identity every=6
expect expand_every_9_of_6 "every=9 inserts no layer" "$surgery" expand "$tmp/base" "$tmp/o10" --insert-identity every=9
check refused_wrote_nothing '[ ! -e "$tmp/o7" ] && [ ! -e "$tmp/o8" ] && [ ! -e "$tmp/o9" ] && [ ! -e "$tmp/o10" ]'

# --- unclear messages --------------------------------------------------------------------
# A resume refused names the key that differs, not only two hashes.
expect resume_names_the_key "it differs in learning_rate 0.003 → 0.001" \
  "$train" --config "$y" output_dir="$tmp/o11" learning_rate=1.0e-3 resume_from_checkpoint="$tmp/adapter/checkpoint-1"
expect reused_dir_names_the_key "it differs in seed 5 → 6" "$train" --config "$y" seed=6
# "dataset is empty": every row dropped as overlong, or a directory given as the path.
expect all_rows_overlong "every one of its 24 examples is longer than sequence_len 8 and was dropped (overlong: drop)" \
  "$train" --config "$y" output_dir="$tmp/o12" sequence_len=8 overlong=drop
expect dataset_is_a_directory "$tmp/base: is a directory; a dataset's path names a .jsonl file" \
  "$train" --config "$y" output_dir="$tmp/o13" "datasets=[{path: $tmp/base, type: chat}]"
# A truncated trainer_state.json: named, with no advice that would delete the checkpoint.
cp -r "$tmp/adapter" "$tmp/trunc" && head -c 40 "$tmp/adapter/checkpoint-1/trainer_state.json" >"$tmp/trunc/checkpoint-1/trainer_state.json"
trunc_h=$(tree_hash "$tmp/trunc")
expect truncated_trainer_state "checkpoint-1/trainer_state.json is unreadable (truncated or edited?" \
  "$train" --config "$y" output_dir="$tmp/trunc" resume_from_checkpoint=auto
grep -q overwrite_output_dir "$tmp/err" && { fails=$((fails + 1)); echo "FAIL truncated_trainer_state: advises $(cat "$tmp/err")"; }
unchanged truncated_trainer_state "$tmp/trunc" "$trunc_h"
expect generate_max_new_zero "--max-new-tokens 0 must be a whole number of at least 1" "$gen" -m "$tmp/base" -p hi --max-new-tokens 0
expect eval_max_new_zero "--max-new-tokens 0 must be a whole number of at least 1" "$ev" -m "$tmp/base" --prompts "$tmp/prompts.jsonl" -n 0
printf '{"prompt": "caf\xe9"}\n' >"$tmp/latin1.jsonl"
expect generate_invalid_utf8 "latin1.jsonl:1: invalid UTF-8 at byte 16 of the line" "$gen" -m "$tmp/base" --prompts "$tmp/latin1.jsonl"
expect eval_invalid_utf8 "latin1.jsonl:1: invalid UTF-8 at byte 16 of the line" "$ev" -m "$tmp/base" --prompts "$tmp/latin1.jsonl"

unchanged base "$tmp/base" "$base_h"
unchanged adapter "$tmp/adapter" "$adapter_h"
unchanged data "$tmp/data.jsonl" "$data_h"
unchanged text "$tmp/text.txt" "$text_h"
unchanged prompts "$tmp/prompts.jsonl" "$prompts_h"
unchanged config "$y" "$y_h"
echo "nothing lost: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
