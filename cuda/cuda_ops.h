// The CUDA implementation of Ops. It computes what CpuOps (the reference) computes, for
// activation dtypes F32, F64 and BF16, with tensors living on the current CUDA device.
//
// Numerics:
// - F32 / F64: activations, LoRA master weights, gradients and Adam moments in that dtype
//   (F64 for gradient checks). With CudaMatmul::Bf16 the large projections run as cuBLASLt
//   GEMMs with bf16 inputs, fp32 compute and fp32 outputs: the numerics of CpuMatmul::Bf16.
// - BF16 (the trainer's `bf16: true` on a GPU, issue 10): activations and frozen weights are
//   stored in bf16; every kernel loads to fp32, computes in fp32 (acc_t, cuda_util.cuh) and
//   rounds once on the store; every product is a cuBLASLt bf16 GEMM with fp32 compute on
//   tensor cores. LoRA master weights, their gradients and Adam moments stay F32 tensors
//   (linear_forward/backward take an F32 W beside bf16 x; Ops::master_dtype). Softmax, the
//   attention scores, log-sum-exp, norm statistics, the loss, norms and accuracy are fp32
//   or wider; the bf16 copies of the attention probabilities (and of dS) that multiply V
//   (and K, Q) are rounded once, as flash attention does.
// NF4 bases stay on the device as NF4.
//
// Index inputs (ids, positions, doc_ids, rows, labels) may live on the host or the device;
// host ones are copied over per call (the trainer uploads them once per step). rope's
// inv_freq must be a device tensor (uploaded at load). Activations, weights and every
// output (moe_route's idx included) must be device tensors (made by zeros/upload). All work
// runs on the legacy default stream, so download() (a synchronous cudaMemcpy) sees every
// earlier op's result, and memory comes from a stream-ordered pool (cuda_util.cuh).
//
// This header is plain C++: it is included by code that is not compiled by nvcc.
#pragma once
#include "core/ops.h"

#include <memory>
#include <vector>

struct cublasContext;  // cuBLAS's handle type (cublasHandle_t = cublasContext*)

namespace tl {

namespace cuda {
class LtGemm;  // cached cuBLASLt bf16 GEMMs (cuda/gemm_lt.h)
}

// How fp32 projections multiply: cuBLAS SGEMM in plain fp32 (the reference's numerics), or
// bf16 inputs with fp32 accumulation through cuBLASLt (tensor cores). As CpuOps::bf16_for
// does, products under 2^22 multiply-adds (LoRA's rank-r factors) stay fp32 in both modes,
// so the two backends round the same products.
enum class CudaMatmul { F32, Bf16 };

// Device memory of the pool every CudaOps allocation comes from, in bytes: in use now and
// its high-water mark, reserved from the driver now and its high-water mark, plus what the
// whole device has in use (other allocations and contexts included) and its size.
struct CudaMemory {
  uint64_t used = 0, used_peak = 0, reserved = 0, reserved_peak = 0;
  uint64_t device_used = 0, device_total = 0;
};

class CudaOps final : public Ops {
 public:
  explicit CudaOps(DType act = DType::F32, CudaMatmul matmul = CudaMatmul::F32);
  ~CudaOps() override;
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  // Whether a CUDA device is usable; never throws (false without a driver or device).
  static bool available();
  // The pool's counters (see CudaMemory) and a restart of its high-water marks.
  static CudaMemory memory();
  static void reset_peak_memory();

  CudaMatmul matmul() const { return matmul_; }
  // Attention score elements computed so far, forward and backward (as CpuOps counts them).
  int64_t attention_scores() const { return attention_scores_; }

  Device device() const override { return Device::CUDA; }
  DType act_dtype() const override { return act_; }

  Tensor zeros(Shape shape, DType dtype) override;
  using Ops::zeros;
  Tensor empty(Shape shape, DType dtype) override;  // no memset
  using Ops::empty;
  Tensor upload(const Tensor& host, DType dtype) override;
  Tensor download(const Tensor& t) override;
  // CUDA events on the ops' stream; a device-wide wait that throws on a failed kernel
  // (cuda/clock.cu).
  std::unique_ptr<OpClock> make_clock() override;
  double memory_available() override;
  void synchronize() override;

