// RMSNorm: y = x · (mean(x²) + eps)^(-1/2) · w, one block per row.
#include <cmath>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

// Σx² is accumulated in double (as the CPU reference does); rstd is then rounded to T and
// the row scaled in T, in the reference's order (x·rstd)·w. w == nullptr: no scale.
// Safe in place (y == x): every read of the row finishes before the reduction's barrier.
template <class T>
__global__ void rmsnorm_kernel(const T* x, const T* w, T* y, int64_t d, double eps) {
  const T* xr = x + int64_t(blockIdx.x) * d;
  T* yr = y + int64_t(blockIdx.x) * d;
  double ss = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) ss += double(xr[j]) * double(xr[j]);
  ss = cuda::block_reduce(ss, cuda::Sum{});
  const T rstd = T(1.0 / sqrt(ss / double(d) + eps));
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) yr[j] = w ? xr[j] * rstd * w[j] : xr[j] * rstd;
}

}  // namespace

void CudaOps::rmsnorm_forward(const Tensor& x, const Tensor& w, int64_t width, double eps, Tensor& y) {
  int64_t d = w.defined() ? w.numel() : width;
  cuda::require(d > 0 && x.numel() % d == 0 && y.numel() == x.numel(), "rmsnorm shapes");
  cuda::require(x.dtype() == y.dtype() && (!w.defined() || w.dtype() == x.dtype()), "rmsnorm dtypes");
  cuda::require_device(x, "rmsnorm x");
  cuda::require_device(y, "rmsnorm y");
  if (w.defined()) cuda::require_device(w, "rmsnorm w");
  int64_t rows = x.numel() / d;
  cuda::require(rows <= INT32_MAX, "rmsnorm: too many rows");
  if (rows == 0) return;
  cuda::dispatch(x.dtype(), [&]<class T>() {
    rmsnorm_kernel<T><<<unsigned(rows), cuda::kThreads>>>(x.data<T>(), w.defined() ? w.data<T>() : nullptr,
                                                          y.data<T>(), d, eps);
    TL_CUDA_LAUNCHED("rmsnorm_kernel");
  });
}

}  // namespace tl
