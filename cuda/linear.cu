// Linear layer on cuBLAS: y[n,o] = Σ_i x[n,i]·W[o,i] (+ y when accumulating).
#include <climits>

#include "cuda/cuda_util.cuh"

namespace tl {

using cuda::require;

// cuBLAS is column-major, and a row-major [r, c] buffer read column-major is its transpose
// [c, r]. So with row-major x [n, in], W [out, in], y [n, out]:
//   y (row-major)  = yᵀ column-major [out, n],  and  yᵀ = W · xᵀ
//   W's buffer     = Wᵀ column-major [in, out] (ld in)  -> use it with OP_T to get W
//   x's buffer     = xᵀ column-major [in, n]   (ld in)  -> OP_N
// giving gemm(OP_T, OP_N, m=out, n=n, k=in, A=W lda=in, B=x ldb=in, C=y ldc=out).
void CudaOps::linear_forward(const Tensor& x, const Tensor& w, Tensor& y, bool accumulate) {
  require(w.rank() == 2 && x.dtype() == w.dtype() && y.dtype() == x.dtype(), "linear dtypes/rank");
  cuda::require_device(x, "linear x");
  cuda::require_device(w, "linear W");
  cuda::require_device(y, "linear y");
  int64_t in = w.dim(1), out = w.dim(0);
  require(in > 0 && x.numel() % in == 0, "linear: x width does not match W");
  int64_t n = x.numel() / in;
  require(y.numel() == n * out, "linear: y size");
  require(n <= INT_MAX && in <= INT_MAX && out <= INT_MAX, "linear: dimension exceeds cuBLAS int range");
  if (n == 0 || out == 0) return;
  const int m_ = int(out), n_ = int(n), k_ = int(in);
  if (x.dtype() == DType::F32) {
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    TL_CUDA_CHECK(cublasSgemm(blas(), CUBLAS_OP_T, CUBLAS_OP_N, m_, n_, k_, &alpha, w.data<float>(), k_,
                              x.data<float>(), k_, &beta, y.data<float>(), m_));
  } else if (x.dtype() == DType::F64) {
    const double alpha = 1.0, beta = accumulate ? 1.0 : 0.0;
    TL_CUDA_CHECK(cublasDgemm(blas(), CUBLAS_OP_T, CUBLAS_OP_N, m_, n_, k_, &alpha, w.data<double>(), k_,
                              x.data<double>(), k_, &beta, y.data<double>(), m_));
  } else {
    throw std::invalid_argument("CudaOps: activations must be F32 or F64");
  }
}

}  // namespace tl
