// MoE routing: softmax over experts, top-k, renormalise, per-expert scale; and its backward.
#include <cmath>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

using cuda::acc_t;
using cuda::narrow;
using cuda::widen;

// One thread per token, replaying the reference's arithmetic in acc_t<T> (fp32 for bf16):
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
  using A = acc_t<T>;
  TL_GRID_STRIDE(t, n) {
    const T* l = logits + t * e;
    A mx = widen(l[0]);
    for (int j = 1; j < e; ++j) mx = widen(l[j]) > mx ? widen(l[j]) : mx;
    A z = 0;
    for (int j = 0; j < e; ++j) z += A(std::exp(widen(l[j]) - mx));
    auto p = [&](int j) { return A(std::exp(widen(l[j]) - mx)) / z; };

    // The best expert strictly after pick (prev, prev_p) in the order (any expert when
    // prev < 0), its p in best_p.
    auto next = [&](int prev, A prev_p, A& best_p) {
      int best = -1;
      best_p = 0;
      for (int j = 0; j < e; ++j) {
        const A pj = p(j);
        if (prev >= 0 && !ranks_before(prev_p, prev, pj, j)) continue;  // already taken
        if (best < 0 || ranks_before(pj, j, best_p, best)) {
          best = j;
          best_p = pj;
        }
      }
      return best;
    };
    // Two passes over the picks, so nothing is kept per pick and each weight is rounded to
    // T once: Σ p_top first, then idx and the weights p / Σ p_top · scale.
    A top = 0;
    int prev = -1;
    A prev_p = 0;
    for (int r = 0; r < k; ++r) {
      A best_p;
      prev = next(prev, prev_p, best_p);
      prev_p = best_p;
      top += best_p;
    }
    prev = -1;
    prev_p = 0;
    for (int r = 0; r < k; ++r) {
      A best_p;
      prev = next(prev, prev_p, best_p);
      prev_p = best_p;
      idx[t * k + r] = prev;
      weights[t * k + r] = narrow<T>(best_p / top * widen(per_expert_scale[prev]));
    }
  }
}

// Backward, one thread per token, in double as the reference does. p̃ = softmax over the
// chosen logits (equal to p_k / Σ_top p), dp̃_j = dw_j·s_{e_j}, dot = Σ_j p̃_j·dp̃_j:
//   dlogits[t, e_j] += p̃_j·(dp̃_j − dot)     (the e_j of one token are distinct: no race)
//   contrib[t, j]    = dw_j·p̃_j              (dscale's terms, reduced per expert below)
// p̃_j is recomputed rather than stored, so nothing per token lives in local memory.
template <class T>
__global__ void moe_route_backward_kernel(const T* logits, const T* scale, const int32_t* idx, const T* dw,
                                          T* dlogits, double* contrib, int64_t n, int64_t e, int64_t k) {
  TL_GRID_STRIDE(t, n) {
    const T* l = logits + t * e;
    const int32_t* ix = idx + t * k;
    double mx = -INFINITY, z = 0, dot = 0;
    for (int64_t j = 0; j < k; ++j) mx = max(mx, double(widen(l[ix[j]])));
    for (int64_t j = 0; j < k; ++j) z += exp(double(widen(l[ix[j]])) - mx);
    auto pt = [&](int64_t j) { return exp(double(widen(l[ix[j]])) - mx) / z; };
    auto dpt = [&](int64_t j) { return double(widen(dw[t * k + j])) * double(widen(scale[ix[j]])); };
    for (int64_t j = 0; j < k; ++j) {
      dot += pt(j) * dpt(j);
      if (contrib) contrib[t * k + j] = double(widen(dw[t * k + j])) * pt(j);
    }
    if (dlogits)
      for (int64_t j = 0; j < k; ++j) {
        T& dl = dlogits[t * e + ix[j]];
        dl = narrow<T>(widen(dl) + acc_t<T>(pt(j) * (dpt(j) - dot)));
      }
  }
}

// dscale[ex] += Σ contrib[i] over the slots i routed to expert ex; one block per expert,
// a fixed-shape block reduction (deterministic, no atomics).
template <class T>
__global__ void moe_dscale_kernel(const int32_t* idx, const double* contrib, T* dscale, int64_t nk) {
  const int32_t ex = int32_t(blockIdx.x);
  double a = 0;
  for (int64_t i = threadIdx.x; i < nk; i += blockDim.x)
    if (idx[i] == ex) a += contrib[i];
  a = cuda::block_reduce(a, cuda::Sum{});
  if (threadIdx.x == 0) dscale[ex] = narrow<T>(widen(dscale[ex]) + acc_t<T>(a));
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

void CudaOps::moe_route_backward(const Tensor& logits, const Tensor& per_expert_scale, const Tensor& idx,
                                 const Tensor& dweights, Tensor& dlogits, Tensor& dscale) {
  cuda::require(logits.rank() == 2, "moe_route_backward logits must be [N, E]");
  const int64_t n = logits.dim(0), e = logits.dim(1);
  cuda::require(n > 0 ? idx.numel() % n == 0 : idx.numel() == 0, "moe_route_backward idx shape");
  const int64_t k = n > 0 ? idx.numel() / n : 0;
  cuda::require(dweights.numel() == n * k && per_expert_scale.numel() == e && e <= INT32_MAX,
                "moe_route_backward shapes");
  cuda::require(per_expert_scale.dtype() == logits.dtype() && dweights.dtype() == logits.dtype(),
                "moe_route_backward dtypes");
  cuda::require_device(logits, "moe_route_backward logits");
  cuda::require_device(per_expert_scale, "moe_route_backward per_expert_scale");
  cuda::require_device(dweights, "moe_route_backward dweights");
  if (dlogits.defined()) {
    cuda::require(dlogits.numel() == n * e && dlogits.dtype() == logits.dtype(), "moe_route_backward dlogits");
    cuda::require_device(dlogits, "moe_route_backward dlogits");
  }
  if (dscale.defined()) {
    cuda::require(dscale.numel() == e && dscale.dtype() == logits.dtype(), "moe_route_backward dscale");
    cuda::require_device(dscale, "moe_route_backward dscale");
  }
  if (n == 0 || k == 0 || (!dlogits.defined() && !dscale.defined())) return;
  cuda::DeviceInts ix = cuda::device_ints(idx, "moe_route_backward idx must be I32");
  std::shared_ptr<void> contrib = dscale.defined() ? cuda::device_alloc(size_t(n * k) * sizeof(double)) : nullptr;
  cuda::dispatch(logits.dtype(), [&]<class T>() {
    moe_route_backward_kernel<T><<<cuda::blocks_for(n, 128), 128>>>(
        logits.data<T>(), per_expert_scale.data<T>(), ix.ptr, dweights.data<T>(),
        dlogits.defined() ? dlogits.data<T>() : nullptr, static_cast<double*>(contrib.get()), n, e, k);
    TL_CUDA_LAUNCHED("moe_route_backward_kernel");
    if (!dscale.defined()) return;
    moe_dscale_kernel<T><<<unsigned(e), cuda::kThreads>>>(ix.ptr, static_cast<const double*>(contrib.get()),
                                                          dscale.data<T>(), n * k);
    TL_CUDA_LAUNCHED("moe_dscale_kernel");
  });
}

}  // namespace tl
