// Linear layer on cuBLAS: forward y = x·Wᵀ, backward dx += dy·W and dW += dyᵀ·x.
#include <climits>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

// C = alpha·op(A)·op(B) + beta·C, column-major, for float and double.
void gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float* a,
          int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  const float alpha = 1.0f;
  TL_CUDA_CHECK(cublasSgemm(h, ta, tb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc));
}
void gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const double* a,
          int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  const double alpha = 1.0;
  TL_CUDA_CHECK(cublasDgemm(h, ta, tb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc));
}

// Checks x [n, in], W [out, in] and returns n.
int64_t linear_rows(const Tensor& x, const Tensor& w) {
  cuda::require(w.rank() == 2 && x.dtype() == w.dtype(), "linear dtypes/rank");
  cuda::require_device(x, "linear x");
  cuda::require_device(w, "linear W");
  const int64_t in = w.dim(1), out = w.dim(0);
  cuda::require(in > 0 && x.numel() % in == 0, "linear: x width does not match W");
  const int64_t n = x.numel() / in;
  cuda::require(n <= INT_MAX && in <= INT_MAX && out <= INT_MAX, "linear: dimension exceeds cuBLAS int range");
  return n;
}

}  // namespace

// cuBLAS is column-major, and a row-major [r, c] buffer read column-major is its transpose
// [c, r]. Each row-major product C = A·B is therefore computed as Cᵀ = Bᵀ·Aᵀ, where the
// buffers already hold Aᵀ and Bᵀ; a row-major operand that must be transposed gets OP_T.
void CudaOps::linear_forward(const Tensor& x, const Tensor& w, Tensor& y, bool accumulate) {
  const int64_t n = linear_rows(x, w), in = w.dim(1), out = w.dim(0);
  cuda::require(y.dtype() == x.dtype() && y.numel() == n * out, "linear: y size/dtype");
  cuda::require_device(y, "linear y");
  if (n == 0 || out == 0) return;
  cuda::dispatch(x.dtype(), [&]<class T>() {
    // y[n,out] = x[n,in]·Wᵀ  <=>  yᵀ[out,n] = W·xᵀ = op_T(W's buffer [in,out]) · (x's buffer [in,n])
    gemm(blas(), CUBLAS_OP_T, CUBLAS_OP_N, int(out), int(n), int(in), w.data<T>(), int(in), x.data<T>(), int(in),
         accumulate ? T(1) : T(0), y.data<T>(), int(out));
  });
}

void CudaOps::linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw) {
  const int64_t n = linear_rows(x, w), in = w.dim(1), out = w.dim(0);
  cuda::require(dy.dtype() == x.dtype() && dy.numel() == n * out, "linear_backward: dy size/dtype");
  cuda::require_device(dy, "linear_backward dy");
  if (dx.defined()) {
    cuda::require(dx.dtype() == x.dtype() && dx.numel() == x.numel(), "linear_backward: dx size/dtype");
    cuda::require_device(dx, "linear_backward dx");
  }
  if (dw.defined()) {
    cuda::require(dw.dtype() == x.dtype() && dw.numel() == w.numel(), "linear_backward: dW size/dtype");
    cuda::require_device(dw, "linear_backward dW");
  }
  if (n == 0 || out == 0) return;
  cuda::dispatch(x.dtype(), [&]<class T>() {
    // dx[n,in] += dy[n,out]·W[out,in]  <=>  dxᵀ[in,n] += (W's buffer [in,out])·(dy's buffer [out,n])
    if (dx.defined())
      gemm(blas(), CUBLAS_OP_N, CUBLAS_OP_N, int(in), int(n), int(out), w.data<T>(), int(in), dy.data<T>(),
           int(out), T(1), dx.data<T>(), int(in));
    // dW[out,in] += dyᵀ·x  <=>  dWᵀ[in,out] += (x's buffer [in,n])·op_T(dy's buffer [out,n])
    if (dw.defined())
      gemm(blas(), CUBLAS_OP_N, CUBLAS_OP_T, int(in), int(out), int(n), x.data<T>(), int(in), dy.data<T>(),
           int(out), T(1), dw.data<T>(), int(in));
  });
}

}  // namespace tl
