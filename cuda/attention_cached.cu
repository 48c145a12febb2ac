// Attention of new queries over a KV cache (KV-cached generation, core/ops.h): one thread
// block per (query, head). For query s of head h (KV group g = h / (nh/nkv)):
//   score_j = q·k_j        for cache slots j with k_pos[j] ≥ 0, k_pos[j] ≤ q_pos[s] and
//                          q_pos[s] − k_pos[j] < window (no window: window ≤ 0); else masked
//   out     = Σ_j softmax(score)_j · v_j   (max subtracted; a row that sees nothing is 0)
// The scores of a row live in a [S·nh, L] scratch from the pool: generation has few queries
// (S = 1 per decoded token), so this is O(S·nh·L), never O(L²). Scores, softmax and the
// weighted sum run in acc_t<T> (fp32 for bf16 storage); only the output is rounded to T.
#include <cmath>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

constexpr int kCachedThreads = 128;

template <class T, class A = cuda::acc_t<T>>
__global__ void cached_attention_kernel(const T* Q, const T* K, const T* V, const int32_t* qpos, const int32_t* kpos,
                                        int64_t L, int64_t nh, int64_t nkv, int64_t d, int64_t window, A* scores,
                                        T* O) {
  using cuda::widen;
  const int64_t row = blockIdx.x, s = row / nh, h = row % nh, g = h / (nh / nkv);
  const T* q = Q + row * d;
  A* p = scores + row * L;
  const int32_t at = qpos[s];
  A top = -INFINITY;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const int32_t kp = kpos[j];
    const bool seen = kp >= 0 && kp <= at && (window <= 0 || int64_t(at) - kp < window);
    A dot = -INFINITY;
    if (seen) {
      dot = 0;
      const T* k = K + (j * nkv + g) * d;
      for (int64_t c = 0; c < d; ++c) dot += widen(q[c]) * widen(k[c]);
    }
    p[j] = dot;
    top = max(top, dot);
  }
  top = cuda::block_reduce(top, cuda::Max{});
  A sum = 0;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const A e = isinf(p[j]) ? A(0) : exp(p[j] - top);
    p[j] = e;
    sum += e;
  }
  sum = cuda::block_reduce(sum, cuda::Sum{});  // its barriers also publish every p[j]
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    A acc = 0;
    if (sum > 0)
      for (int64_t j = 0; j < L; ++j)
        if (p[j] > 0) acc += p[j] / sum * widen(V[(j * nkv + g) * d + c]);
    O[row * d + c] = cuda::narrow<T>(acc);
  }
}

}  // namespace

void CudaOps::attention_cached_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos,
                                       const Tensor& k_pos, int64_t window, Tensor& out) {
  cuda::require(q.rank() == 3 && k.rank() == 3 && v.rank() == 3, "attention_cached_forward expects [S,heads,d]");
  const int64_t S = q.dim(0), nh = q.dim(1), d = q.dim(2), L = k.dim(0), nkv = k.dim(1);
  cuda::require(nkv >= 1 && nh % nkv == 0 && k.dim(2) == d && v.shape() == k.shape() && k_pos.numel() == L &&
                    q_pos.numel() == S && out.numel() == q.numel(),
                "attention_cached_forward: inconsistent shapes");
  cuda::require(k.dtype() == q.dtype() && v.dtype() == q.dtype() && out.dtype() == q.dtype(),
                "attention_cached_forward dtypes");
  cuda::require_device(q, "attention_cached_forward q");
  cuda::require_device(k, "attention_cached_forward k");
  cuda::require_device(v, "attention_cached_forward v");
  cuda::require_device(out, "attention_cached_forward out");
  if (S * nh == 0 || d == 0) return;
  const cuda::DeviceInts qp = cuda::device_ints(q_pos, "attention_cached_forward q_pos");
  const cuda::DeviceInts kp = cuda::device_ints(k_pos, "attention_cached_forward k_pos");
  cuda::dispatch(q.dtype(), [&]<class T>() {
    using A = cuda::acc_t<T>;
    auto scores = cuda::device_alloc(size_t(S * nh * std::max<int64_t>(L, 1)) * sizeof(A));
    cached_attention_kernel<T><<<unsigned(S * nh), kCachedThreads>>>(q.data<T>(), k.data<T>(), v.data<T>(), qp.ptr,
                                                                     kp.ptr, L, nh, nkv, d, window,
                                                                     static_cast<A*>(scores.get()), out.data<T>());
    TL_CUDA_LAUNCHED("cached_attention_kernel");
  });
}

}  // namespace tl
