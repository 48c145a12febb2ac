// Backward of attention_forward (scale 1.0, GQA, causal + window + document mask), written
// to match the CPU reference, not for speed. Probabilities are recomputed from q and k.
//
// For query row (b,t,h) with allowed keys s (see attention.cu), in double:
//   sc_s = q_t·k_s (not rounded to T here, as in the reference backward)
//   p_s  = exp(sc_s − M)/Z,   dp_s = dO_t·v_s,   pdp = Σ_s p_s·dp_s,   ds_s = p_s·(dp_s − pdp)
//   dq_t += Σ_s ds_s·k_s,   dk_s += Σ_{h,t} ds_s·q_t,   dv_s += Σ_{h,t} p_s·dO_t
//
// Two kernels, no atomics (deterministic):
//   1. one block per query (b,h,t): M, Z and pdp (an online pass with rescaling, per warp,
//      merged across warps), saved per query; then dq in key tiles.
//   2. one block per key (b,g,s): walks the queries that see s (heads of group g, then t
//      ascending, as the reference), recomputes p and ds from the saved stats, and sums
//      dk_s and dv_s in shared memory.
#include <cmath>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;

// Σ_j a[j]·b[j] by one warp (a in shared memory as double, b a global row); all lanes get it.
template <class T>
__device__ double warp_dot(const double* a, const T* b, int64_t d) {
  double r = 0;
  for (int64_t j = threadIdx.x & 31; j < d; j += 32) r += a[j] * double(b[j]);
  return cuda::warp_reduce(r, cuda::Sum{});
}

template <class T>
__global__ void attention_dq_kernel(const T* q, const T* k, const T* v, const T* dout, const int32_t* doc,
                                    double* stats, T* dq, int64_t S, int64_t nh, int64_t nkv, int64_t d,
                                    int64_t window) {
  extern __shared__ double smem[];  // q row [d], dO row [d], dq accumulator [d], tile ds [kTile]
  double *qs = smem, *gs = smem + d, *acc = smem + 2 * d, *dss = smem + 3 * d;
  __shared__ double warp_m[kWarps], warp_z[kWarps], warp_u[kWarps];

  const int64_t t = blockIdx.x % S, bh = blockIdx.x / S, h = bh % nh, b = bh / nh;
  const int64_t g = h / (nh / nkv), row = (b * S + t) * nh + h;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t s0 = window > 0 ? max(int64_t(0), t - window + 1) : 0;
  const int32_t doc_t = doc ? doc[b * S + t] : 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    qs[j] = double(q[row * d + j]);
    gs[j] = double(dout[row * d + j]);
    acc[j] = 0;
  }
  __syncthreads();
  auto allowed = [&](int64_t s) { return s <= t && (!doc || doc[b * S + s] == doc_t); };
  auto kv = [&](int64_t s) { return ((b * S + s) * nkv + g) * d; };

  // Pass 1: m, z = Σ e^(sc−m), u = Σ e^(sc−m)·dp per warp, rescaled when m grows.
  double m = -INFINITY, z = 0, u = 0;
  for (int64_t s = s0 + warp; s <= t; s += kWarps) {
    if (!allowed(s)) continue;  // warp-uniform
    const double sc = warp_dot(qs, k + kv(s), d), dp = warp_dot(gs, v + kv(s), d);
    if (sc > m) {
      const double f = exp(m - sc);
      z = z * f + 1.0;
      u = u * f + dp;
      m = sc;
    } else {
      const double e = exp(sc - m);
      z += e;
      u += e * dp;
    }
  }
  if (lane == 0) {
    warp_m[warp] = m;
    warp_z[warp] = z;
    warp_u[warp] = u;
  }
  __syncthreads();
  double M = warp_m[0], Z = 0, U = 0;
  for (int w = 1; w < kWarps; ++w) M = max(M, warp_m[w]);
  for (int w = 0; w < kWarps; ++w) {
    if (warp_m[w] == -INFINITY) continue;
    const double f = exp(warp_m[w] - M);
    Z += warp_z[w] * f;
    U += warp_u[w] * f;
  }
  const double pdp = U / Z;  // Σ p·dp
  if (threadIdx.x == 0) {
    stats[row * 3 + 0] = M;
    stats[row * 3 + 1] = Z;
    stats[row * 3 + 2] = pdp;
  }
  if (!dq) return;  // block-uniform

  // Pass 2: ds for a tile of keys, then acc[j] += ds_s·k[s, j] in key order.
  for (int64_t base = s0; base <= t; base += kTile) {
    for (int i = warp; i < kTile; i += kWarps) {
      const int64_t s = base + i;
      double ds = 0;
      if (allowed(s)) {
        const double sc = warp_dot(qs, k + kv(s), d), dp = warp_dot(gs, v + kv(s), d);
        ds = exp(sc - M) / Z * (dp - pdp);
      }
      if (lane == 0) dss[i] = ds;
    }
    __syncthreads();
    const int n = int(min(int64_t(kTile), t - base + 1));
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      double a = acc[j];
      for (int i = 0; i < n; ++i)
        if (dss[i] != 0) a += dss[i] * double(k[kv(base + i) + j]);
      acc[j] = a;
    }
    __syncthreads();  // the next tile overwrites dss
  }
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) dq[row * d + j] += T(acc[j]);
}

