#include "train/step/optim.h"

#include <fmt/format.h>

#include <cmath>
#include <numbers>

#include "core/tensor.h"

namespace tl {

namespace {
// dst ← src, both on the backend, same dtype and size (copy_columns of one-row views).
void copy_into(Ops& ops, const Tensor& src, Tensor& dst) {
  const int64_t n = src.numel();
  if (n == 0) return;
  Tensor d = dst.view({1, n});
  ops.copy_columns(src.view({1, n}), 0, d, 0, n);
}
}  // namespace

void assign(Ops& ops, Tensor& dst, const Tensor& src) {
  if (src.numel() != dst.numel())
    throw Error(fmt::format("assign: {} values into a tensor of {}", src.numel(), dst.numel()));
  copy_into(ops, ops.upload(src, dst.dtype()), dst);
}

AdamW::AdamW(AdamWConfig cfg, std::vector<ParamSlot> params, Ops& ops)
    : cfg_(cfg), params_(std::move(params)), ops_(ops) {
  // Groups in the order their first slot appears, slots in their own order within a group.
  std::vector<std::pair<DType, bool>> keys;
  std::vector<std::vector<size_t>> members;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::pair<DType, bool> key{params_[i].value->dtype(), params_[i].decay};
    size_t g = 0;
    while (g < keys.size() && keys[g] != key) ++g;
    if (g == keys.size()) keys.push_back(key), members.emplace_back();
    members[g].push_back(i);
  }
  for (size_t g = 0; g < keys.size(); ++g) {
    int64_t total = 0;
    for (size_t i : members[g]) total += params_[i].value->numel();
    const DType dt = keys[g].first;
    Group group{ops_.zeros({total}, dt), ops_.zeros({total}, dt), ops_.zeros({total}, dt), ops_.zeros({total}, dt),
                keys[g].second};
    int64_t off = 0;
    for (size_t i : members[g]) {
      ParamSlot& p = params_[i];
      const Shape shape = p.value->shape();
      const int64_t n = p.value->numel();
      auto at = [&](const Tensor& flat) { return flat.slice_rows(off, off + n).view(shape); };
      Tensor value = at(group.value), grad = at(group.grad), m = at(group.m), v = at(group.v);
      copy_into(ops_, *p.value, value);
      if (p.m.defined()) copy_into(ops_, p.m, m);
      if (p.v.defined()) copy_into(ops_, p.v, v);
      *p.value = value;
      if (p.grad) *p.grad = grad;
      p.m = m;
      p.v = v;
      off += n;
    }
    groups_.push_back(std::move(group));
  }
}

void AdamW::step(double lr, double grad_scale) {
  ++t_;
  // Bias corrections in double, as torch's non-capturable path computes them in Python.
  const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t_));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, double(t_));
  for (Group& g : groups_) {
    const double wd = g.decay ? cfg_.weight_decay : 0.0;
    ops_.adamw_update(g.value, g.grad, g.m, g.v, lr, cfg_.beta1, cfg_.beta2, cfg_.eps, wd, bc1, bc2, grad_scale);
  }
}

void AdamW::zero_grads() {
  for (Group& g : groups_) ops_.fill(g.grad, 0.0);
}

void AdamW::add_grad_sum_squares(Tensor& acc, int64_t index) {
  for (Group& g : groups_) ops_.add_sum_squares(g.grad, acc, index);
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
