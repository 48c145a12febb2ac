// One optimizer step as HF's Trainer takes it (formats.md §5–§6): the micro-batches'
// gradients accumulate, each micro-loss being Σ CE / N with N the targets of ALL the step's
// micro-batches (num_items_in_batch); then global-norm clipping and AdamW at base_lr·λ(step).
// Distilling (Gemma4Model::set_distillation), each micro-loss is ((1 − α)·Σ CE + α·T²·Σ KL) / N
// with the same N, so accumulation and data parallelism stay exact as for cross-entropy.
#pragma once
#include <vector>

#include "train/data/data.h"
#include "train/model/gemma4_model.h"
#include "train/step/optim.h"

namespace tl {

struct StepResult {
  double loss = 0;        // Σ micro-losses = token mean over the step (cross-entropy)
  double kl = 0;          // distilling: the token mean of KL(p_teacher,T ‖ p_model,T) (else 0)
  int64_t targets = 0;    // N
  int64_t correct = 0;    // targets whose argmax prediction was right (token accuracy)
  double grad_norm = 0;   // pre-clip
  bool skipped = false;   // non-finite loss or gradient: no update made
};

// The trainable tensors of a model: every LoRA adapter's A and B (named by their PEFT
// keys) plus, for full-rank training, the given base weights and their gradient slots.
std::vector<ParamSlot> lora_param_slots(Gemma4Model& model, const std::string& decoder_prefix);

class Comm;
class GradBuckets;

// Zeroes the gradients, runs forward/backward on each micro-batch, clips, and unless the
// loss or gradient norm is non-finite, calls optimizer.step(lr).
// Data parallelism (comm and buckets given): `micro` is this rank's share of the global
// batch; N is the target count of the whole global batch (one all-reduce of the counts),
// the gradients are summed over ranks by `buckets` (overlapping the last micro-batch's
// backward) and the loss and hits are summed too, so N ranks compute what one process
// computes with N× the micro-batches, and every rank takes the same step.
StepResult train_step(Gemma4Model& model, Gemma4Grads& grads, AdamW& optimizer, Ops& ops,
                      const std::vector<MicroBatch>& micro, double lr, double max_grad_norm,
                      Comm* comm = nullptr, GradBuckets* buckets = nullptr);

// Targets of a micro-batch after HF's shift (labels[t+1] ≠ −100).
int64_t count_targets(const Tensor& labels);

}  // namespace tl