template <class T>
__global__ void attention_dkv_kernel(const T* q, const T* k, const T* v, const T* dout, const int32_t* doc,
                                     const double* stats, T* dk, T* dv, int64_t S, int64_t nh, int64_t nkv,
                                     int64_t d, int64_t window) {
  extern __shared__ double smem[];  // k row [d], v row [d], dk acc [d], dv acc [d], tile p, ds
  double *ks = smem, *vs = smem + d, *dka = smem + 2 * d, *dva = smem + 3 * d;
  double *ps = smem + 4 * d, *dss = ps + kTile;
  __shared__ int64_t rows[kTile];

  const int64_t s = blockIdx.x % S, bg = blockIdx.x / S, g = bg % nkv, b = bg / nkv;
  const int64_t group = nh / nkv, kvrow = (b * S + s) * nkv + g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    ks[j] = double(k[kvrow * d + j]);
    vs[j] = double(v[kvrow * d + j]);
    dka[j] = dva[j] = 0;
  }
  __syncthreads();
  // Queries that may see key s: t in [s, t_end] (causal + window), same document.
  const int64_t t_end = window > 0 ? min(S - 1, s + window - 1) : S - 1;
  const int64_t nt = t_end - s + 1, total = group * nt;  // item = (head offset)·nt + (t − s)
  const int32_t doc_s = doc ? doc[b * S + s] : 0;

  for (int64_t base = 0; base < total; base += kTile) {
    for (int i = warp; i < kTile; i += kWarps) {
      const int64_t item = base + i, t = s + item % nt, h = g * group + item / nt;
      double p = 0, ds = 0;
      if (item < total && (!doc || doc[b * S + t] == doc_s)) {  // warp-uniform
        const int64_t row = (b * S + t) * nh + h;
        const double sc = warp_dot(ks, q + row * d, d), dp = warp_dot(vs, dout + row * d, d);
        p = exp(sc - stats[row * 3 + 0]) / stats[row * 3 + 1];
        ds = p * (dp - stats[row * 3 + 2]);
        if (lane == 0) rows[i] = row;
      }
      if (lane == 0) {
        ps[i] = p;
        dss[i] = ds;
      }
    }
    __syncthreads();
    const int n = int(min(int64_t(kTile), total - base));
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      double a = dka[j], c = dva[j];
      for (int i = 0; i < n; ++i) {
        if (ps[i] == 0) continue;  // masked (or underflowed: then ds is 0 too)
        a += dss[i] * double(q[rows[i] * d + j]);
        c += ps[i] * double(dout[rows[i] * d + j]);
      }
      dka[j] = a;
      dva[j] = c;
    }
    __syncthreads();  // the next tile overwrites ps, dss, rows
  }
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    if (dk) dk[kvrow * d + j] += T(dka[j]);
    if (dv) dv[kvrow * d + j] += T(dva[j]);
  }
}

void require_like(const Tensor& grad, const Tensor& x, const char* what) {
  if (!grad.defined()) return;
  cuda::require(grad.numel() == x.numel() && grad.dtype() == x.dtype(), what);
  cuda::require_device(grad, what);
}

}  // namespace

void CudaOps::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                                 const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) {
  cuda::require(q.rank() == 4 && k.rank() == 4 && v.rank() == 4, "attention expects [B,S,heads,d]");
  const int64_t B = q.dim(0), S = q.dim(1), nh = q.dim(2), d = q.dim(3), nkv = k.dim(2);
  cuda::require(k.dim(0) == B && k.dim(1) == S && k.dim(3) == d && v.numel() == k.numel(), "attention k/v shape");
  cuda::require(nkv > 0 && nh % nkv == 0 && dout.numel() == q.numel(), "attention heads");
  cuda::require(k.dtype() == q.dtype() && v.dtype() == q.dtype() && dout.dtype() == q.dtype(), "attention dtypes");
  for (const Tensor* t : {&q, &k, &v, &dout}) cuda::require_device(*t, "attention_backward inputs");
  require_like(dq, q, "attention_backward dq");
  require_like(dk, k, "attention_backward dk");
  require_like(dv, v, "attention_backward dv");
  const size_t shmem_q = size_t(3 * d + kTile) * sizeof(double), shmem_kv = size_t(4 * d + 2 * kTile) * sizeof(double);
  // 48 KiB is the default per-block limit; keep 1 KiB for the static arrays.
  cuda::require(shmem_kv + 1024 <= 48 * 1024, "attention_backward: head_dim too large for this kernel (max 1488)");
  cuda::require(B * nh * S <= INT32_MAX, "attention: too many (batch, head, query) rows");
  if (q.numel() == 0 || (!dq.defined() && !dk.defined() && !dv.defined())) return;
  cuda::DeviceInts doc;
  if (mask.doc_ids) {
    cuda::require(mask.doc_ids->numel() == B * S, "attention doc_ids must be [B, S]");
    doc = cuda::device_ints(*mask.doc_ids, "attention doc_ids must be I32");
  }
  // Per query row: M, Z, Σp·dp (kernel 1 writes them, kernel 2 reads them).
  std::shared_ptr<void> stats = cuda::device_alloc(size_t(B * S * nh) * 3 * sizeof(double));
  double* st = static_cast<double*>(stats.get());
  cuda::dispatch(q.dtype(), [&]<class T>() {
    attention_dq_kernel<T><<<unsigned(B * nh * S), kThreads, shmem_q>>>(
        q.data<T>(), k.data<T>(), v.data<T>(), dout.data<T>(), doc.ptr, st, dq.defined() ? dq.data<T>() : nullptr,
        S, nh, nkv, d, mask.window);
    TL_CUDA_LAUNCHED("attention_dq_kernel");
    if (!dk.defined() && !dv.defined()) return;
    attention_dkv_kernel<T><<<unsigned(B * nkv * S), kThreads, shmem_kv>>>(
        q.data<T>(), k.data<T>(), v.data<T>(), dout.data<T>(), doc.ptr, st, dk.defined() ? dk.data<T>() : nullptr,
        dv.defined() ? dv.data<T>() : nullptr, S, nh, nkv, d, mask.window);
    TL_CUDA_LAUNCHED("attention_dkv_kernel");
  });
}

}  // namespace tl
