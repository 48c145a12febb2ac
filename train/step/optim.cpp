#include "train/step/optim.h"

#include <cmath>
#include <numbers>

#include "core/tensor.h"

namespace tl {

AdamW::AdamW(AdamWConfig cfg, std::vector<ParamSlot> params, Ops& ops)
    : cfg_(cfg), params_(std::move(params)), ops_(ops) {
  for (auto& p : params_) {
    if (!p.m.defined()) p.m = ops_.zeros(p.value->shape(), p.value->dtype());
    if (!p.v.defined()) p.v = ops_.zeros(p.value->shape(), p.value->dtype());
  }
}

void AdamW::step(double lr, double grad_scale) {
  ++t_;
  // Bias corrections in double, as torch's non-capturable path computes them in Python.
  const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t_));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, double(t_));
  for (auto& p : params_) {
    const double wd = p.decay ? cfg_.weight_decay : 0.0;
    ops_.adamw_update(*p.value, *p.grad, p.m, p.v, lr, cfg_.beta1, cfg_.beta2, cfg_.eps, wd, bc1, bc2, grad_scale);
  }
}

double Schedule::factor(int64_t s) const {
  const double W = double(warmup_steps), T = double(total_steps);
  if (kind == "constant") return 1.0;
  if (s < warmup_steps) return double(s) / std::max(1.0, W);
  if (kind == "constant_with_warmup") return 1.0;
  const double progress = (double(s) - W) / std::max(1.0, T - W);
  if (kind == "linear") return std::max(0.0, (T - double(s)) / std::max(1.0, T - W));
  if (kind == "cosine") {
    double c = std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * 2.0 * 0.5 * progress)));
    return min_lr_ratio + (1.0 - min_lr_ratio) * c;
  }
  throw Error("unknown lr_scheduler '" + kind + "' (cosine, linear, constant, constant_with_warmup)");
}

int64_t warmup_steps_for(int64_t total, int64_t warmup_steps, double warmup_ratio) {
  if (warmup_steps > 0) return warmup_steps;
  return int64_t(std::ceil(double(total) * warmup_ratio));
}

double clip_grad_norm(Ops& ops, std::vector<ParamSlot>& params, double max_norm) {
  double sq = 0;
  for (auto& p : params) {
    double n = ops.norm2(*p.grad);
    sq += n * n;
  }
  const double total = std::sqrt(sq);
  if (max_norm > 0) {
    const double coef = std::min(1.0, max_norm / (total + 1e-6));
    for (auto& p : params) ops.scale(*p.grad, coef);  // always multiplied, as torch does
  }
  return total;
}

}  // namespace tl
