// Scaled-dot-product attention (scale 1.0) with GQA, causal + sliding-window + document
// masking. A straightforward kernel, written to match the CPU reference, not for speed:
// one block per (batch b, query head h, query t).
//
//   allowed(s) = s0 ≤ s ≤ t and doc[b,s] == doc[b,t],  s0 = max(0, t − window + 1) if window
//   score(s)   = T(Σ_j q[t,h,j]·k[s,g,j])            (g = h / (nh/nkv); Σ in double)
//   M = max score, Z = Σ exp(score − M)               (over allowed s, in double)
//   out[t,h,:] = T(Σ_s T(exp(score(s) − M)/Z) · v[s,g,:])   (Σ in double, s ascending)
//
// Scores are recomputed rather than stored, so memory does not grow with S: pass 1 finds
// M and Z (an online softmax per warp, merged across warps), pass 2 walks the keys in
// tiles, writing a tile's weights to shared memory, then each thread adds the weighted
// values into its own output dims j.
#include <cmath>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

constexpr int kAttnThreads = 128;  // 4 warps
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kTile = 32;  // keys per pass-2 tile

template <class T>
__global__ void attention_kernel(const T* q, const T* k, const T* v, const int32_t* doc, T* out, int64_t S,
                                 int64_t nh, int64_t nkv, int64_t d, int64_t window) {
  // Dynamic shared memory: q row [d], output accumulator [d], tile weights [kTile].
  extern __shared__ double smem[];
  double* qs = smem;
  double* acc = smem + d;
  double* wts = smem + 2 * d;
  __shared__ double warp_m[kAttnWarps], warp_z[kAttnWarps];

  const int64_t t = blockIdx.x % S, bh = blockIdx.x / S;
  const int64_t h = bh % nh, b = bh / nh;
  const int64_t g = h / (nh / nkv);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t s0 = window > 0 ? max(int64_t(0), t - window + 1) : 0;
  const int32_t doc_t = doc ? doc[b * S + t] : 0;

  const T* qt = q + ((b * S + t) * nh + h) * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    qs[j] = double(qt[j]);
    acc[j] = 0;
  }
  __syncthreads();

  // The whole warp computes one key's score; `s` and the mask are warp-uniform.
  auto allowed = [&](int64_t s) { return s <= t && (!doc || doc[b * S + s] == doc_t); };
  auto score = [&](int64_t s) {
    const T* ks = k + ((b * S + s) * nkv + g) * d;
    double a = 0;
    for (int64_t j = lane; j < d; j += 32) a += qs[j] * double(ks[j]);
    return double(T(cuda::warp_reduce(a, cuda::Sum{})));
  };

  // Pass 1: running max m and Σexp(score − m) per warp, rescaled when m grows.
  double m = -INFINITY, z = 0;
  for (int64_t s = s0 + warp; s <= t; s += kAttnWarps) {
    if (!allowed(s)) continue;
    const double sc = score(s);
    if (sc > m) {
      z = z * exp(m - sc) + 1.0;
      m = sc;
    } else {
      z += exp(sc - m);
    }
  }
  if (lane == 0) {
    warp_m[warp] = m;
    warp_z[warp] = z;
  }
  __syncthreads();
  double M = warp_m[0];
  for (int w = 1; w < kAttnWarps; ++w) M = max(M, warp_m[w]);
  double Z = 0;  // key t is always allowed, so M is finite and Z ≥ 1
  for (int w = 0; w < kAttnWarps; ++w)
    if (warp_m[w] != -INFINITY) Z += warp_z[w] * exp(warp_m[w] - M);

  // Pass 2: weights for a tile of keys, then acc[j] += w_s · v[s, j] in key order.
  for (int64_t base = s0; base <= t; base += kTile) {
    for (int i = warp; i < kTile; i += kAttnWarps) {
      const int64_t s = base + i;
      double w = 0;
      if (allowed(s)) w = double(T(exp(score(s) - M) / Z));
      if (lane == 0) wts[i] = w;
    }
    __syncthreads();
    const int n = int(min(int64_t(kTile), t - base + 1));
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      double a = acc[j];
      for (int i = 0; i < n; ++i)
        if (wts[i] != 0) a += wts[i] * double(v[((b * S + base + i) * nkv + g) * d + j]);
      acc[j] = a;
    }
    __syncthreads();  // the next tile overwrites wts
  }

  T* o = out + ((b * S + t) * nh + h) * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) o[j] = T(acc[j]);
}

}  // namespace

void CudaOps::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                                Tensor& out) {
  cuda::require(q.rank() == 4 && k.rank() == 4 && v.rank() == 4, "attention expects [B,S,heads,d]");
  const int64_t B = q.dim(0), S = q.dim(1), nh = q.dim(2), d = q.dim(3), nkv = k.dim(2);
  cuda::require(k.dim(0) == B && k.dim(1) == S && k.dim(3) == d && v.numel() == k.numel(), "attention k/v shape");
  cuda::require(nkv > 0 && nh % nkv == 0 && out.numel() == q.numel(), "attention heads");
  cuda::require(k.dtype() == q.dtype() && v.dtype() == q.dtype() && out.dtype() == q.dtype(), "attention dtypes");
  cuda::require_device(q, "attention q");
  cuda::require_device(k, "attention k");
  cuda::require_device(v, "attention v");
  cuda::require_device(out, "attention out");
  const size_t shmem = size_t(2 * d + kTile) * sizeof(double);
  // 48 KiB is the default per-block limit; keep 1 KiB for the static arrays.
  cuda::require(shmem + 1024 <= 48 * 1024, "attention: head_dim too large for this kernel (max 2992)");
  cuda::require(B * nh * S <= INT32_MAX, "attention: too many (batch, head, query) rows");
  if (q.numel() == 0) return;
  cuda::DeviceInts doc;
  if (mask.doc_ids) {
    cuda::require(mask.doc_ids->numel() == B * S, "attention doc_ids must be [B, S]");
    doc = cuda::device_ints(*mask.doc_ids, "attention doc_ids must be I32");
  }
  cuda::dispatch(q.dtype(), [&]<class T>() {
    attention_kernel<T><<<unsigned(B * nh * S), kAttnThreads, shmem>>>(
        q.data<T>(), k.data<T>(), v.data<T>(), doc.ptr, out.data<T>(), S, nh, nkv, d, mask.window);
    TL_CUDA_LAUNCHED("attention_kernel");
  });
}

}  // namespace tl
