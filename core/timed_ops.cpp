#include "core/timed_ops.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <utility>

namespace tl {

namespace {

enum OpIndex {
  k_zeros,
  k_empty,
  k_upload,
  k_download,
  k_hold_matmul_input,
  k_release_matmul_input,
  k_linear_forward,
  k_linear_backward,
  k_linear_nf4_forward,
  k_linear_nf4_backward,
  k_embedding_forward,
  k_embedding_backward,
  k_rmsnorm_forward,
  k_rmsnorm_backward,
  k_rope_forward,
  k_rope_backward,
  k_attention_forward,
  k_attention_backward,
  k_attention_cached_forward,
  k_gelu_tanh_mul_forward,
  k_gelu_tanh_mul_backward,
  k_add,
  k_mul,
  k_scale,
  k_fill,
  k_scale_rows,
  k_softcap_forward,
  k_softcap_backward,
  k_copy_columns,
  k_dropout_mask,
  k_moe_route_forward,
  k_moe_route_backward,
  k_moe_experts_forward,
  k_moe_experts_backward,
  k_gather_rows,
  k_scatter_add_rows,
  k_scatter_rows,
  k_rowwise_dot,
  k_cross_entropy_sum,
  k_cross_entropy_backward,
  k_distill_kl_sum,
  k_distill_kl_backward,
  k_norm2,
  k_add_sum_squares,
  k_adamw_update,
  kOpCount
};

struct OpInfo {
  const char* name;
  const char* family;
};
constexpr OpInfo kOps[kOpCount] = {
    {"zeros", "memory"},
    {"empty", "memory"},
    {"upload", "memory"},
    {"download", "memory"},
    {"hold_matmul_input", "matmul"},
    {"release_matmul_input", "matmul"},
    {"linear_forward", "matmul"},
    {"linear_backward", "matmul"},
    {"linear_nf4_forward", "nf4 matmul"},
    {"linear_nf4_backward", "nf4 matmul"},
    {"embedding_forward", "embedding"},
    {"embedding_backward", "embedding"},
    {"rmsnorm_forward", "norm"},
    {"rmsnorm_backward", "norm"},
    {"rope_forward", "rope"},
    {"rope_backward", "rope"},
    {"attention_forward", "attention"},
    {"attention_backward", "attention"},
    {"attention_cached_forward", "attention"},
    {"gelu_tanh_mul_forward", "elementwise"},
    {"gelu_tanh_mul_backward", "elementwise"},
    {"add", "elementwise"},
    {"mul", "elementwise"},
    {"scale", "elementwise"},
    {"fill", "elementwise"},
    {"scale_rows", "elementwise"},
    {"softcap_forward", "elementwise"},
    {"softcap_backward", "elementwise"},
    {"copy_columns", "elementwise"},
    {"dropout_mask", "elementwise"},
    {"moe_route_forward", "moe"},
    {"moe_route_backward", "moe"},
    {"moe_experts_forward", "moe"},
    {"moe_experts_backward", "moe"},
    {"gather_rows", "moe"},
    {"scatter_add_rows", "moe"},
    {"scatter_rows", "moe"},
    {"rowwise_dot", "moe"},
    {"cross_entropy_sum", "loss"},
    {"cross_entropy_backward", "loss"},
    {"distill_kl_sum", "loss"},
    {"distill_kl_backward", "loss"},
    {"norm2", "optimizer"},
    {"add_sum_squares", "optimizer"},
    {"adamw_update", "optimizer"},
};

}  // namespace

TimedOps::TimedOps(Ops& inner, bool blame_each_op)
    : inner_(inner), blame_(blame_each_op), clock_(inner.make_clock()) {}
TimedOps::~TimedOps() = default;

template <class F>
auto TimedOps::timed(int op, F&& f) -> decltype(f()) {
  if (!enabled_) {
    if constexpr (std::is_void_v<decltype(f())>) {
      f();
      if (blame_) blame(op);
      return;
    } else {
      auto r = f();
      if (blame_) blame(op);
      return r;
    }
  }
  const size_t begin = clock_->mark();
  if constexpr (std::is_void_v<decltype(f())>) {
    f();
    finish(op, begin);
  } else {
    auto r = f();
    finish(op, begin);
    return r;
  }
}

void TimedOps::finish(int op, size_t begin) {
  spans_.push_back({op, begin, clock_->mark()});
  if (blame_) blame(op);
}

void TimedOps::blame(int op) {
  try {
    inner_.synchronize();
  } catch (const std::exception& e) {
    throw Error(fmt::format("{} failed: {}", kOps[op].name, e.what()));
  }
}

TimedOps::Times TimedOps::collect() {
  inner_.synchronize();
  std::vector<OpTime> ops(kOpCount);
  for (int i = 0; i < kOpCount; ++i) ops[size_t(i)] = {kOps[i].name, kOps[i].family, 0, 0.0};
  Times t;
  for (const Span& s : spans_) {
    OpTime& o = ops[size_t(s.op)];
    const double secs = clock_->seconds(s.begin, s.end);
    ++o.calls;
    o.seconds += secs;
    ++t.calls;
    t.seconds += secs;
  }
  spans_.clear();
  clock_->clear();
  std::map<std::string, OpTime> families;
  for (const OpTime& o : ops) {
    if (!o.calls) continue;
    t.by_op.push_back(o);
    OpTime& f = families[o.family];
    f.name = f.family = o.family;
    f.calls += o.calls;
    f.seconds += o.seconds;
  }
  for (auto& [name, f] : families) t.by_family.push_back(f);
  auto slowest = [](const OpTime& a, const OpTime& b) { return a.seconds > b.seconds; };
  std::sort(t.by_op.begin(), t.by_op.end(), slowest);
  std::sort(t.by_family.begin(), t.by_family.end(), slowest);
  return t;
}

std::string TimedOps::Times::table() const {
  std::string s = fmt::format("{:<14} {:>8} {:>11} {:>7}\n", "op family", "calls", "seconds", "share");
  for (const OpTime& f : by_family)
    s += fmt::format("{:<14} {:>8} {:>11.6f} {:>6.1f}%\n", f.family, f.calls, f.seconds,
                     seconds > 0 ? 100.0 * f.seconds / seconds : 0.0);
  s += fmt::format("{:<14} {:>8} {:>11.6f} {:>6.1f}%\n", "all", calls, seconds, 100.0);
  return s;
}

nlohmann::json TimedOps::Times::to_json() const {
  auto list = [](const std::vector<OpTime>& v) {
    nlohmann::json a = nlohmann::json::array();
    for (const OpTime& o : v) a.push_back({{"name", o.name}, {"family", o.family}, {"calls", o.calls}, {"seconds", o.seconds}});
    return a;
  };
  return {{"seconds", seconds}, {"calls", calls}, {"by_family", list(by_family)}, {"by_op", list(by_op)}};
}

Tensor TimedOps::zeros(Shape shape, DType dtype) {
  return timed(k_zeros, [&] { return inner_.zeros(std::move(shape), dtype); });
}
Tensor TimedOps::empty(Shape shape, DType dtype) {
  return timed(k_empty, [&] { return inner_.empty(std::move(shape), dtype); });
}
Tensor TimedOps::upload(const Tensor& host, DType dtype) {
  return timed(k_upload, [&] { return inner_.upload(host, dtype); });
}
Tensor TimedOps::download(const Tensor& t) {
  return timed(k_download, [&] { return inner_.download(t); });
}
void TimedOps::hold_matmul_input(const Tensor& x) {
  return timed(k_hold_matmul_input, [&] { return inner_.hold_matmul_input(x); });
}
void TimedOps::release_matmul_input() {
  return timed(k_release_matmul_input, [&] { return inner_.release_matmul_input(); });
}
void TimedOps::linear_forward(const Tensor& x, const Tensor& w, Tensor& y, bool accumulate) {
  return timed(k_linear_forward, [&] { return inner_.linear_forward(x, w, y, accumulate); });
}
void TimedOps::embedding_forward(const Tensor& table, const Tensor& ids, double scale, Tensor& out) {
  return timed(k_embedding_forward, [&] { return inner_.embedding_forward(table, ids, scale, out); });
}
void TimedOps::rmsnorm_forward(const Tensor& x, const Tensor& w, int64_t width, double eps, Tensor& y) {
  return timed(k_rmsnorm_forward, [&] { return inner_.rmsnorm_forward(x, w, width, eps, y); });
}
void TimedOps::rope_forward(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq) {
  return timed(k_rope_forward, [&] { return inner_.rope_forward(x, heads, positions, inv_freq); });
}
void TimedOps::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask, Tensor& out) {
  return timed(k_attention_forward, [&] { return inner_.attention_forward(q, k, v, mask, out); });
}
void TimedOps::attention_cached_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos, const Tensor& k_pos, int64_t window, Tensor& out) {
  return timed(k_attention_cached_forward, [&] { return inner_.attention_cached_forward(q, k, v, q_pos, k_pos, window, out); });
}
void TimedOps::gelu_tanh_mul_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  return timed(k_gelu_tanh_mul_forward, [&] { return inner_.gelu_tanh_mul_forward(gate, up, out); });
}
void TimedOps::add(const Tensor& a, const Tensor& b, Tensor& out) {
  return timed(k_add, [&] { return inner_.add(a, b, out); });
}
void TimedOps::mul(const Tensor& a, const Tensor& b, Tensor& out) {
  return timed(k_mul, [&] { return inner_.mul(a, b, out); });
}
void TimedOps::scale(Tensor& x, double s) {
  return timed(k_scale, [&] { return inner_.scale(x, s); });
}
void TimedOps::fill(Tensor& x, double value) {
  return timed(k_fill, [&] { return inner_.fill(x, value); });
}
void TimedOps::scale_rows(Tensor& x, const Tensor& s) {
  return timed(k_scale_rows, [&] { return inner_.scale_rows(x, s); });
}
void TimedOps::softcap_forward(Tensor& x, double cap) {
  return timed(k_softcap_forward, [&] { return inner_.softcap_forward(x, cap); });
}
void TimedOps::copy_columns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t w) {
  return timed(k_copy_columns, [&] { return inner_.copy_columns(src, src_col, dst, dst_col, w); });
}
void TimedOps::moe_route_forward(const Tensor& logits, const Tensor& per_expert_scale, int64_t k, Tensor& weights, Tensor& idx) {
  return timed(k_moe_route_forward, [&] { return inner_.moe_route_forward(logits, per_expert_scale, k, weights, idx); });
}
void TimedOps::moe_experts_forward(const Tensor& y, const Tensor& idx, const Tensor& weights,
                                   const MoeExperts& experts, Tensor& out, MoeTape& tape) {
  return timed(k_moe_experts_forward, [&] { return inner_.moe_experts_forward(y, idx, weights, experts, out, tape); });
}
void TimedOps::moe_experts_backward(const Tensor& y, const Tensor& idx, const Tensor& weights,
                                    const MoeExperts& experts, const MoeTape& tape, const Tensor& dout, Tensor& dy,
                                    Tensor& dweights) {
  return timed(k_moe_experts_backward,
               [&] { return inner_.moe_experts_backward(y, idx, weights, experts, tape, dout, dy, dweights); });
}
void TimedOps::gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) {
  return timed(k_gather_rows, [&] { return inner_.gather_rows(src, rows, out); });
}
void TimedOps::scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, Tensor& dst) {
  return timed(k_scatter_add_rows, [&] { return inner_.scatter_add_rows(src, rows, scale, dst); });
}
double TimedOps::cross_entropy_sum(const Tensor& logits, const Tensor& labels, int64_t& count) {
  return timed(k_cross_entropy_sum, [&] { return inner_.cross_entropy_sum(logits, labels, count); });
}
void TimedOps::linear_nf4_forward(const Tensor& x, const Nf4Tensor& w, Tensor& y) {
  return timed(k_linear_nf4_forward, [&] { return inner_.linear_nf4_forward(x, w, y); });
}
void TimedOps::linear_nf4_backward(const Tensor& dy, const Nf4Tensor& w, Tensor& dx) {
  return timed(k_linear_nf4_backward, [&] { return inner_.linear_nf4_backward(dy, w, dx); });
}
void TimedOps::dropout_mask(uint64_t seed, double p, Tensor& mask) {
  return timed(k_dropout_mask, [&] { return inner_.dropout_mask(seed, p, mask); });
}

