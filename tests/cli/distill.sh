#!/usr/bin/env bash
# Distillation from the parent (issue 24) through the tools: which teacher runs (--dry-run
# says, with its memory), the refusals (one stderr line, exit 1), and the reports: a short
# distillation heal's report.md and `torchless-eval --report` both show the parent beside the
# model before and after, with the recovered fraction and the KL to the parent.
# usage: distill.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0 passes=0
source "$(dirname "$0")/expect.bash"
train=$build/torchless-train
check() {  # NAME FILE PATTERN: the file has a line matching the extended regex
  if grep -qE -- "$3" "$2"; then passes=$((passes + 1)); else
    fails=$((fails + 1)); echo "FAIL $1: no line matching '$3' in $2:"; sed 's/^/    /' "$2" | head -30; fi
}
"$build/torchless-surgery" upscale "$src/models/tiny" "$tmp/up" --slices 0:4,0:4,4:6 >/dev/null
cp -r "$src/models/tiny" "$tmp/copy"  # the same layers, but no surgery record
cat >"$tmp/heal.yaml" <<YAML
base_model: $tmp/up
adapter: qlora
lora_r: 4
datasets:
  - path: $src/data/demo/heal.jsonl
    type: chat
sequence_len: 128
val_set_size: 0.05
micro_batch_size: 2
max_steps: 2
eval_steps: 2
eval_table_size: 2
eval_max_new_tokens: 8
bf16: false
distill_from: auto
distill_alpha: 0.7
distill_temperature: 2.0
output_dir: $tmp/heal
YAML

# The upscale's record names models/tiny: the teacher is its layers 0,1,2,3,8,9, no extra weights.
"$train" --config "$tmp/heal.yaml" --dry-run >"$tmp/plan" 2>&1
check shared_plan "$tmp/plan" "^parent +$src/models/tiny \(6 layers\): shared weights: the parent's layers are layers 0,1,2,3,8,9 of"
check distill_plan "$tmp/plan" "^distillation +\(1 − 0.7\)·CE \+ 0.7·T²·KL, T 2, whole vocabulary"
check teacher_memory "$tmp/plan" "^peak per GPU .* \+ teacher [0-9.]+ \+ slack"
# A base without a layer map: the parent is loaded on its own, in NF4 under QLoRA.
"$train" --config "$tmp/heal.yaml" base_model="$tmp/copy" distill_from="$src/models/tiny" --dry-run >"$tmp/plan2" 2>&1
check second_model "$tmp/plan2" "^parent .*: second model: loaded frozen in NF4, [0-9.]+ GiB \('$tmp/copy' has no surgery layer map"
# Measured only, without a layer map: the eval_reference_model the run loads anyway is the parent.
"$train" --config "$tmp/heal.yaml" base_model="$tmp/copy" distill_from= distill_alpha= distill_temperature= \
  eval_reference_model="$src/models/tiny" --dry-run >"$tmp/plan5" 2>&1
check reference_parent "$tmp/plan5" "^parent .*: the eval_reference_model, as loaded for cross-perplexity"
# distill_alpha 0: the parent is measured, nothing is distilled.
"$train" --config "$tmp/heal.yaml" distill_alpha=0 --dry-run >"$tmp/plan3" 2>&1
check alpha_zero "$tmp/plan3" "^distillation +off \(distill_alpha 0\): the parent is measured only"
# A bare config.json plans the shared-weight teacher.
mkdir -p "$tmp/bare" && cp "$src/models/tiny/config.json" "$tmp/bare/"
"$train" --config "$tmp/heal.yaml" base_model="$tmp/bare" --dry-run >"$tmp/plan4" 2>&1
check bare_plan "$tmp/plan4" "^distillation +from auto: planned with the teacher over the student's base"

expect auto_without_parent "distill_from: auto needs upscale_from or a base_model written by torchless-surgery" \
  "$train" --config "$tmp/heal.yaml" base_model="$tmp/copy" --dry-run
expect missing_parent "distill_from '$tmp/none' is not a directory" \
  "$train" --config "$tmp/heal.yaml" distill_from="$tmp/none" --dry-run
expect top_k_too_large "distill_top_k 5000 is larger than the parent's vocabulary (4096)" \
  "$train" --config "$tmp/heal.yaml" distill_top_k=5000 --dry-run
expect alpha_range "distill_alpha must be in [0, 1]" "$train" --config "$tmp/heal.yaml" distill_alpha=2 --dry-run

# A short heal: its report shows the parent, before and after.
"$train" --config "$tmp/heal.yaml" >"$tmp/heal.log" 2>&1 || { fails=$((fails + 1)); echo "FAIL heal: $(tail -3 "$tmp/heal.log")"; }
check heal_parent_line "$tmp/heal.log" "^parent \| eval_loss [0-9.]+ \| generation"
check heal_kl_line "$tmp/heal.log" "^step 2/2 \| eval_loss [0-9.]+ \| KL to parent [0-9.]+ \| top-1 agreement [0-9.]+"
check heal_report_header "$tmp/heal/report.md" "^\| measure \| parent \(tiny\) \| before \(step 0\) \| after \(step 2\) \|"
check heal_report_recovered "$tmp/heal/report.md" "^\| recovered fraction of the damage \| 1 \| 0 \| -?[0-9.]+ \|"
check heal_report_kl "$tmp/heal/report.md" "^\| KL to the parent \(nats per token\) \| 0 \| [0-9.]+ \| [0-9.]+ \|"
check heal_metrics "$tmp/heal/metrics.jsonl" '"distill_kl":[0-9.e-]+'
# torchless-eval --report on the same adapter finds the parent through the config.
"$build/torchless-eval" --model "$tmp/up" --adapter "$tmp/heal" --config "$tmp/heal.yaml" --4bit --table-size 2 \
  -n 8 --report --out "$tmp/eval" >"$tmp/eval.json" 2>"$tmp/eval.log" ||
  { fails=$((fails + 1)); echo "FAIL eval: $(tail -3 "$tmp/eval.log")"; }
check eval_json "$tmp/eval.json" '"eval_kl_parent":[0-9.e-]+.*"eval_top1_parent":[0-9.e-]+'
check eval_report_header "$tmp/eval/report.md" "^\| measure \| parent \(tiny\) \| base \(no adapter\) \| with the adapter \|"
check eval_report_recovered "$tmp/eval/report.md" "^\| recovered fraction of the damage \| 1 \| 0 \| -?[0-9.]+ \|"
echo "distillation tools: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
