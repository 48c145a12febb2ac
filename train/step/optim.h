// Optimisation as PyTorch and transformers do it (formats.md §5): AdamW with decoupled
// weight decay, the HF learning-rate schedules (λ(step), the first update uses λ(0)), and
// clipping by the global gradient norm.
#pragma once
#include <string>
#include <vector>

#include "core/ops.h"
#include "train/model/param_slot.h"

namespace tl {

struct AdamWConfig {
  double lr = 2e-4, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};


// The optimizer holds every trainable tensor, its gradient and its moments in flat buffers, one
// set per (dtype, weight-decay group): each slot's tensors become views into them, so zeroing
// the gradients, their norm and the update are one call each per group (a few), not four per
// tensor (840 tensors on the 31B). Values and moments a slot already holds are copied in.
class AdamW {
 public:
  AdamW(AdamWConfig cfg, std::vector<ParamSlot> params, Ops& ops);
  // One update with learning rate `lr` (base lr · schedule), the gradients first multiplied
  // by grad_scale (the clipping coefficient); increments t first:
  //   p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
  //   p ← p − (lr/(1−β1^t))·m / (√v/√(1−β2^t) + eps)
  void step(double lr, double grad_scale = 1.0);
  int64_t t() const { return t_; }
  void set_t(int64_t t) { t_ = t; }
  // The slots; their tensors are views into the flat buffers, so write them in place (assign
  // below), never by replacing the Tensor.
  std::vector<ParamSlot>& params() { return params_; }
  // Every gradient set to 0 (a fill: a NaN would survive NaN · 0).
  void zero_grads();
  // acc[index] += Σ g² over every gradient (acc: F64 on the backend).
  void add_grad_sum_squares(Tensor& acc, int64_t index);
  size_t groups() const { return groups_.size(); }
  const AdamWConfig& config() const { return cfg_; }

 private:
  AdamWConfig cfg_;
  struct Group {
    Tensor value, grad, m, v;  // flat [n]
    bool decay = true;
  };
  std::vector<ParamSlot> params_;
  std::vector<Group> groups_;
  Ops& ops_;
  int64_t t_ = 0;
};

// dst ← src (a host tensor, converted to dst's dtype) in place: dst may be a view into a
// flat buffer, which replacing the Tensor would detach.
void assign(Ops& ops, Tensor& dst, const Tensor& src);

struct Schedule {
  std::string kind = "cosine";  // cosine | linear | constant | constant_with_warmup
  int64_t total_steps = 1;      // T: optimizer steps
  int64_t warmup_steps = 0;     // W (from warmup_steps, or ceil(T·warmup_ratio))
  double min_lr_ratio = 0.0;    // cosine floor (axolotl's cosine_min_lr_ratio)
  // λ(step) for 0-based optimizer step s (update s uses λ(s)).
  double factor(int64_t s) const;
};

// W = warmup_steps if > 0, else ceil(T·ratio), as transformers' get_warmup_steps.
int64_t warmup_steps_for(int64_t total, int64_t warmup_steps, double warmup_ratio);

// Global L2 norm of the gradients (norm of per-tensor norms); when max_norm > 0 every
// gradient is multiplied by min(1, max_norm/(total + 1e-6)). Returns the pre-clip norm.
double clip_grad_norm(Ops& ops, std::vector<ParamSlot>& params, double max_norm);

}  // namespace tl
