// The CPU backend's strict-device mode: CpuOps whose tensors count as device memory
// (Device::Strict), so host code that reads or writes their data throws, and whose
// host<->device transfers are counted. Tests run the trainer under it to prove the wiring
// would work unchanged on a GPU: every touch of device data goes through an Ops call, and
// the per-step traffic is the batch and a few scalars.
#pragma once
#include "core/cpu/cpu_ops.h"

namespace tl {

struct TransferStats {
  int64_t uploads = 0, upload_bytes = 0;      // host -> device (upload)
  int64_t downloads = 0, download_bytes = 0;  // device -> host (download)
  int64_t scalar_reads = 0, scalar_bytes = 0; // results returned to the host (norms, loss sums, counts)
  int64_t total_bytes() const { return upload_bytes + download_bytes + scalar_bytes; }
};

class StrictOps final : public Ops {
 public:
  explicit StrictOps(DType act = DType::F32, CpuMatmul matmul = CpuMatmul::F32) : cpu_(act, matmul) {}
  Device device() const override { return Device::Strict; }
  DType act_dtype() const override { return cpu_.act_dtype(); }
  DType frozen_dtype() const override { return cpu_.frozen_dtype(); }
  const TransferStats& transfers() const { return stats_; }

  Tensor zeros(Shape shape, DType dtype) override;
  using Ops::zeros;
  Tensor empty(Shape shape, DType dtype) override;
  using Ops::empty;
  Tensor upload(const Tensor& host, DType dtype) override;
  Tensor download(const Tensor& t) override;

  void hold_matmul_input(const Tensor& x) override;
  void release_matmul_input() override { cpu_.release_matmul_input(); }
  void linear_forward(const Tensor& x, const Tensor& w, Tensor& y, bool accumulate) override;
  void embedding_forward(const Tensor& table, const Tensor& ids, double scale, Tensor& out) override;
  void rmsnorm_forward(const Tensor& x, const Tensor& w, int64_t width, double eps, Tensor& y) override;
  void rope_forward(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq) override;
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                         Tensor& out) override;
  void gelu_tanh_mul_forward(const Tensor& gate, const Tensor& up, Tensor& out) override;
  void add(const Tensor& a, const Tensor& b, Tensor& out) override;
  void mul(const Tensor& a, const Tensor& b, Tensor& out) override;
  void scale(Tensor& x, double s) override;
  void fill(Tensor& x, double value) override;
  void scale_rows(Tensor& x, const Tensor& s) override;
  void softcap_forward(Tensor& x, double cap) override;
  void copy_columns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t w) override;
  void moe_route_forward(const Tensor& logits, const Tensor& per_expert_scale, int64_t k, Tensor& weights,
                         Tensor& idx) override;
  void moe_experts_forward(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& experts,
                           Tensor& out, MoeTape& tape) override;
  void moe_experts_backward(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& experts,
                            const MoeTape& tape, const Tensor& dout, Tensor& dy, Tensor& dweights) override;
  void gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) override;
  void scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, Tensor& dst) override;
  double cross_entropy_sum(const Tensor& logits, const Tensor& labels, int64_t& count) override;
  void linear_nf4_forward(const Tensor& x, const Nf4Tensor& w, Tensor& y) override;
  void linear_nf4_backward(const Tensor& dy, const Nf4Tensor& w, Tensor& dx) override;
  void dropout_mask(uint64_t seed, double p, Tensor& mask) override;
  void attention_cached_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos,
                                const Tensor& k_pos, int64_t window, Tensor& out) override;
  double norm2(const Tensor& x) override;
  void add_sum_squares(const Tensor& x, Tensor& acc, int64_t index) override;
  void adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                    double eps, double wd, double bc1, double bc2, double grad_scale) override;
  void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw) override;
  void embedding_backward(const Tensor& ids, const Tensor& dout, double scale, int64_t skip_id,
                          Tensor& dtable) override;
  void rmsnorm_backward(const Tensor& x, const Tensor& w, int64_t width, double eps, const Tensor& dy, Tensor& dx,
                        Tensor& dw) override;
  void rope_backward(Tensor& dx, int64_t heads, const Tensor& positions, const Tensor& inv_freq) override;
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                          const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) override;
  void gelu_tanh_mul_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                              Tensor& dup) override;
  void softcap_backward(const Tensor& y, double cap, Tensor& dy) override;
  void moe_route_backward(const Tensor& logits, const Tensor& per_expert_scale, const Tensor& idx,
                          const Tensor& dweights, Tensor& dlogits, Tensor& dscale) override;
  void scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) override;
  void rowwise_dot(const Tensor& a, const Tensor& rows, const Tensor& b, Tensor& out) override;
  void cross_entropy_backward(const Tensor& logits, const Tensor& labels, double grad_scale, double cap,
                                      Tensor& dlogits, Tensor& sums) override;
  DistillSums distill_kl_sum(const Tensor& student, const Tensor& teacher, const Tensor& labels, double temperature,
                             int64_t top_k) override;
  void distill_kl_backward(const Tensor& student, const Tensor& teacher, const Tensor& labels, double temperature,
                             int64_t top_k, double weight, double cap, Tensor& dstudent, Tensor& sums) override;

 private:
  // A host tensor made by the CPU backend, now counted as device memory (same storage).
  static Tensor to_device(const Tensor& host);
  void scalar(int64_t n) {
    stats_.scalar_reads += n;
    stats_.scalar_bytes += 8 * n;
  }
  CpuOps cpu_;
  TransferStats stats_;
};

}  // namespace tl
