#!/usr/bin/env bash
# The healed demo model in stock llama.cpp, compared with torchless (docs/interop.md records
# the last run; not part of CI: the converter needs torch).
#
#   bash scripts/interop/llama-cpp.sh [MERGED_MODEL_DIR]
#
# 1. llama.cpp from PyPI: the llama-cpp-python 0.3.36 sdist vendors it (vendor/llama.cpp).
#    Only the CPU library (libllama, ggml-cpu) and llama-common (the Jinja chat templates) are
#    built, plus scripts/interop/llama_dump.cpp against them.
# 2. Without MERGED_MODEL_DIR: the merged demo model, made with the current tools (a short
#    configs/demo-heal.yaml QLoRA run on its upscale of models/tiny-chat, then torchless-merge).
# 3. llama.cpp's own convert_hf_to_gguf.py (gguf from the sdist's gguf-py) writes f32 and Q8_0
#    GGUFs.
# 4. scripts/interop/compare.py: logits (f32 GGUF, f32 K/V cache, no flash attention: within
#    2^-11 ≈ 4.9e-4 of the largest logit, fp16's roundoff, as ggml's fp16 GELU table explains the
#    rest; docs/interop.md), greedy tokens on a prompt longer than the sliding window,
#    tokenizer ids on tricky text, the token ids of the rendered chat template.
# Needs: a build (bash scripts/build.sh), cmake, a C++ compiler, and a Python with torch,
# transformers, numpy, safetensors and sentencepiece for the converter (PYTHON, default
# /work/pyenv/bin/python, else python3). Work files go to build/interop/.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
work=$root/build/interop
mkdir -p "$work"
PY=${PYTHON:-/work/pyenv/bin/python}
[ -x "$PY" ] || PY=python3
version=0.3.36
jobs=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # ggml and torchless' OpenMP spin-wait badly on a busy machine

# 1. llama.cpp. `--no-binary llama-cpp-python` takes the sdist; its build dependencies may be
# wheels (pip prepares the sdist's metadata with them; `--no-binary :all:` would compile
# setuptools, cmake and the rest from source first, for the same file).
sdist=$work/llama_cpp_python-$version
if [ ! -d "$sdist/vendor/llama.cpp" ]; then
  "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work"
  tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
fi
llama=$sdist/vendor/llama.cpp
lb=$work/llama-build
if [ ! -f "$lb/CMakeCache.txt" ]; then
  cmake -S "$llama" -B "$lb" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TOOLS=ON >"$work/llama-configure.log"
fi
cmake --build "$lb" -j"$jobs" --target llama llama-common >"$work/llama-build.log"
libs=$(find "$lb/" -name '*.a' | sort)
# shellcheck disable=SC2086
c++ -std=c++17 -O2 -fopenmp -I"$llama/include" -I"$llama/ggml/include" -I"$llama/common" -I"$llama/vendor" \
  scripts/interop/llama_dump.cpp -o "$work/llama_dump" -Wl,--start-group $libs -Wl,--end-group -lpthread -ldl
dump=$work/llama_dump

# 2. The merged demo model.
merged=${1:-}
if [ -z "$merged" ]; then
  merged=$work/merged
  rm -rf "$work/heal" "$merged"
  steps=${HEAL_STEPS:-10}
  # Greedy generations from 4 held-out prompts before and after, scored by 4-gram repetition.
  ./build/torchless-train --config configs/demo-heal.yaml output_dir="$work/heal" max_steps=$steps \
    eval_steps=$steps save_steps=0 eval_table_size=4 eval_max_new_tokens=48 >"$work/heal.log"
  grep -o 'generation rep-4 [0-9.]* → [0-9.]*' "$work/heal.log" | sed 's/^/heal: /' || true
  # The heal trains on its upscaled base (configs/demo-heal.yaml: upscale_from models/tiny-chat, base_model
  # build/demo-upscaled); the adapter names it, relative to the directory the training ran in.
  base=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['base_model_name_or_path'])" "$work/heal/adapter_config.json")
  ./build/torchless-merge --base "$base" --adapter "$work/heal" --out "$merged" >"$work/merge.log"
fi
./build/torchless-surgery check --require-llama-cpp "$merged"

# 3. GGUFs with llama.cpp's own converter.
for q in f32 q8_0; do
  PYTHONPATH="$llama/gguf-py" "$PY" "$llama/convert_hf_to_gguf.py" "$merged" --outtype $q \
    --outfile "$work/model-$q.gguf" >"$work/convert-$q.log" 2>&1 || { tail -5 "$work/convert-$q.log"; exit 1; }
done

# 4. Inputs: a prompt longer than the sliding window, tricky text, a chat.
window=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['sliding_window'])" "$merged/config.json")
cat >"$work/prompt.txt" <<'TEXT'
<bos>hacker: [originally, someone who makes furniture with an axe] 1. A person who enjoys exploring the details of programmable systems and how to stretch their capabilities, as opposed to most users, who prefer to learn only the minimum necessary. 2. One who programs enthusiastically (even obsessively) or who enjoys programming rather than just theorizing about programming. 3. A person capable of appreciating hack value. 4. A person who is good at programming quickly. kluge: 1. A clever programming trick intended to solve a particular nasty case in an expedient, if not clear, manner.
TEXT
printf '%s' "$(cat "$work/prompt.txt")" >"$work/prompt.txt"  # no trailing newline
cat >"$work/tricky.txt" <<'TEXT'
  Leading spaces,	a tab, trailing   
