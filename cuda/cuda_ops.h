// The CUDA implementation of Ops. It computes what CpuOps (the reference) computes, for
// activation dtypes F32 and F64, with tensors living on the current CUDA device.
//
// Index inputs (ids, positions, doc_ids, rows, labels) and rope's inv_freq may live on the
// host or the device; host ones are copied over per call. Activations, weights and every
// output (moe_route's idx included) must be device tensors (made by zeros/upload). All work runs on the legacy default stream, so download() (a
// synchronous cudaMemcpy) sees every earlier op's result.
//
// This header is plain C++: it is included by code that is not compiled by nvcc.
#pragma once
#include "core/ops.h"

struct cublasContext;  // cuBLAS's handle type (cublasHandle_t = cublasContext*)

namespace tl {

class CudaOps final : public Ops {
 public:
  explicit CudaOps(DType act = DType::F32);
  ~CudaOps() override;
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  // Whether a CUDA device is usable; never throws (false without a driver or device).
  static bool available();

  Device device() const override { return Device::CUDA; }
  DType act_dtype() const override { return act_; }

  Tensor zeros(Shape shape, DType dtype) override;
  using Ops::zeros;
  Tensor upload(const Tensor& host, DType dtype) override;
  Tensor download(const Tensor& t) override;

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
  void scale_rows(Tensor& x, const Tensor& s) override;
  void softcap_forward(Tensor& x, double cap) override;
  void copy_columns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t w) override;
  void moe_route_forward(const Tensor& logits, const Tensor& per_expert_scale, int64_t k,
                         Tensor& weights, Tensor& idx) override;
  void gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) override;
  void scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, Tensor& dst) override;
  double cross_entropy_sum(const Tensor& logits, const Tensor& labels, int64_t& count) override;

  double norm2(const Tensor& x) override;
  void adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                    double eps, double wd, double bc1, double bc2) override;

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
  double cross_entropy_backward(const Tensor& logits, const Tensor& labels, double grad_scale, double cap,
                                Tensor& dlogits, int64_t& count) override;

 private:
  // The cuBLAS handle, created on first use so constructing CudaOps needs no device.
  cublasContext* blas();

  DType act_;
  cublasContext* blas_ = nullptr;
};

}  // namespace tl
