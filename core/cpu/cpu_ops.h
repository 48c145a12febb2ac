// The CPU implementation of Ops: the numerical reference for every other backend, in F32
// (the default, matching transformers in fp32) or F64 (for finite-difference checks).
#pragma once
#include <vector>

#include "core/ops.h"

namespace tl {

// How fp32 projections (linear_forward / linear_backward) multiply: exactly in fp32 (the
// reference), or with bf16 inputs and fp32 accumulation (core/cpu/gemm_bf16.h: oneDNN, about
// twice as fast on CPUs with bf16 instructions, else a portable kernel; what a GPU does under
// bf16 autocast).
enum class CpuMatmul { F32, Bf16 };

class CpuOps final : public Ops {
 public:
  explicit CpuOps(DType act = DType::F32, CpuMatmul matmul = CpuMatmul::F32);
  CpuMatmul matmul() const { return matmul_; }
  Device device() const override { return Device::CPU; }
  DType act_dtype() const override { return act_; }
  DType frozen_dtype() const override { return matmul_ == CpuMatmul::Bf16 ? DType::BF16 : act_; }

  Tensor zeros(Shape shape, DType dtype) override;
  using Ops::zeros;
  Tensor empty(Shape shape, DType dtype) override;
  using Ops::empty;
  Tensor upload(const Tensor& host, DType dtype) override;
  Tensor download(const Tensor& t) override;

  void hold_matmul_input(const Tensor& x) override;
  void release_matmul_input() override;
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
  void moe_route_forward(const Tensor& logits, const Tensor& per_expert_scale, int64_t k,
                         Tensor& weights, Tensor& idx) override;
  void moe_experts_forward(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& experts,
                           Tensor& out, MoeTape& tape) override;
  void moe_experts_backward(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& experts,
                            const MoeTape& tape, const Tensor& dout, Tensor& dy, Tensor& dweights) override;
  void gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) override;
  void scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, Tensor& dst) override;
  double cross_entropy_sum(const Tensor& logits, const Tensor& labels, int64_t& count) override;

  void linear_nf4_forward(const Tensor& x, const Nf4Tensor& w, Tensor& y) override;
  void linear_nf4_backward(const Tensor& dy, const Nf4Tensor& w, Tensor& dx) override;
  // The most weights one dequantized NF4 tile holds (default 2^24: 32 MiB in bf16, so an
  // E2B-sized projection is one tile and one product); tests lower it to get several tiles.
  void set_nf4_tile_elements(int64_t elements) { nf4_tile_elements_ = elements; }
  // Under CpuMatmul::Bf16, products of at least this many multiply-adds run in bf16 (default
  // 2^22, below); tests set 0 so that a tiny model takes the bf16 path in every product.
  void set_bf16_min_multiply_adds(int64_t n) { bf16_min_multiply_adds_ = n; }
  // Attention score elements computed so far (forward and backward): what the masks let the
  // blocked attention skip shows here (tests count them).
  int64_t attention_scores() const { return attention_scores_; }

  void dropout_mask(uint64_t seed, double p, Tensor& mask) override;

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
  // Expert e's gate_up (or down) product of the MoE layer and its input gradient (cpu_moe.cpp).
  void expert_product(const MoeExperts& x, bool gate_up, int64_t e, const Tensor& in, Tensor& out);
  void expert_product_backward(const MoeExperts& x, bool gate_up, int64_t e, const Tensor& in, const Tensor& dout,
                               Tensor& din);
  // The bf16 copy of rows × cols at p (leading dimension ld): a held input's, rounded on its
  // first use (hold_matmul_input), or else packed into `scratch`.
  const uint16_t* as_bf16(const float* p, int64_t rows, int64_t cols, int64_t ld, std::vector<uint16_t>& scratch) const;
  struct HeldInput {
    const float* data = nullptr;  // null: held, but not an fp32 tensor
    int64_t numel = 0;
    std::vector<uint16_t> bf16;   // empty until a bf16 product reads it
  };
  mutable std::vector<HeldInput> held_;

  // C = op(A)·op(B) + beta·C for the projections, in the precision matmul_ selects.
  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
            int64_t ldb, float beta, float* c, int64_t ldc) const;
  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
            int64_t ldb, double beta, double* c, int64_t ldc) const;

  DType act_;
  CpuMatmul matmul_;
  int64_t nf4_tile_elements_ = int64_t(1) << 24;
  int64_t attention_scores_ = 0;
  // Whether a product of `multiply_adds` runs in bf16: with CpuMatmul::Bf16, from 2^22 up.
  // Smaller ones (LoRA's rank-r factors) cost more to round and hand to oneDNN than they
  // save (measured on the bench models) and stay exact in fp32.
  int64_t bf16_min_multiply_adds_ = int64_t(1) << 22;
  bool bf16_for(int64_t multiply_adds) const {
    return matmul_ == CpuMatmul::Bf16 && multiply_adds >= bf16_min_multiply_adds_;
  }
};

}  // namespace tl