Ünïcödé façade — “quotes” … naïve café; 日本語のテキスト, 한국어 텍스트, emoji 🤖🚀👍🏽, math ∑x² ≤ ∞.
Numbers 1234567890 3.14159 -42 0x1F; URL https://example.com/a?b=c&d=e#f; code: if (x != y) { return a[i] >> 2; }
Special tokens inline: <|turn>user
hi<turn|> <bos> <eos> <|"|> and a fake <|notatoken|>.


Blank lines above,		and 	mixed	whitespace.
TEXT
cat >"$work/chat.json" <<'JSON'
[{"role": "system", "content": "You answer questions about hacker jargon."},
 {"role": "user", "content": "What is a kluge?"},
 {"role": "assistant", "content": "A clever trick that solves a nasty case expediently."},
 {"role": "user", "content": "  And a hack?  "}]
JSON

# torchless: encode, render, run.
f=./build/torchless-forward
$f --model "$merged" --text "$work/prompt.txt" --output "$work/tl_prompt.safetensors" >/dev/null
$f --model "$merged" --text "$work/tricky.txt" --output "$work/tl_tricky.safetensors" >/dev/null
$f --model "$merged" --chat "$work/chat.json" --output "$work/tl_chat.safetensors" >/dev/null
"$PY" - "$work" "$window" <<'PY'
import sys
from safetensors.numpy import load_file
w, window = sys.argv[1], int(sys.argv[2])
ids = load_file(f"{w}/tl_prompt.safetensors")["input_ids"][0]
assert len(ids) > window, f"the prompt has {len(ids)} tokens, not more than the sliding window {window}"
open(f"{w}/prompt_ids.txt", "w").write(" ".join(map(str, ids.tolist())) + "\n")
PY

# llama.cpp: tokenize, render, logits, greedy.
$dump tokenize "$work/model-f32.gguf" "$work/prompt.txt" >"$work/llama_prompt_ids.txt"
$dump tokenize "$work/model-f32.gguf" "$work/tricky.txt" >"$work/llama_tricky_ids.txt"
$dump chat "$work/model-f32.gguf" "$work/chat.json" >"$work/llama_chat.txt"
$dump tokenize-as-cli "$work/model-f32.gguf" "$work/llama_chat.txt" >"$work/llama_chat_ids.txt"
# The f32 GGUF with an f32 K/V cache and no flash attention (llama-cli -ctk f32 -ctv f32 -fa off):
# the default f16 cache rounds every K and V to fp16, and flash attention casts an f32 K and V
# to f16 anyway (src/llama-graph.cpp). Q8_0 with llama.cpp's defaults, as a user runs it; where
# those crash (ggml's AMX Q8_0 kernels die at ldtilecfg on some CPUs), again without weight
# repacking (llama-cli --no-repack), which keeps ggml's AMX kernels out.
f32_settings=(--cache-type f32 --flash-attn off)
q8_settings=()
rc=0
$dump logits "$work/model-q8_0.gguf" "$work/prompt_ids.txt" "$work/llama_q8_0_logits.f32" 2>"$work/q8_0-defaults.log" || rc=$?
if [ $rc -ne 0 ]; then
  why="exit status $rc"
  [ $rc -gt 128 ] && why="SIG$(kill -l $((rc - 128)))"
  echo "q8_0: llama.cpp's defaults failed ($why, stderr in $work/q8_0-defaults.log); rerun with --repack off"
  q8_settings=(--repack off)
fi
for q in f32 q8_0; do
  if [ $q = f32 ]; then settings=("${f32_settings[@]}"); else settings=("${q8_settings[@]}"); fi
  $dump logits "$work/model-$q.gguf" "$work/prompt_ids.txt" "$work/llama_${q}_logits.f32" "${settings[@]}"
  $dump greedy "$work/model-$q.gguf" "$work/prompt_ids.txt" ${GREEDY_TOKENS:-48} "${settings[@]}" >"$work/llama_${q}_greedy.txt"
  "$PY" - "$work" "$q" <<'PY'
import sys
import numpy as np
from safetensors.numpy import save_file
w, q = sys.argv[1], sys.argv[2]
ids = np.array([[int(x) for x in open(f"{w}/llama_{q}_greedy.txt").read().split()]], dtype=np.int64)
save_file({"input_ids": ids}, f"{w}/greedy_{q}_in.safetensors")
PY
  $f --model "$merged" --input "$work/greedy_${q}_in.safetensors" --output "$work/tl_greedy_$q.safetensors" >/dev/null
done

echo "llama.cpp: llama-cpp-python $version sdist, vendored llama.cpp $(git -C "$llama" log -1 --format='%h of %cd' 2>/dev/null ||
  echo '(no git record)'); gguf-py $(sed -n 's/^version = "\(.*\)"/\1/p' "$llama/gguf-py/pyproject.toml")"
echo "python: $("$PY" -c 'import torch, transformers, numpy; print("torch", torch.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__)')"
echo "model: $merged (sliding window $window)"
echo "llama_dump settings: f32 GGUF ${f32_settings[*]}; q8_0 GGUF defaults (--cache-type f16 --flash-attn auto) ${q8_settings[*]}"
"$PY" scripts/interop/compare.py "$work"
