#include "core/cpu/strict_ops.h"

#include <cstring>
#include <initializer_list>
#include <memory>

namespace tl {

namespace {
// Opens device access for one operation after checking that every tensor argument that the
// interface puts on the device is there: a host tensor handed to a device op is the wiring
// fault a GPU would turn into a crash or garbage.
class Scope {
 public:
  Scope(const char* op, std::initializer_list<const Tensor*> device_args) {
    int i = 0;
    for (const Tensor* t : device_args) {
      ++i;
      if (t && t->defined() && t->device() != Device::Strict)
        throw std::logic_error(std::string("strict device: ") + op + ": argument " + std::to_string(i) + " " +
                               shape_str(t->shape()) + " is a host tensor (upload it first)");
    }
  }

 private:
  DeviceAccess access_;
};
}  // namespace

Tensor StrictOps::to_device(const Tensor& host) {
  auto keep = std::make_shared<Tensor>(host);
  return Tensor::wrap(keep, host.raw(), host.shape(), host.dtype(), Device::Strict);
}

Tensor StrictOps::zeros(Shape shape, DType dtype) { return to_device(cpu_.zeros(std::move(shape), dtype)); }
Tensor StrictOps::empty(Shape shape, DType dtype) { return to_device(cpu_.empty(std::move(shape), dtype)); }

Tensor StrictOps::upload(const Tensor& host, DType dtype) {
  if (host.device() != Device::CPU)
    throw std::logic_error("strict device: upload of a tensor " + shape_str(host.shape()) + " that is not on the host");
  ++stats_.uploads;
  stats_.upload_bytes += int64_t(host.nbytes());
  return to_device(host.to(dtype));  // always a copy: the host keeps no alias of device memory
}

Tensor StrictOps::download(const Tensor& t) {
  Scope s("download", {&t});
  ++stats_.downloads;
  stats_.download_bytes += int64_t(t.nbytes());
  Tensor out = Tensor::zeros(t.shape(), t.dtype());
  std::memcpy(out.raw(), t.raw(), t.nbytes());
  return out;
}

void StrictOps::hold_matmul_input(const Tensor& x) {
  Scope s("hold_matmul_input", {&x});
  cpu_.hold_matmul_input(x);
}
void StrictOps::linear_forward(const Tensor& x, const Tensor& w, Tensor& y, bool accumulate) {
  Scope s("linear_forward", {&x, &w, &y});
  cpu_.linear_forward(x, w, y, accumulate);
}
void StrictOps::embedding_forward(const Tensor& table, const Tensor& ids, double scale, Tensor& out) {
  Scope s("embedding_forward", {&table, &ids, &out});
  cpu_.embedding_forward(table, ids, scale, out);
}
void StrictOps::rmsnorm_forward(const Tensor& x, const Tensor& w, int64_t width, double eps, Tensor& y) {
  Scope s("rmsnorm_forward", {&x, &w, &y});
  cpu_.rmsnorm_forward(x, w, width, eps, y);
}
// inv_freq is device data like the rest: the model uploads it once, at load.
void StrictOps::rope_forward(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq) {
  Scope s("rope_forward", {&x, &positions, &inv_freq});
  cpu_.rope_forward(x, heads, positions, inv_freq);
}
void StrictOps::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                                  Tensor& out) {
  Scope s("attention_forward", {&q, &k, &v, mask.doc_ids, &out, mask.lse});
  cpu_.attention_forward(q, k, v, mask, out);
}
void StrictOps::gelu_tanh_mul_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  Scope s("gelu_tanh_mul_forward", {&gate, &up, &out});
  cpu_.gelu_tanh_mul_forward(gate, up, out);
}
void StrictOps::add(const Tensor& a, const Tensor& b, Tensor& out) {
  Scope s("add", {&a, &b, &out});
  cpu_.add(a, b, out);
}
void StrictOps::mul(const Tensor& a, const Tensor& b, Tensor& out) {
  Scope s("mul", {&a, &b, &out});
  cpu_.mul(a, b, out);
}
void StrictOps::scale(Tensor& x, double v) {
  Scope s("scale", {&x});
  cpu_.scale(x, v);
}
void StrictOps::fill(Tensor& x, double value) {
  Scope s("fill", {&x});
  cpu_.fill(x, value);
}
void StrictOps::scale_rows(Tensor& x, const Tensor& v) {
  Scope s("scale_rows", {&x, &v});
  cpu_.scale_rows(x, v);
}
void StrictOps::softcap_forward(Tensor& x, double cap) {
  Scope s("softcap_forward", {&x});
  cpu_.softcap_forward(x, cap);
}
void StrictOps::copy_columns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t w) {
  Scope s("copy_columns", {&src, &dst});
  cpu_.copy_columns(src, src_col, dst, dst_col, w);
}
void StrictOps::moe_route_forward(const Tensor& logits, const Tensor& per_expert_scale, int64_t k, Tensor& weights,
                                  Tensor& idx) {
  Scope s("moe_route_forward", {&logits, &per_expert_scale, &weights, &idx});
  cpu_.moe_route_forward(logits, per_expert_scale, k, weights, idx);
}
// The experts' dense tensors are device data; NF4 experts are the backend's own state. The
// tape's tensors are made by the backend on the device.
void StrictOps::moe_experts_forward(const Tensor& y, const Tensor& idx, const Tensor& weights,
                                    const MoeExperts& experts, Tensor& out, MoeTape& tape) {
  Scope s("moe_experts_forward", {&y, &idx, &weights, &out, experts.gate_up_nf4 ? nullptr : experts.gate_up,
                                  experts.down_nf4 ? nullptr : experts.down});
  cpu_.moe_experts_forward(y, idx, weights, experts, out, tape);
  for (Tensor* t : {&tape.gate, &tape.up, &tape.h, &tape.out})
    if (t->defined()) *t = to_device(*t);
}
void StrictOps::moe_experts_backward(const Tensor& y, const Tensor& idx, const Tensor& weights,
                                     const MoeExperts& experts, const MoeTape& tape, const Tensor& dout, Tensor& dy,
                                     Tensor& dweights) {
  Scope s("moe_experts_backward", {&y, &idx, &weights, &tape.gate, &tape.up, &tape.h, &tape.out, &dout, &dy,
                                   &dweights});
  cpu_.moe_experts_backward(y, idx, weights, experts, tape, dout, dy, dweights);
}
void StrictOps::gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) {
  Scope s("gather_rows", {&src, &rows, &out});
  cpu_.gather_rows(src, rows, out);
}
void StrictOps::scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, Tensor& dst) {
  Scope s("scatter_add_rows", {&src, &rows, &scale, &dst});
  cpu_.scatter_add_rows(src, rows, scale, dst);
}
double StrictOps::cross_entropy_sum(const Tensor& logits, const Tensor& labels, int64_t& count) {
  Scope s("cross_entropy_sum", {&logits, &labels});
  scalar(2);  // the sum and the count
  return cpu_.cross_entropy_sum(logits, labels, count);
}
// The NF4 weight is the backend's own state (a device buffer on the GPU), not a Tensor.
void StrictOps::linear_nf4_forward(const Tensor& x, const Nf4Tensor& w, Tensor& y) {
  Scope s("linear_nf4_forward", {&x, &y});
  cpu_.linear_nf4_forward(x, w, y);
}
void StrictOps::linear_nf4_backward(const Tensor& dy, const Nf4Tensor& w, Tensor& dx) {
  Scope s("linear_nf4_backward", {&dy, &dx});
  cpu_.linear_nf4_backward(dy, w, dx);
}

