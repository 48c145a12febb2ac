// Linear layer: forward y = x·Wᵀ, backward dx += dy·W and dW += dyᵀ·x. cuBLAS SGEMM/DGEMM
// in the activation dtype, or (CudaMatmul::Bf16, large products) cuBLASLt with bf16 inputs,
// fp32 compute and fp32 output on tensor cores.
// BF16 activations: x, dy, y and dx are bf16 and every product is a cuBLASLt bf16 GEMM with
// fp32 compute, rounded once into its bf16 output. W is bf16 (a frozen weight) or an F32
// master (LoRA's A and B), which is rounded to a bf16 scratch per call (the factors are
// small) as autocast does; dW has W's dtype, so an F32 master gets an fp32 gradient straight
// from the GEMM's fp32 accumulator.
#include <climits>

#include "core/half.h"
#include "cuda/cuda_util.cuh"
#include "cuda/gemm_lt.h"

namespace tl {

namespace cuda {

namespace {
__global__ void to_bf16_kernel(const float* src, uint16_t* dst, int64_t n) {
  TL_GRID_STRIDE(i, n) dst[i] = float_to_bf16(src[i]);  // the CPU's rounding, bit for bit (NaN included)
}
__global__ void from_bf16_kernel(const uint16_t* src, float* dst, int64_t n) {
  TL_GRID_STRIDE(i, n) dst[i] = bf16_to_float(src[i]);
}
}  // namespace

void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  if (n == 0) return;
  to_bf16_kernel<<<blocks_for(n), kThreads>>>(src, dst, n);
  TL_CUDA_LAUNCHED("to_bf16_kernel");
}

void from_bf16(const uint16_t* src, float* dst, int64_t n) {
  if (n == 0) return;
  from_bf16_kernel<<<blocks_for(n), kThreads>>>(src, dst, n);
  TL_CUDA_LAUNCHED("from_bf16_kernel");
}

}  // namespace cuda

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

// Checks x [n, in], W [out, in] and returns n. x and W share the activation dtype, or x is
// BF16 and W an F32 master.
int64_t linear_rows(const Tensor& x, const Tensor& w) {
  cuda::require(w.rank() == 2, "linear: W must be [out, in]");
  cuda::require(x.dtype() == w.dtype() || (x.dtype() == DType::BF16 && w.dtype() == DType::F32),
                "linear dtypes: x and W must share a dtype, or x be BF16 and W an F32 master");
  cuda::require_device(x, "linear x");
  cuda::require_device(w, "linear W");
  const int64_t in = w.dim(1), out = w.dim(0);
  cuda::require(in > 0 && x.numel() % in == 0, "linear: x width does not match W");
  const int64_t n = x.numel() / in;
  cuda::require(n <= INT_MAX && in <= INT_MAX && out <= INT_MAX, "linear: dimension exceeds cuBLAS int range");
  return n;
}

// Elements a column-major rows×cols operand with leading dimension ld spans.
int64_t span(int64_t rows, int64_t cols, int64_t ld) { return cols == 0 ? 0 : ld * (cols - 1) + rows; }

}  // namespace

void* CudaOps::scratch(int slot, size_t bytes) {
  if (scratch_.size() <= size_t(slot)) {
    scratch_.resize(size_t(slot) + 1);
    scratch_bytes_.resize(size_t(slot) + 1, 0);
  }
  if (scratch_bytes_[size_t(slot)] < bytes) {
    scratch_[size_t(slot)].reset();  // back to the pool first (stream-ordered, so safe)
    scratch_[size_t(slot)] = cuda::device_alloc(bytes);
    scratch_bytes_[size_t(slot)] = bytes;
  }
  return scratch_[size_t(slot)].get();
}

void CudaOps::gemm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                        const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const uint16_t* a16) {
  if (!a16) {
    const int64_t na = span(ta ? k : m, ta ? m : k, lda);
    uint16_t* p = static_cast<uint16_t*>(scratch(0, size_t(na) * 2));
    cuda::to_bf16(a, p, na);
    a16 = p;
  }
  const int64_t nb = span(tb ? n : k, tb ? k : n, ldb);
  uint16_t* b16 = static_cast<uint16_t*>(scratch(1, size_t(nb) * 2));
  cuda::to_bf16(b, b16, nb);
  lt().run(cuda::LtType::Bf16F32, ta, tb, m, n, k, a16, lda, b16, ldb, beta, c, ldc, nullptr);
}

const void* CudaOps::bf16_weight(const Tensor& w) {
  if (w.dtype() == DType::BF16) return w.raw();
  uint16_t* p = static_cast<uint16_t*>(scratch(0, size_t(w.numel()) * 2));
  cuda::to_bf16(w.data<float>(), p, w.numel());
  return p;
}

// cuBLAS is column-major, and a row-major [r, c] buffer read column-major is its transpose
// [c, r]. Each row-major product C = A·B is therefore computed as Cᵀ = Bᵀ·Aᵀ, where the
// buffers already hold Aᵀ and Bᵀ; a row-major operand that must be transposed gets OP_T.
void CudaOps::linear_forward(const Tensor& x, const Tensor& w, Tensor& y, bool accumulate) {
  const int64_t n = linear_rows(x, w), in = w.dim(1), out = w.dim(0);
  cuda::require(y.dtype() == x.dtype() && y.numel() == n * out, "linear: y size/dtype");
  cuda::require_device(y, "linear y");
  if (n == 0 || out == 0) return;
  if (x.dtype() == DType::BF16) {
    lt().run(cuda::LtType::Bf16Bf16, true, false, out, n, in, bf16_weight(w), in, x.raw(), in,
             accumulate ? 1.0 : 0.0, y.raw(), out, nullptr);
    return;
  }
  // y[n,out] = x[n,in]·Wᵀ  <=>  yᵀ[out,n] = W·xᵀ = op_T(W's buffer [in,out]) · (x's buffer [in,n])
  if (bf16_for(n * out * in)) {
    gemm_bf16(true, false, out, n, in, w.data<float>(), in, x.data<float>(), in, accumulate ? 1.0f : 0.0f,
              y.data<float>(), out);
    return;
  }
  cuda::dispatch_wide(x.dtype(), [&]<class T>() {
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
    cuda::require(dw.dtype() == w.dtype() && dw.numel() == w.numel(), "linear_backward: dW size/dtype");
    cuda::require_device(dw, "linear_backward dW");
  }
  if (n == 0 || out == 0) return;
  if (x.dtype() == DType::BF16) {  // the same products as below (see there), bf16 inputs
    if (dx.defined())
      lt().run(cuda::LtType::Bf16Bf16, false, false, in, n, out, bf16_weight(w), in, dy.raw(), out, 1.0, dx.raw(),
               in, nullptr);
    if (dw.defined())
      lt().run(dw.dtype() == DType::F32 ? cuda::LtType::Bf16F32 : cuda::LtType::Bf16Bf16, false, true, in, out, n,
               x.raw(), in, dy.raw(), out, 1.0, dw.raw(), in, nullptr);
    return;
  }
  if (bf16_for(n * out * in)) {
    if (dx.defined())
      gemm_bf16(false, false, in, n, out, w.data<float>(), in, dy.data<float>(), out, 1.0f, dx.data<float>(), in);
    if (dw.defined())
      gemm_bf16(false, true, in, out, n, x.data<float>(), in, dy.data<float>(), out, 1.0f, dw.data<float>(), in);
    return;
  }
  cuda::dispatch_wide(x.dtype(), [&]<class T>() {
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
