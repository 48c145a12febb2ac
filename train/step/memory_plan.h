// The expected peak device memory of one training process (one GPU), from the config alone:
// what `torchless-train --dry-run` prints. Every term is what the trainer holds at the
// worst moment of a step, the backward of the widest layer:
//   weights         frozen base (NF4 + double-quantized absmax for projections and experts,
//                   bf16 elsewhere; all bf16 without load_in_4bit)
//   trainable       fp32 master weights, gradients and two Adam moments: 16 B per parameter
//   checkpoints     a recomputed layer's input [T, H], a kept layer's whole tape (gradient
//                   checkpointing recomputes all, none, or under `auto` the fewest layers that
//                   fit the budget), T = micro_batch · seq tokens
//   kv_kept         K/V of layers that later KV-shared layers read (kept across the step)
//   working_set     the widest layer's recomputed tape plus its backward temporaries
//   attention       the GPU attention's scratch: one block of fp32 scores and their gradient
//                   [G·128, S] (G the GQA group), with bf16 activations also bf16 copies of
//                   both, and fp32 sums of dK and dV [T, kv width]
//   cross_entropy   one chunk's fp32 logits and their gradient [chunk, V]
//   dequant         the bf16 scratch one dequantized projection (or expert) is multiplied from
//   teacher         distillation (issue 24): the teacher's final hidden states [T, H] and one
//                   chunk of its fp32 logits [chunk, V], plus the parent's own weights when it
//                   is loaded as a second model (none when it runs over the student's base)
//   slack           the stream-ordered pool's rounding and fragmentation: 5% of the transient
//                   terms (everything but weights and trainable state) plus 256 MiB
#pragma once
#include <string>
#include <vector>

#include "core/config.h"
#include "train/model/peft_adapter.h"

namespace tl {

struct MemoryPlanInput {
  int64_t sequence_len = 2048, micro_batch = 1;
  int64_t lora_params = 0;      // trainable parameters (LoRA A and B, full-trained layers)
  bool gradient_checkpointing = true;
  // Which layers are recomputed (size num_hidden_layers); empty: all of them when
  // gradient_checkpointing, else none (checkpointed_layers below makes it for `auto`).
  std::vector<bool> checkpointed;
  bool load_in_4bit = true;
  int act_bytes = 2;            // bytes per stored activation element (bf16 on the GPU)
  int64_t ce_chunk = 256;       // tokens per cross-entropy chunk (gemma4_backward.cpp)
  bool distill = false;                // a teacher runs beside each step
  double teacher_weights = 0;          // bytes of a parent loaded as a second model (0: shared weights)
};

struct MemoryPlan {
  double weights = 0, trainable = 0, checkpoints = 0, kv_kept = 0, working_set = 0, attention = 0,
         cross_entropy = 0, dequant = 0, slack = 0, teacher = 0;
  double total() const {
    return weights + trainable + checkpoints + kv_kept + working_set + attention + cross_entropy + dequant + slack +
           teacher;
  }
};

// LoRA parameters Σ r·(in + out) over the projections `spec` targets (decoder_prefix as in
// select_lora_targets).
int64_t lora_param_count(const Gemma4Config& c, const LoraSpec& spec, const std::string& decoder_prefix);

MemoryPlan plan_training_memory(const Gemma4Config& c, const MemoryPlanInput& in);

// `gradient_checkpointing: auto`: the fewest layers to recompute, largest tape first, that
// bring the plan under `budget` bytes; every layer when even that does not fit (the plan then
// says by how much). The order of the layers stays theirs.
std::vector<bool> checkpointed_layers(const Gemma4Config& c, MemoryPlanInput in, double budget);

// "peak per GPU 21.9 GiB = weights … + trainable … + …" (GiB), and with activations wider
// than bf16 a second line with the bf16-storage figure.
std::string format_memory_plan(const Gemma4Config& c, const MemoryPlanInput& in);

}  // namespace tl
