// Internal helpers of the CPU backend (dtype dispatch, BLAS wrappers).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/tensor.h"

namespace tl::cpu {

// Elements below which a loop runs on one thread: waking a team costs more than it saves.
inline constexpr int64_t kParallelMin = 1 << 16;

inline void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("CpuOps: ") + what);
}

// Runs f.template operator()<T>() for the activation dtype `t`.
template <class F>
void dispatch(DType t, F&& f) {
  if (t == DType::F32) f.template operator()<float>();
  else if (t == DType::F64) f.template operator()<double>();
  else throw std::invalid_argument("CpuOps: activations must be F32 or F64");
}

// C[m,n] = alpha·op(A)·op(B) + beta·C, row-major, op(X) = Xᵀ when the flag is set: OpenBLAS
// where the build has it, else plain loops (core/cpu/blas.cpp).
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// RoPE on x [n, heads·d] in place: each (i, i + d/2) pair rotated by θ = pos·inv_freq[i], or
// by −θ with `inverse` (Rᵀ, the backward). Defined in cpu_ops.cpp.
void rope_rotate(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq, bool inverse);

}  // namespace tl::cpu