double TimedOps::norm2(const Tensor& x) {
  return timed(k_norm2, [&] { return inner_.norm2(x); });
}
void TimedOps::adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                            double eps, double wd, double bc1, double bc2, double grad_scale) {
  return timed(k_adamw_update,
               [&] { return inner_.adamw_update(p, g, m, v, lr, beta1, beta2, eps, wd, bc1, bc2, grad_scale); });
}
void TimedOps::add_sum_squares(const Tensor& x, Tensor& acc, int64_t index) {
  return timed(k_add_sum_squares, [&] { return inner_.add_sum_squares(x, acc, index); });
}
void TimedOps::linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw) {
  return timed(k_linear_backward, [&] { return inner_.linear_backward(x, w, dy, dx, dw); });
}
void TimedOps::embedding_backward(const Tensor& ids, const Tensor& dout, double scale, int64_t skip_id, Tensor& dtable) {
  return timed(k_embedding_backward, [&] { return inner_.embedding_backward(ids, dout, scale, skip_id, dtable); });
}
void TimedOps::rmsnorm_backward(const Tensor& x, const Tensor& w, int64_t width, double eps, const Tensor& dy, Tensor& dx, Tensor& dw) {
  return timed(k_rmsnorm_backward, [&] { return inner_.rmsnorm_backward(x, w, width, eps, dy, dx, dw); });
}
void TimedOps::rope_backward(Tensor& dx, int64_t heads, const Tensor& positions, const Tensor& inv_freq) {
  return timed(k_rope_backward, [&] { return inner_.rope_backward(dx, heads, positions, inv_freq); });
}
void TimedOps::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) {
  return timed(k_attention_backward, [&] { return inner_.attention_backward(q, k, v, mask, dout, dq, dk, dv); });
}
void TimedOps::gelu_tanh_mul_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate, Tensor& dup) {
  return timed(k_gelu_tanh_mul_backward, [&] { return inner_.gelu_tanh_mul_backward(gate, up, dout, dgate, dup); });
}
void TimedOps::softcap_backward(const Tensor& y, double cap, Tensor& dy) {
  return timed(k_softcap_backward, [&] { return inner_.softcap_backward(y, cap, dy); });
}
void TimedOps::moe_route_backward(const Tensor& logits, const Tensor& per_expert_scale, const Tensor& idx, const Tensor& dweights, Tensor& dlogits, Tensor& dscale) {
  return timed(k_moe_route_backward, [&] { return inner_.moe_route_backward(logits, per_expert_scale, idx, dweights, dlogits, dscale); });
}
void TimedOps::scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) {
  return timed(k_scatter_rows, [&] { return inner_.scatter_rows(src, rows, dst); });
}
void TimedOps::rowwise_dot(const Tensor& a, const Tensor& rows, const Tensor& b, Tensor& out) {
  return timed(k_rowwise_dot, [&] { return inner_.rowwise_dot(a, rows, b, out); });
}
void TimedOps::cross_entropy_backward(const Tensor& logits, const Tensor& labels, double grad_scale, double cap,
                                      Tensor& dlogits, Tensor& sums) {
  return timed(k_cross_entropy_backward,
               [&] { return inner_.cross_entropy_backward(logits, labels, grad_scale, cap, dlogits, sums); });
}
Ops::DistillSums TimedOps::distill_kl_sum(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                          double temperature, int64_t top_k) {
  return timed(k_distill_kl_sum, [&] { return inner_.distill_kl_sum(student, teacher, labels, temperature, top_k); });
}
void TimedOps::distill_kl_backward(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                   double temperature, int64_t top_k, double weight, double cap, Tensor& dstudent,
                                   Tensor& sums) {
  timed(k_distill_kl_backward, [&] {
    inner_.distill_kl_backward(student, teacher, labels, temperature, top_k, weight, cap, dstudent, sums);
  });
}

}  // namespace tl