void StrictOps::dropout_mask(uint64_t seed, double p, Tensor& mask) {
  Scope s("dropout_mask", {&mask});
  cpu_.dropout_mask(seed, p, mask);
}
void StrictOps::attention_cached_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos,
                                         const Tensor& k_pos, int64_t window, Tensor& out) {
  Scope s("attention_cached_forward", {&q, &k, &v, &out});  // positions: host or device
  // CpuOps' (the interface's default) result is a new host tensor: copy it into out's
  // device memory, as a backend writing in place would.
  Tensor result = out;
  cpu_.attention_cached_forward(q, k, v, q_pos, k_pos, window, result);
  if (result.raw() != out.raw()) std::memcpy(out.raw(), result.raw(), out.nbytes());
}
double StrictOps::norm2(const Tensor& x) {
  Scope s("norm2", {&x});
  scalar(1);
  return cpu_.norm2(x);
}
void StrictOps::adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                    double eps, double wd, double bc1, double bc2, double grad_scale) {
  Scope s("adamw_update", {&p, &g, &m, &v});
  cpu_.adamw_update(p, g, m, v, lr, beta1, beta2, eps, wd, bc1, bc2, grad_scale);
}
void StrictOps::add_sum_squares(const Tensor& x, Tensor& acc, int64_t index) {
  Scope s("add_sum_squares", {&x, &acc});
  cpu_.add_sum_squares(x, acc, index);
}
void StrictOps::linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw) {
  Scope s("linear_backward", {&x, &w, &dy, &dx, &dw});
  cpu_.linear_backward(x, w, dy, dx, dw);
}
void StrictOps::embedding_backward(const Tensor& ids, const Tensor& dout, double scale, int64_t skip_id,
                                   Tensor& dtable) {
  Scope s("embedding_backward", {&ids, &dout, &dtable});
  cpu_.embedding_backward(ids, dout, scale, skip_id, dtable);
}
void StrictOps::rmsnorm_backward(const Tensor& x, const Tensor& w, int64_t width, double eps, const Tensor& dy,
                                 Tensor& dx, Tensor& dw) {
  Scope s("rmsnorm_backward", {&x, &w, &dy, &dx, &dw});
  cpu_.rmsnorm_backward(x, w, width, eps, dy, dx, dw);
}
void StrictOps::rope_backward(Tensor& dx, int64_t heads, const Tensor& positions, const Tensor& inv_freq) {
  Scope s("rope_backward", {&dx, &positions, &inv_freq});
  cpu_.rope_backward(dx, heads, positions, inv_freq);
}
void StrictOps::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                                   const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) {
  Scope s("attention_backward", {&q, &k, &v, mask.doc_ids, &dout, &dq, &dk, &dv, mask.lse});
  cpu_.attention_backward(q, k, v, mask, dout, dq, dk, dv);
}
void StrictOps::gelu_tanh_mul_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                                       Tensor& dup) {
  Scope s("gelu_tanh_mul_backward", {&gate, &up, &dout, &dgate, &dup});
  cpu_.gelu_tanh_mul_backward(gate, up, dout, dgate, dup);
}
void StrictOps::softcap_backward(const Tensor& y, double cap, Tensor& dy) {
  Scope s("softcap_backward", {&y, &dy});
  cpu_.softcap_backward(y, cap, dy);
}
void StrictOps::moe_route_backward(const Tensor& logits, const Tensor& per_expert_scale, const Tensor& idx,
                                   const Tensor& dweights, Tensor& dlogits, Tensor& dscale) {
  Scope s("moe_route_backward", {&logits, &per_expert_scale, &idx, &dweights, &dlogits, &dscale});
  cpu_.moe_route_backward(logits, per_expert_scale, idx, dweights, dlogits, dscale);
}
void StrictOps::scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) {
  Scope s("scatter_rows", {&src, &rows, &dst});
  cpu_.scatter_rows(src, rows, dst);
}
void StrictOps::rowwise_dot(const Tensor& a, const Tensor& rows, const Tensor& b, Tensor& out) {
  Scope s("rowwise_dot", {&a, &rows, &b, &out});
  cpu_.rowwise_dot(a, rows, b, out);
}
void StrictOps::cross_entropy_backward(const Tensor& logits, const Tensor& labels, double grad_scale, double cap,
                                      Tensor& dlogits, Tensor& sums) {
  Scope s("cross_entropy_backward", {&logits, &labels, &dlogits, &sums});
  cpu_.cross_entropy_backward(logits, labels, grad_scale, cap, dlogits, sums);
}
Ops::DistillSums StrictOps::distill_kl_sum(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                           double temperature, int64_t top_k) {
  Scope s("distill_kl_sum", {&student, &teacher, &labels});
  scalar(3);  // the KL sum, the count and the agreements
  return cpu_.distill_kl_sum(student, teacher, labels, temperature, top_k);
}
void StrictOps::distill_kl_backward(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                    double temperature, int64_t top_k, double weight, double cap, Tensor& dstudent,
                                    Tensor& sums) {
  Scope s("distill_kl_backward", {&student, &teacher, &labels, &dstudent, &sums});
  cpu_.distill_kl_backward(student, teacher, labels, temperature, top_k, weight, cap, dstudent, sums);
}

}  // namespace tl
