// RMSNorm forward and backward, one block per row.
#include <cmath>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

using cuda::acc_t;
using cuda::narrow;
using cuda::widen;

// y = x · (mean(x²) + eps)^(-1/2) · w. Σx² is accumulated in double (as the CPU reference
// does); rstd is then rounded to acc_t<T> and the row scaled in it, in the reference's
// order (x·rstd)·w, rounded to T once (bf16: as HF's Gemma RMSNorm, which computes in fp32
// and casts back). w == nullptr: no scale. Safe in place (y == x): every read of the row
// finishes before the reduction's barrier.
template <class T>
__global__ void rmsnorm_kernel(const T* x, const T* w, T* y, int64_t d, double eps) {
  using A = acc_t<T>;
  const T* xr = x + int64_t(blockIdx.x) * d;
  T* yr = y + int64_t(blockIdx.x) * d;
  double ss = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) ss += double(widen(xr[j])) * double(widen(xr[j]));
  ss = cuda::block_reduce(ss, cuda::Sum{});
  const A rstd = A(1.0 / sqrt(ss / double(d) + eps));
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
    yr[j] = narrow<T>(w ? widen(xr[j]) * rstd * widen(w[j]) : widen(xr[j]) * rstd);
}

// Per row, in double: r = (mean(x²)+eps)^-½, dot = Σ x∘dy∘w,
//   dx += r·(dy∘w) − x·r³·dot/d.
// r is saved per row for the dW reduction.
template <class T>
__global__ void rmsnorm_backward_kernel(const T* x, const T* w, const T* dy, T* dx, double* rstd_out, int64_t d,
                                        double eps) {
  const int64_t off = int64_t(blockIdx.x) * d;
  const T *xr = x + off, *gr = dy + off;
  double ss = 0, dot = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const double xj = widen(xr[j]);
    ss += xj * xj;
    dot += xj * double(widen(gr[j])) * (w ? double(widen(w[j])) : 1.0);
  }
  ss = cuda::block_reduce(ss, cuda::Sum{});
  dot = cuda::block_reduce(dot, cuda::Sum{});
  const double rstd = 1.0 / sqrt(ss / double(d) + eps);
  if (rstd_out && threadIdx.x == 0) rstd_out[blockIdx.x] = rstd;
  if (!dx) return;
  const double c = rstd * rstd * rstd * dot / double(d);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const double g = rstd * double(widen(gr[j])) * (w ? double(widen(w[j])) : 1.0) - double(widen(xr[j])) * c;
    dx[off + j] = narrow<T>(widen(dx[off + j]) + acc_t<T>(g));
  }
}

// dW[j] += Σ_rows dy[r,j]·x[r,j]·r_r, in two deterministic steps: blockIdx.y sums a chunk of
// rows into partial[chunk, j]; then the chunks are added in order.
template <class T>
__global__ void rmsnorm_dw_partial_kernel(const T* x, const T* dy, const double* rstd, double* partial,
                                          int64_t rows, int64_t d, int64_t chunk) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= d) return;
  const int64_t r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
  double a = 0;
  for (int64_t r = r0; r < r1; ++r) a += double(widen(dy[r * d + j])) * double(widen(x[r * d + j])) * rstd[r];
  partial[blockIdx.y * d + j] = a;
}

template <class T>
__global__ void rmsnorm_dw_finish_kernel(const double* partial, T* dw, int64_t chunks, int64_t d) {
  TL_GRID_STRIDE(j, d) {
    double a = 0;
    for (int64_t c = 0; c < chunks; ++c) a += partial[c * d + j];
    dw[j] = narrow<T>(widen(dw[j]) + acc_t<T>(a));
  }
}

// Checks the shapes shared by forward and backward; returns the row width d.
int64_t norm_width(const Tensor& x, const Tensor& w, int64_t width, const Tensor& y) {
  const int64_t d = w.defined() ? w.numel() : width;
  cuda::require(d > 0 && x.numel() % d == 0 && y.numel() == x.numel(), "rmsnorm shapes");
  cuda::require(x.dtype() == y.dtype() && (!w.defined() || w.dtype() == x.dtype()), "rmsnorm dtypes");
  cuda::require_device(x, "rmsnorm x");
  cuda::require_device(y, "rmsnorm y/dy");
  if (w.defined()) cuda::require_device(w, "rmsnorm w");
  cuda::require(x.numel() / d <= INT32_MAX, "rmsnorm: too many rows");
  return d;
}

}  // namespace

void CudaOps::rmsnorm_forward(const Tensor& x, const Tensor& w, int64_t width, double eps, Tensor& y) {
  const int64_t d = norm_width(x, w, width, y), rows = x.numel() / d;
  if (rows == 0) return;
  cuda::dispatch(x.dtype(), [&]<class T>() {
    rmsnorm_kernel<T><<<unsigned(rows), cuda::kThreads>>>(x.data<T>(), w.defined() ? w.data<T>() : nullptr,
                                                          y.data<T>(), d, eps);
    TL_CUDA_LAUNCHED("rmsnorm_kernel");
  });
}

void CudaOps::rmsnorm_backward(const Tensor& x, const Tensor& w, int64_t width, double eps, const Tensor& dy,
                               Tensor& dx, Tensor& dw) {
  const int64_t d = norm_width(x, w, width, dy), rows = x.numel() / d;
  if (dx.defined()) {
    cuda::require(dx.numel() == x.numel() && dx.dtype() == x.dtype(), "rmsnorm_backward dx");
    cuda::require_device(dx, "rmsnorm_backward dx");
  }
  if (dw.defined()) {
    cuda::require(dw.numel() == d && dw.dtype() == x.dtype(), "rmsnorm_backward dw");
    cuda::require_device(dw, "rmsnorm_backward dw");
  }
  if (rows == 0 || (!dx.defined() && !dw.defined())) return;
  std::shared_ptr<void> rstd = dw.defined() ? cuda::device_alloc(size_t(rows) * sizeof(double)) : nullptr;
  cuda::dispatch(x.dtype(), [&]<class T>() {
    rmsnorm_backward_kernel<T><<<unsigned(rows), cuda::kThreads>>>(
        x.data<T>(), w.defined() ? w.data<T>() : nullptr, dy.data<T>(), dx.defined() ? dx.data<T>() : nullptr,
        static_cast<double*>(rstd.get()), d, eps);
    TL_CUDA_LAUNCHED("rmsnorm_backward_kernel");
    if (!dw.defined()) return;
    const int64_t chunk = (rows + 127) / 128, chunks = (rows + chunk - 1) / chunk;  // ≤ 128 chunks
    std::shared_ptr<void> partial = cuda::device_alloc(size_t(chunks * d) * sizeof(double));
    const dim3 grid(cuda::blocks_for(d), unsigned(chunks));
    rmsnorm_dw_partial_kernel<T><<<grid, cuda::kThreads>>>(x.data<T>(), dy.data<T>(),
                                                           static_cast<const double*>(rstd.get()),
                                                           static_cast<double*>(partial.get()), rows, d, chunk);
    TL_CUDA_LAUNCHED("rmsnorm_dw_partial_kernel");
    rmsnorm_dw_finish_kernel<T><<<cuda::blocks_for(d), cuda::kThreads>>>(static_cast<const double*>(partial.get()),
                                                                         dw.data<T>(), chunks, d);
    TL_CUDA_LAUNCHED("rmsnorm_dw_finish_kernel");
  });
}

}  // namespace tl
