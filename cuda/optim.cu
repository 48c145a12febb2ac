// Optimiser primitives on the GPU: the global-norm reduction and the AdamW update
// (the same formulas as CpuOps, see core/ops.h).
#include "cuda/cuda_util.cuh"

namespace tl {

using cuda::acc_t;
using cuda::blocks_for;
using cuda::dispatch;
using cuda::kThreads;
using cuda::narrow;
using cuda::widen;

namespace {

// Per-block partial sums of x² in double, written to partial[blockIdx.x]; summed on the
// host in block order so the result does not depend on scheduling.
template <class T>
__global__ void sumsq_kernel(const T* x, int64_t n, double* partial) {
  double acc = 0;
  TL_GRID_STRIDE(i, n) acc += double(widen(x[i])) * double(widen(x[i]));
  acc = cuda::block_reduce(acc, cuda::Sum{});
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// g ← g·grad_scale (rounded to T, as torch's grad.mul_(clip_coef));
// p ← p·(1 − lr·wd);  m ← m + (g − m)(1−β1);  v ← β2·v + (1−β2)·g²;
// p ← p − (lr/bc1)·m / (√v/√bc2 + eps)
// in acc_t<T>. The trainer's parameters are F32 masters (LoRA); a BF16 tensor (a frozen-dtype
// weight trained in place) is updated in fp32 and rounded once per step.
template <class T, class A = acc_t<T>>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, A decay, A b1, A b2, A step_size,
                             A sqrt_bc2, A eps, A grad_scale) {
  TL_GRID_STRIDE(i, n) {
    const A gi = widen(narrow<T>(widen(g[i]) * grad_scale)), m0 = widen(m[i]);
    A pi = widen(p[i]) * decay;
    A mi = m0 + (gi - m0) * (A(1) - b1);
    A vi = widen(v[i]) * b2 + gi * gi * (A(1) - b2);
    pi -= step_size * mi / (sqrt(vi) / sqrt_bc2 + eps);
    p[i] = narrow<T>(pi);
    m[i] = narrow<T>(mi);
    v[i] = narrow<T>(vi);
  }
}

}  // namespace

double CudaOps::norm2(const Tensor& x) {
  cuda::require_device(x, "norm2 x");
  const int64_t n = x.numel();
  const unsigned blocks = std::min<unsigned>(blocks_for(n), 1024);
  auto partial = cuda::device_alloc(sizeof(double) * blocks);
  dispatch(x.dtype(), [&]<class T>() {
    sumsq_kernel<T><<<blocks, kThreads>>>(x.data<T>(), n, static_cast<double*>(partial.get()));
    TL_CUDA_LAUNCHED("sumsq_kernel");
  });
  std::vector<double> host(blocks);
  TL_CUDA_CHECK(cudaMemcpy(host.data(), partial.get(), sizeof(double) * blocks, cudaMemcpyDeviceToHost));
  double sq = 0;
  for (double s : host) sq += s;
  return std::sqrt(sq);
}

void CudaOps::add_sum_squares(const Tensor& x, Tensor& acc, int64_t index) {
  cuda::require_device(x, "add_sum_squares x");
  cuda::require_device(acc, "add_sum_squares acc");
  cuda::require(acc.dtype() == DType::F64 && index >= 0 && index < acc.numel(), "add_sum_squares acc must be F64 [> index]");
  const int64_t n = x.numel();
  if (n == 0) return;
  const unsigned blocks = std::min<unsigned>(blocks_for(n), 1024);
  auto partial = cuda::device_alloc(sizeof(double) * blocks);
  dispatch(x.dtype(), [&]<class T>() {
    sumsq_kernel<T><<<blocks, kThreads>>>(x.data<T>(), n, static_cast<double*>(partial.get()));
    TL_CUDA_LAUNCHED("sumsq_kernel");
  });
  cuda::add_sum_in_order(static_cast<const double*>(partial.get()), blocks, acc.data<double>() + index);
}

void CudaOps::adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                    double eps, double wd, double bc1, double bc2, double grad_scale) {
  cuda::require(p.numel() == g.numel() && m.numel() == p.numel() && v.numel() == p.numel(), "adamw sizes");
  cuda::require(g.dtype() == p.dtype() && m.dtype() == p.dtype() && v.dtype() == p.dtype(), "adamw dtypes");
  cuda::require_device(p, "adamw p");
  cuda::require_device(g, "adamw g");
  cuda::require_device(m, "adamw m");
  cuda::require_device(v, "adamw v");
  const int64_t n = p.numel();
  dispatch(p.dtype(), [&]<class T>() {
    using A = acc_t<T>;
    adamw_kernel<T><<<blocks_for(n), kThreads>>>(p.data<T>(), g.data<T>(), m.data<T>(), v.data<T>(), n,
                                                 A(1.0 - lr * wd), A(beta1), A(beta2), A(lr / bc1),
                                                 A(std::sqrt(bc2)), A(eps), A(grad_scale));
    TL_CUDA_LAUNCHED("adamw_kernel");
  });
}

}  // namespace tl
