// LoRA on the model's projections: y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ, and its backward
//   dB += s·dyᵀ·(drop(x)·Aᵀ);  d(xa) = s·dy·B;  dA += d(xa)ᵀ·drop(x);  dx += drop'(d(xa)·A).
#include <algorithm>
#include <fmt/format.h>

#include "core/weights.h"
#include "train/model/gemma4_model.h"

namespace tl {

LoraAdapter& Gemma4Model::attach_lora(const std::string& name, const Tensor& A, const Tensor& B, double scaling,
                                      double dropout, uint64_t dropout_seed) {
  Tensor* w = weight_slot(w_, name);
  if (!w || w->rank() != 2) throw Error(fmt::format("LoRA target '{}' is not a projection of this model", name));
  if (A.rank() != 2 || B.rank() != 2 || A.dim(1) != w->dim(1) || B.dim(0) != w->dim(0) || B.dim(1) != A.dim(0))
    throw Error(fmt::format("LoRA '{}': A {} and B {} do not fit the weight {}", name, shape_str(A.shape()),
                            shape_str(B.shape()), shape_str(w->shape())));
  if (dropout < 0 || dropout >= 1) throw Error(fmt::format("LoRA '{}': dropout {} not in [0, 1)", name, dropout));
  LoraAdapter a;
  a.name = name;
  // fp32 masters even beside bf16 activations (Ops::master_dtype): the backend rounds them
  // to bf16 for each product, and their gradients come out of its fp32 accumulators.
  const DType master = ops_.master_dtype();
  a.A = ops_.upload(A, master);
  a.B = ops_.upload(B, master);
  a.dA = ops_.zeros(A.shape(), master);
  a.dB = ops_.zeros(B.shape(), master);
  a.scaling = scaling;
  a.dropout = dropout;
  a.dropout_seed = dropout_seed;
  if (!lora_.count(w)) lora_order_.push_back(w);
  return lora_[w] = std::move(a);
}

std::vector<LoraAdapter*> Gemma4Model::adapters() {
  std::vector<LoraAdapter*> out;
  for (const Tensor* w : lora_order_) out.push_back(&lora_.at(w));
  return out;
}

// Inverted dropout: keep with probability 1−p and scale by 1/(1−p). The mask is a pure
// function of (seed, step, element), so a resumed run draws the same masks.
Tensor Gemma4Model::dropout_mask(const LoraAdapter& a, const Shape& shape) {
  Tensor mask = ops_.zeros(shape);
  ops_.dropout_mask(splitmix64(a.dropout_seed ^ splitmix64(step_)), a.dropout, mask);
  return mask;
}

void Gemma4Model::quantize_nf4(const std::string& name, DType stored, bool double_quant) {
  Tensor* w = weight_slot(w_, name);
  if (!w || w->rank() != 2) throw Error(fmt::format("NF4: '{}' is not a projection of this model", name));
  Tensor host = ops_.download(*w).to(stored == DType::F64 ? DType::F32 : stored);
  nf4_[w] = std::make_shared<const Nf4Tensor>(nf4_quantize(host, double_quant));
  *w = Tensor::wrap(nullptr, nullptr, w->shape(), w->dtype(), w->device());  // shape only
}

void Gemma4Model::set_nf4(const std::string& name, Nf4Tensor q) {
  Tensor* w = weight_slot(w_, name);
  if (!w || q.shape.size() != 2) throw Error(fmt::format("NF4: '{}' is not a projection of this model", name));
  if (w->defined() && w->shape() != q.shape)
    throw Error(fmt::format("NF4: '{}' has shape {} but the model's weight is {}", name, shape_str(q.shape),
                            shape_str(w->shape())));
  *w = Tensor::wrap(nullptr, nullptr, q.shape, ops_.act_dtype(), ops_.device());  // shape only
  nf4_[w] = std::make_shared<const Nf4Tensor>(std::move(q));
}

const Nf4Tensor* Gemma4Model::nf4(const std::string& name) {
  Tensor* w = weight_slot(w_, name);
  auto it = w ? nf4_.find(w) : nf4_.end();
  return it == nf4_.end() ? nullptr : it->second.get();
}

const Nf4Tensor* Gemma4Model::expert_nf4(const std::string& name, int64_t e) {
  Tensor* w = weight_slot(w_, name);
  auto it = w ? expert_nf4_.find(w) : expert_nf4_.end();
  if (it == expert_nf4_.end() || e < 0 || e >= int64_t(it->second->size())) return nullptr;
  return &(*it->second)[size_t(e)];
}

void Gemma4Model::linear(ForwardState& st, const Tensor& x, const Tensor& w, Tensor& y, int64_t column_block) {
  MatmulInputHold hold_x(ops_, x);  // read by the base product and the adapter's A
  if (auto q = nf4_.find(&w); q != nf4_.end()) {
    ops_.linear_nf4_forward(x, *q->second, y);
  } else if (column_block > 0 && column_block < w.dim(0)) {
    const int64_t n = x.dim(0), out = w.dim(0);
    Tensor block = ops_.empty({n, column_block});
    for (int64_t c = 0; c < out; c += column_block) {
      const int64_t width = std::min(column_block, out - c);
      Tensor part = width == column_block ? block : ops_.empty({n, width});
      ops_.linear_forward(x, w.slice_rows(c, c + width), part, false);
      ops_.copy_columns(part, 0, y, c, width);
    }
  } else {
    ops_.linear_forward(x, w, y, false);
  }
  auto it = lora_.find(&w);
  if (it == lora_.end()) return;
  const LoraAdapter& a = it->second;
  const int64_t n = y.dim(0);
  Tensor xd = x;
  if (training_ && a.dropout > 0) {
    xd = ops_.zeros(x.shape());
    ops_.mul(x, dropout_mask(a, x.shape()), xd);
  }
  // PEFT adds (xd·Aᵀ·Bᵀ)·s to y. The scale is applied on the rank-wide side instead,
  // xa = s·(xd·Aᵀ), and xa·Bᵀ accumulates straight into y: the same sum (exactly so for a
  // power-of-two s, within an ulp otherwise) without a [tokens × out] temporary and two
  // passes over it. The saved xa is the scaled one, which the backward relies on.
  Tensor xa = ops_.zeros({n, a.rank()});
  ops_.linear_forward(xd, a.A, xa);
  ops_.scale(xa, a.scaling);
  ops_.linear_forward(xa, a.B, y, /*accumulate=*/true);
  if (st.keep) st.lora_saved[&w] = {xd, xa};
}

void Gemma4Model::linear_backward(ForwardState& st, const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx,
                                  Tensor& dw) {
  // dy is read by the base's dx (and dW) and the adapter's B products, x by dW and dA.
  MatmulInputHold hold_dy(ops_, dy), hold_x(ops_, x);
  if (auto q = nf4_.find(&w); q != nf4_.end()) {
    if (dw.defined()) throw Error("a weight held in NF4 is frozen and has no gradient");
    if (dx.defined()) ops_.linear_nf4_backward(dy, *q->second, dx);
  } else {
    ops_.linear_backward(x, w, dy, dx, dw);
  }
  auto it = lora_.find(&w);
  if (it == lora_.end()) return;
  LoraAdapter& a = it->second;
  // With xa saved as s·(xd·Aᵀ) (forward): dB += dyᵀ·xa, and d(xd·Aᵀ) = s·(dy·B), scaled
  // on the rank-wide side rather than copying and scaling dy.
  const auto& [xd, xa] = st.lora_saved.at(&w);
  Tensor dxa = ops_.zeros(xa.shape());
  ops_.linear_backward(xa, a.B, dy, dxa, a.dB);
  ops_.scale(dxa, a.scaling);
  if (!dx.defined()) {
    Tensor none;
    ops_.linear_backward(xd, a.A, dxa, none, a.dA);
    return;
  }
  if (xd.same_data(x)) {  // no dropout: the input gradient goes straight into dx
    ops_.linear_backward(xd, a.A, dxa, dx, a.dA);
    return;
  }
  // With dropout, dx += d(xd)∘mask (the mask already holds 1/(1−p)); it is regenerated
  // from its seed rather than kept.
  Tensor dxd = ops_.zeros(x.shape());
  ops_.linear_backward(xd, a.A, dxa, dxd, a.dA);
  ops_.mul(dxd, dropout_mask(a, x.shape()), dxd);
  ops_.add(dx, dxd, dx);
}

}  // namespace tl
