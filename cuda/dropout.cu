// LoRA dropout masks made on the device: mask[i] = dropout_keep(seed, i, p) (core/math.h),
// the same counter-based draw as the host's, so both backends drop the same elements and no
// mask crosses the bus.
#include "core/math.h"
#include "cuda/cuda_util.cuh"

namespace tl {

namespace {
template <class T>
__global__ void dropout_mask_kernel(uint64_t seed, double p, T* mask, int64_t n) {
  TL_GRID_STRIDE(i, n) mask[i] = cuda::narrow<T>(dropout_keep(seed, i, p));
}
}  // namespace

void CudaOps::dropout_mask(uint64_t seed, double p, Tensor& mask) {
  cuda::require_device(mask, "dropout_mask mask");
  cuda::require(p >= 0 && p < 1, "dropout_mask: p must be in [0, 1)");
  const int64_t n = mask.numel();
  if (n == 0) return;
  cuda::dispatch(mask.dtype(), [&]<class T>() {
    dropout_mask_kernel<T><<<cuda::blocks_for(n), cuda::kThreads>>>(seed, p, mask.data<T>(), n);
    TL_CUDA_LAUNCHED("dropout_mask_kernel");
  });
}

}  // namespace tl