  void linear_forward(const Tensor& x, const Tensor& w, Tensor& y, bool accumulate) override;
  void embedding_forward(const Tensor& table, const Tensor& ids, double scale, Tensor& out) override;
  void rmsnorm_forward(const Tensor& x, const Tensor& w, int64_t width, double eps, Tensor& y) override;
  void rope_forward(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq) override;
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                         Tensor& out) override;
  void attention_cached_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos,
                                const Tensor& k_pos, int64_t window, Tensor& out) override;
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
  void dropout_mask(uint64_t seed, double p, Tensor& mask) override;

  // The device copy of an NF4 weight (its packed bytes and double-quantized absmax, exactly
  // the host bytes), made on first use and kept in w.backend_copy.
  static void nf4_to_device(const Nf4Tensor& w);
  // Quantizes a device weight (F32, BF16 or F16) on the device, bitsandbytes-exact: the same
  // bytes as core/nf4.h's nf4_quantize of its host copy (the double quantization of the
  // nblocks absmax values runs on the host). Returns it with the device copy already made.
  static Nf4Tensor quantize_nf4(const Tensor& w, bool double_quant);

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
  // cuda/distill.cu
  DistillSums distill_kl_sum(const Tensor& student, const Tensor& teacher, const Tensor& labels, double temperature,
                             int64_t top_k) override;
  void distill_kl_backward(const Tensor& student, const Tensor& teacher, const Tensor& labels, double temperature,
                             int64_t top_k, double weight, double cap, Tensor& dstudent, Tensor& sums) override;

 private:
  // The cuBLAS handle, created on first use so constructing CudaOps needs no device.
  cublasContext* blas();
  cuda::LtGemm& lt();
  // Whether a product of `multiply_adds` runs in bf16 (CpuOps::bf16_for's rule).
  bool bf16_for(int64_t multiply_adds) const {
    return matmul_ == CudaMatmul::Bf16 && act_ == DType::F32 && multiply_adds >= (int64_t(1) << 22);
  }
  // Reused device buffer `slot` of at least `bytes` (grown, never shrunk; stream order makes
  // reuse by the next op safe). Slots: 0, 1 bf16 GEMM operands (0 also an F32 master W
  // rounded for bf16 activations), 3 the NF4 dequant scratch, 4, 5 attention's score /
  // probability blocks, 6, 7 their bf16 copies (bf16 activations), 8, 9 a MoE layer's NF4
  // experts dequantized (gate_up, down), 10 the MoE products' per-tile pointers, 11, 12 the
  // attention block's packed Q and O (dO), 13 its fp32 dQ.
  void* scratch(int slot, size_t bytes);
  // C(fp32, column-major) = op(A)·op(B) + beta·C with A and B rounded to bf16 (cuBLASLt).
  void gemm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float beta, float* c, int64_t ldc, const uint16_t* a16 = nullptr);
  // W as a bf16 operand: itself when BF16, else (an F32 master) rounded into scratch slot 0.
  const void* bf16_weight(const Tensor& w);
  // The dequantized weight [out, in] in the scratch: bf16 (`bf16`), else the activation dtype.
  const void* nf4_dequantized(const Nf4Tensor& w, bool bf16);
  // The same into `out` (w.numel() values), in the activation dtype (bf16 with BF16 activations).
  void nf4_dequantize_into(const Nf4Tensor& w, void* out);
  // The MoE experts' matrices of one kind, [E, out, in] in the activation dtype (moe_experts.cu).
  const void* expert_weights(const MoeExperts& x, bool gate_up, int slot);
  // One batched GEMM over a MoE layer's row tiles, each by its expert's matrix (moe_experts.cu).
  void tile_products(const void* w, bool w_t, int64_t n_out, int64_t k_in, const void* in, void* out,
                     const int32_t* tile_expert, int64_t tiles);

  DType act_;
  CudaMatmul matmul_;
  cublasContext* blas_ = nullptr;
  std::unique_ptr<cuda::LtGemm> lt_;
  std::vector<std::shared_ptr<void>> scratch_;
  std::vector<size_t> scratch_bytes_;
  int64_t attention_scores_ = 0;
};

}  // namespace tl
