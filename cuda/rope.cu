// Rotary position embedding (NeoX style), in place: forward rotates by θ, backward by −θ.
#include <cmath>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

// x viewed [n, heads, 2·half]; one thread per (token, head, pair i). The pair (i, i+half)
// rotates by θ = pos·inv_freq[i]:  (a, b) -> (a·cosθ − b·sinθ,  b·cosθ + a·sinθ).
// The backward is the transpose, a rotation by −θ, i.e. the same with sinθ negated
// (exact, so it matches the reference's a·c + b·s, b·c − a·s).
// θ, cos and sin are computed in acc_t<T> (T itself for F32/F64, as the reference and HF
// do; fp32 for bf16 storage, as HF computes cos/sin), the rotation too, and each output is
// rounded to T once. inv_freq[i] = 0 leaves the pair unchanged (cos 0 = 1, sin 0 = 0).
template <class T>
__global__ void rope_kernel(T* x, const int32_t* pos, const double* inv_freq, int64_t n, int64_t heads,
                            int64_t half, bool inverse) {
  using A = cuda::acc_t<T>;
  const int64_t total = n * heads * half;
  TL_GRID_STRIDE(e, total) {
    const int64_t i = e % half, th = e / half;  // th = t·heads + h
    const int64_t t = th / heads;
    const A theta = A(pos[t]) * A(inv_freq[i]);
    const A c = std::cos(theta), s = inverse ? -std::sin(theta) : std::sin(theta);
    T* p = x + th * 2 * half;
    const A a = cuda::widen(p[i]), b = cuda::widen(p[i + half]);
    p[i] = cuda::narrow<T>(a * c - b * s);
    p[i + half] = cuda::narrow<T>(b * c + a * s);
  }
}

void rope(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq, bool inverse) {
  const int64_t half = inv_freq.numel(), n = positions.numel();
  cuda::require(x.numel() == n * heads * 2 * half && inv_freq.dtype() == DType::F64, "rope shapes");
  cuda::require_device(x, "rope x");
  if (x.numel() == 0) return;
  // inv_freq lives on the device from load time (a pageable copy per call waited for the
  // stream, 360 times a step on the 31B).
  cuda::require_device(inv_freq, "rope inv_freq");
  cuda::DeviceInts pos = cuda::device_ints(positions, "rope positions must be I32");
  const double* freq = inv_freq.data<double>();
  cuda::dispatch(x.dtype(), [&]<class T>() {
    rope_kernel<T><<<cuda::blocks_for(x.numel() / 2), cuda::kThreads>>>(x.data<T>(), pos.ptr, freq, n, heads,
                                                                       half, inverse);
    TL_CUDA_LAUNCHED("rope_kernel");
  });
}

}  // namespace

void CudaOps::rope_forward(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq) {
  rope(x, heads, positions, inv_freq, false);
}

void CudaOps::rope_backward(Tensor& dx, int64_t heads, const Tensor& positions, const Tensor& inv_freq) {
  rope(dx, heads, positions, inv_freq, true);
}

}  // namespace tl
