// MoE routing: softmax over experts, top-k, renormalise, per-expert scale.
#include <cmath>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

// One thread per token, replaying the reference's arithmetic in T:
//   e_j = exp(l_j − max l),  z = Σ_j e_j (j ascending),  p_j = e_j / z
//   top k by p, ties to the lower index (the reference's stable sort)
//   weight_r = p_{idx_r} / Σ_{r'} p_{idx_r'} · per_expert_scale[idx_r]
// Nothing is stored per expert: p_j is recomputed when needed, and the r-th pick is the
// best expert strictly after pick r−1 in the order (p descending, index ascending), so
// no "already taken" array is needed. O(k·E) per token, small next to the router matmul.
template <class T>
__device__ bool ranks_before(T pa, int a, T pb, int b) {
  return pa > pb || (pa == pb && a < b);
}

template <class T>
__global__ void moe_route_kernel(const T* logits, const T* per_expert_scale, T* weights, int32_t* idx,
                                 int64_t n, int e, int k) {
  TL_GRID_STRIDE(t, n) {
    const T* l = logits + t * e;
    T mx = l[0];
    for (int j = 1; j < e; ++j) mx = l[j] > mx ? l[j] : mx;
    T z = 0;
    for (int j = 0; j < e; ++j) z += T(std::exp(l[j] - mx));
    auto p = [&](int j) { return T(std::exp(l[j] - mx)) / z; };

    T top = 0;
    int prev = -1;
    T prev_p = 0;
    for (int r = 0; r < k; ++r) {
      int best = -1;
      T best_p = 0;
      for (int j = 0; j < e; ++j) {
        const T pj = p(j);
        if (prev >= 0 && !ranks_before(prev_p, prev, pj, j)) continue;  // already taken
        if (best < 0 || ranks_before(pj, j, best_p, best)) {
          best = j;
          best_p = pj;
        }
      }
      idx[t * k + r] = best;
      weights[t * k + r] = best_p;  // p for now; divided by Σ p_top below
      top += best_p;
      prev = best;
      prev_p = best_p;
    }
    for (int r = 0; r < k; ++r)
      weights[t * k + r] = weights[t * k + r] / top * per_expert_scale[idx[t * k + r]];
  }
}

}  // namespace

void CudaOps::moe_route_forward(const Tensor& logits, const Tensor& per_expert_scale, int64_t k, Tensor& weights,
                                Tensor& idx) {
  cuda::require(logits.rank() == 2, "moe_route logits must be [N, E]");
  const int64_t n = logits.dim(0), e = logits.dim(1);
  cuda::require(k > 0 && k <= e && e <= INT32_MAX && weights.numel() == n * k && idx.numel() == n * k &&
                    idx.dtype() == DType::I32 && per_expert_scale.numel() == e,
                "moe_route shapes");
  cuda::require(weights.dtype() == logits.dtype() && per_expert_scale.dtype() == logits.dtype(),
                "moe_route dtypes");
  cuda::require_device(logits, "moe_route logits");
  cuda::require_device(per_expert_scale, "moe_route per_expert_scale");
  cuda::require_device(weights, "moe_route weights");
  cuda::require_device(idx, "moe_route idx");
  if (n == 0) return;
  cuda::dispatch(logits.dtype(), [&]<class T>() {
    moe_route_kernel<T><<<cuda::blocks_for(n, 128), 128>>>(logits.data<T>(), per_expert_scale.data<T>(),
                                                           weights.data<T>(), idx.data<int32_t>(), n, int(e),
                                                           int(k));
    TL_CUDA_LAUNCHED("moe_route_kernel");
  });
}

}  // namespace tl
