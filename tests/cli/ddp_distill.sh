#!/usr/bin/env bash
# Distillation under data parallelism is exact as cross-entropy is (issue 24, acceptance 3):
# `mpirun -np 2` distilling from the parent for 20 steps trains bitwise the weights of one
# process with twice the gradient accumulation (the tolerance of ddp_equivalence.sh for
# accumulation 1 × 2 ranks: each micro-loss is ((1 − α)·Σ CE + α·T²·Σ KL)/N with N the global
# batch's targets, and one sum of two micro-batch gradients either way). The student is an
# upscale of models/tiny; the teacher runs over its frozen NF4 layers (distill_from: auto, from
# the torchless_surgery.json the upscale wrote). A cross-entropy run must train other weights,
# so the comparison can fail.
# usage: ddp_distill.sh BUILD_DIR SOURCE_DIR
set -u
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
source "$(dirname "$0")/mpi.bash"
train=$build/torchless-train
"$build/torchless-surgery" upscale "$src/models/tiny" "$tmp/up" --slices 0:4,0:4,4:6 >"$tmp/upscale.log" 2>&1 ||
  fail "upscale failed: $(tail -3 "$tmp/upscale.log")"
write_heal_yaml "$tmp/heal.yaml"
sed -i "s|^base_model: .*|base_model: $tmp/up|" "$tmp/heal.yaml"
cat >>"$tmp/heal.yaml" <<YAML
distill_from: auto
distill_alpha: 0.6
distill_temperature: 2.0
distill_top_k: 64
YAML

OMP_NUM_THREADS=1 "$train" --config "$tmp/heal.yaml" output_dir="$tmp/one_acc2" gradient_accumulation_steps=2 \
  >"$tmp/one_acc2.log" 2>&1 || fail "one process failed: $(tail -3 "$tmp/one_acc2.log")"
mpi 2 "$train" --config "$tmp/heal.yaml" output_dir="$tmp/two_acc1" gradient_accumulation_steps=1 \
  >"$tmp/two_acc1.log" 2>&1 || fail "mpirun -np 2 failed: $(tail -5 "$tmp/two_acc1.log")"
grep -q "data parallel    MPI, 2 ranks" "$tmp/two_acc1.log" || fail "the log does not show 2 MPI ranks"
for run in one_acc2 two_acc1; do
  grep -q "parent           .*shared weights" "$tmp/$run.log" || fail "$run: the teacher is not the shared-weight parent"
  grep -q "distillation     (1 − 0.6)·CE + 0.6·T²·KL, T 2, the parent's top 64" "$tmp/$run.log" ||
    fail "$run: the plan does not show the distillation"
  grep -q "step 20/20 | loss [0-9.]* | kl [0-9.]* | objective" "$tmp/$run.log" || fail "$run: no KL term logged at step 20"
done
n=$(fingerprints "$tmp/two_acc1/metrics.jsonl" | wc -l)
[ "$n" -eq 20 ] || fail "two_acc1: $n weights fingerprints in metrics.jsonl, wanted 20 (one per step, ranks equal)"
diff <(fingerprints "$tmp/one_acc2/metrics.jsonl") <(fingerprints "$tmp/two_acc1/metrics.jsonl") >/dev/null ||
  fail "weights after some step differ between 2 ranks × accumulation 1 and 1 process × accumulation 2"
cmp -s "$tmp/one_acc2/adapter_model.safetensors" "$tmp/two_acc1/adapter_model.safetensors" ||
  fail "final adapters of 2 ranks × accumulation 1 and 1 process × accumulation 2 are not bitwise equal"
l1=$(grep -o 'step 20/20 | loss .* | acc' "$tmp/one_acc2.log") l2=$(grep -o 'step 20/20 | loss .* | acc' "$tmp/two_acc1.log")
[ -n "$l1" ] && [ "$l1" = "$l2" ] || fail "final loss lines differ: '$l1' vs '$l2'"
# Without the teacher the same run trains other weights.
OMP_NUM_THREADS=1 "$train" --config "$tmp/heal.yaml" output_dir="$tmp/ce" gradient_accumulation_steps=2 max_steps=2 \
  distill_alpha=0 >"$tmp/ce.log" 2>&1 || fail "cross-entropy run failed: $(tail -3 "$tmp/ce.log")"
[ "$(fingerprints "$tmp/ce/metrics.jsonl" | sed -n 2p)" != "$(fingerprints "$tmp/one_acc2/metrics.jsonl" | sed -n 2p)" ] ||
  fail "distillation did not change the weights"
echo "ddp distillation: $fails failed"
[ "$fails" -eq 0 ]
