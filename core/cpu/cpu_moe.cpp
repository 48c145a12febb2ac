// The routed experts of a MoE layer on the CPU (Ops::moe_experts_forward / _backward): the
// reference. Routing is read where it lives (host memory is this backend's device), the rows
// of each expert gathered in token order and multiplied by its weights (dense or NF4), as the
// model's own per-expert loop did; the tape is kept per routed slot t·K + k.
#include <vector>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/cpu_util.h"
#include "core/nf4.h"

namespace tl {

using cpu::require;

namespace {

// The slots routed to each expert, in slot order (so tokens in order): slots[e].
std::vector<std::vector<int32_t>> slots_by_expert(const Tensor& idx, int64_t E) {
  require(idx.dtype() == DType::I32, "moe idx must be I32");
  std::vector<std::vector<int32_t>> slots(static_cast<size_t>(E));
  const int32_t* p = idx.data<int32_t>();
  for (int64_t s = 0; s < idx.numel(); ++s) {
    require(p[s] >= 0 && p[s] < E, "moe idx outside the experts");
    slots[size_t(p[s])].push_back(int32_t(s));
  }
  return slots;
}

Tensor host_ints(const std::vector<int32_t>& v) {
  Tensor t = Tensor::zeros({int64_t(v.size())}, DType::I32);
  for (size_t i = 0; i < v.size(); ++i) t.data<int32_t>()[i] = v[i];
  return t;
}

// One expert's routed slots as row lists: the slots themselves (into the tape and the
// weights) and their tokens (slot / K, into y and out).
struct ExpertRows {
  Tensor slots, tokens;
  int64_t m = 0;
};
ExpertRows expert_rows(const std::vector<int32_t>& s, int64_t K) {
  std::vector<int32_t> tokens(s.size());
  for (size_t j = 0; j < s.size(); ++j) tokens[j] = int32_t(s[j] / K);
  return {host_ints(s), host_ints(tokens), int64_t(s.size())};
}

void check(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& x) {
  require(y.rank() == 2 && idx.rank() == 2 && idx.dim(0) == y.dim(0) && weights.numel() == idx.numel(),
          "moe shapes: y [n, H], idx and weights [n, K]");
  require(x.num_experts > 0 && x.intermediate > 0 && (x.gate_up_nf4 || x.gate_up) && (x.down_nf4 || x.down),
          "moe experts");
}

}  // namespace

void CpuOps::expert_product(const MoeExperts& x, bool gate_up, int64_t e, const Tensor& in, Tensor& out) {
  const std::vector<Nf4Tensor>* q = gate_up ? x.gate_up_nf4 : x.down_nf4;
  if (q) return linear_nf4_forward(in, (*q)[size_t(e)], out);
  const Tensor& w = gate_up ? *x.gate_up : *x.down;
  linear_forward(in, w.slice_rows(e, e + 1).view({w.dim(1), w.dim(2)}), out, false);
}

void CpuOps::expert_product_backward(const MoeExperts& x, bool gate_up, int64_t e, const Tensor& in,
                                     const Tensor& dout, Tensor& din) {
  const std::vector<Nf4Tensor>* q = gate_up ? x.gate_up_nf4 : x.down_nf4;
  if (q) return linear_nf4_backward(dout, (*q)[size_t(e)], din);
  const Tensor& w = gate_up ? *x.gate_up : *x.down;
  Tensor none;
  linear_backward(in, w.slice_rows(e, e + 1).view({w.dim(1), w.dim(2)}), dout, din, none);
}

void CpuOps::moe_experts_forward(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& x,
                                 Tensor& out, MoeTape& tape) {
  check(y, idx, weights, x);
  const int64_t H = y.dim(1), I = x.intermediate, slots = idx.numel();
  tape.gate = zeros({slots, I}, act_);
  tape.up = zeros({slots, I}, act_);
  tape.h = zeros({slots, I}, act_);
  tape.out = zeros({slots, H}, act_);
  const int64_t K = idx.dim(1);
  const auto by_expert = slots_by_expert(idx, x.num_experts);
  for (int64_t e = 0; e < x.num_experts; ++e) {
    const std::vector<int32_t>& s = by_expert[size_t(e)];
    if (s.empty()) continue;
    const ExpertRows r = expert_rows(s, K);
    const int64_t m = r.m;
    const Tensor &rows = r.tokens, &slot_rows = r.slots;
    Tensor scales = empty({m}, act_), scales_col = scales.view({m, 1});
    gather_rows(weights.view({slots, 1}), slot_rows, scales_col);
    Tensor ye = empty({m, H}, act_), gu = empty({m, 2 * I}, act_);
    gather_rows(y, rows, ye);
    expert_product(x, true, e, ye, gu);
    Tensor gate = empty({m, I}, act_), up = empty({m, I}, act_), h = empty({m, I}, act_), o = empty({m, H}, act_);
    copy_columns(gu, 0, gate, 0, I);  // rows [0, I) of gate_up_proj are the gate
    copy_columns(gu, I, up, 0, I);
    gelu_tanh_mul_forward(gate, up, h);
    expert_product(x, false, e, h, o);
    scatter_add_rows(o, rows, scales, out);
    // Into the tape, per slot (scatter_rows adds into zeros: a copy).
    scatter_rows(gate, slot_rows, tape.gate);
    scatter_rows(up, slot_rows, tape.up);
    scatter_rows(h, slot_rows, tape.h);
    scatter_rows(o, slot_rows, tape.out);
  }
}

void CpuOps::moe_experts_backward(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& x,
                                  const MoeTape& tape, const Tensor& dout, Tensor& dy, Tensor& dweights) {
  check(y, idx, weights, x);
  const int64_t H = y.dim(1), I = x.intermediate, slots = idx.numel(), K = idx.dim(1);
  require(dweights.numel() == slots, "moe dweights [n, K]");
  // dweights[t,k] = ⟨o_{t,k}, dout[t]⟩ for every slot at once.
  std::vector<int32_t> token_of_slot(static_cast<size_t>(slots));
  for (int64_t s = 0; s < slots; ++s) token_of_slot[size_t(s)] = int32_t(s / K);
  Tensor dw = dweights.view({slots});
  rowwise_dot(tape.out, host_ints(token_of_slot), dout, dw);
  const auto by_expert = slots_by_expert(idx, x.num_experts);
  for (int64_t e = 0; e < x.num_experts; ++e) {
    const std::vector<int32_t>& s = by_expert[size_t(e)];
    if (s.empty()) continue;
    const ExpertRows r = expert_rows(s, K);
    const int64_t m = r.m;
    const Tensor &rows = r.tokens, &slot_rows = r.slots;
    Tensor scales = empty({m}, act_), gate = empty({m, I}, act_), up = empty({m, I}, act_), h = empty({m, I}, act_),
           ye = empty({m, H}, act_), scales_col = scales.view({m, 1});
    gather_rows(weights.view({slots, 1}), slot_rows, scales_col);
    gather_rows(tape.gate, slot_rows, gate);
    gather_rows(tape.up, slot_rows, up);
    gather_rows(tape.h, slot_rows, h);
    gather_rows(y, rows, ye);
    // out[t] += w·o:  do = w·dout[t]
    Tensor d_o = empty({m, H}, act_);
    gather_rows(dout, rows, d_o);
    scale_rows(d_o, scales);
    Tensor dh = zeros({m, I}, act_), dgate = zeros({m, I}, act_), dup = zeros({m, I}, act_);
    expert_product_backward(x, false, e, h, d_o, dh);
    gelu_tanh_mul_backward(gate, up, dh, dgate, dup);
    Tensor dgu = empty({m, 2 * I}, act_), dye = zeros({m, H}, act_);
    copy_columns(dgate, 0, dgu, 0, I);
    copy_columns(dup, 0, dgu, I, I);
    expert_product_backward(x, true, e, ye, dgu, dye);
    scatter_rows(dye, rows, dy);
  }
}

}  // namespace tl
