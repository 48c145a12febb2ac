#!/usr/bin/env bash
# torchless-generate and torchless-eval on the project's tiny model: bad input gets one line
# and exit 1 (a malformed prompt line, a missing adapter, an adapter for another base, a
# multiple-choice item with no correct answer); batched jsonl in → jsonl out; the report.
# usage: generate_eval.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
mkdir -p "$build/test-tmp"
tmp=$(mktemp -d "$build/test-tmp/generate_eval.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
passes=0 fails=0
source "$src/tests/cli/expect.bash"
gen="$build/torchless-generate" ev="$build/torchless-eval" tiny="$src/models/tiny"

printf '{"prompt": "Hello"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n{"prompt": 3}\n' >"$tmp/bad.jsonl"
expect malformed-prompt-line "bad.jsonl:3: not a JSON object with a 'prompt' string" "$gen" -m "$tiny" --prompts "$tmp/bad.jsonl"
expect missing-adapter "$tmp/none: adapter directory not found" "$gen" -m "$tiny" --adapter "$tmp/none" -p hi
# A PEFT adapter made for the e4b golden checkpoint (other widths, more layers).
expect adapter-for-another-base "adapter made for another model?" \
  "$gen" -m "$tiny" --adapter "$src/tests/golden/e4b/lora/initial" -p hi
expect eval-missing-adapter "adapter directory not found" "$ev" -m "$tiny" --adapter "$tmp/none"
printf '{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n{"question": "Sky?", "choices": ["blue", "red"]}\n' \
  >"$tmp/mc_bad.jsonl"
expect mc-no-correct-answer "mc_bad.jsonl:2: no correct answer" "$ev" -m "$tiny" --mc "$tmp/mc_bad.jsonl"
expect bad-top-p "sampling options out of range" "$gen" -m "$tiny" -p hi --top-p 0

# Batched prompts: one output line per prompt, in order, written atomically.
printf '{"prompt": "Hello"}\n\n{"messages": [{"role": "user", "content": "Hi"}]}\n' >"$tmp/ok.jsonl"
if "$gen" -m "$tiny" --prompts "$tmp/ok.jsonl" --out "$tmp/out.jsonl" -n 8 --temperature 0.7 --top-k 20 --seed 1 \
     2>"$tmp/err" && [ "$(wc -l <"$tmp/out.jsonl")" -eq 2 ] && grep -q '"prompt":"Hello"' "$tmp/out.jsonl" &&
   [ ! -e "$tmp/out.jsonl.tmp" ]; then
  passes=$((passes + 1))
else
  fails=$((fails + 1)); echo "FAIL batched prompts: $(cat "$tmp/err") $(cat "$tmp/out.jsonl" 2>/dev/null)"
fi
# The interactive chat reads turns until an empty line.
if printf 'Hello\n\n' | "$gen" -m "$tiny" --chat -n 4 >"$tmp/chat.out" 2>"$tmp/err" && grep -q '^> ' "$tmp/chat.out"; then
  passes=$((passes + 1))
else
  fails=$((fails + 1)); echo "FAIL chat: $(cat "$tmp/err")"
fi

# Every measure, and the report for a checkpoint.
printf '{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n{"Question": "Sky?", "Correct Answer": "blue", "Incorrect Answer 1": "red"}\n' \
  >"$tmp/mc.jsonl"
if "$ev" -m "$tiny" --data "$src/data/demo/heal.jsonl" --table-size 2 -n 16 --reference "$tiny" --mc "$tmp/mc.jsonl" \
     --report --before "$tiny" --out "$tmp/report" >"$tmp/eval.json" 2>"$tmp/err"; then
  for key in eval_loss perplexity loop_fraction distinct_2 distinct_3 distinct_4 gen_rep4 repeated_suffix \
             cross_perplexity mc_accuracy; do
    grep -q "\"$key\"" "$tmp/eval.json" || { fails=$((fails + 1)); echo "FAIL eval: no $key in $(cat "$tmp/eval.json")"; }
  done
  grep -q '| held-out loss |' "$tmp/report/report.md" && grep -q '| loop fraction |' "$tmp/report/report.md" &&
    [ -f "$tmp/report/report.json" ] && passes=$((passes + 1)) ||
    { fails=$((fails + 1)); echo "FAIL report: $(cat "$tmp/report/report.md" 2>/dev/null)"; }
else
  fails=$((fails + 1)); echo "FAIL eval: $(cat "$tmp/err")"
fi
echo "generate/eval: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
