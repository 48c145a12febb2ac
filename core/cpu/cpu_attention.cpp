// Attention on the CPU as GEMMs per (batch, head): scores = Q·Kᵀ (scale 1.0), masked
// softmax per row, O = P·V; and the backward
//   dP = dO·Vᵀ;  dS = P∘(dP − rowsum(P∘dP));  dQ = dS·K;  dK = dSᵀ·Q;  dV = Pᵀ·dO.
// Scores and softmax are in the activation dtype (fp32 like HF's eager attention, or fp64).
// With CpuMatmul::Bf16 the five products take bf16-rounded operands with fp32 sums, as the
// GPU's attention does under bf16; the softmax and its backward stay fp32.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/gemm_bf16.h"
#include "core/cpu/cpu_util.h"
#include "core/cpu/vector_math.h"

namespace tl {

using cpu::dispatch;
using cpu::require;

namespace {

struct Geometry {
  int64_t B, S, nh, d, nkv, group;
};

Geometry check(const Tensor& q, const Tensor& k, const Tensor& v) {
  require(q.rank() == 4 && k.rank() == 4 && v.rank() == 4, "attention expects [B,S,heads,d]");
  Geometry g{q.dim(0), q.dim(1), q.dim(2), q.dim(3), k.dim(2), 0};
  require(k.dim(0) == g.B && k.dim(1) == g.S && k.dim(3) == g.d && v.numel() == k.numel(), "attention k/v shape");
  require(g.nh % g.nkv == 0, "attention heads");
  g.group = g.nh / g.nkv;
  return g;
}

// C = op(A)·op(B) + beta·C for one head, in fp32/fp64 (OpenBLAS) or, with `bf16`, from
// operands rounded to bf16 (cpu::gemm_bf16: per-thread buffers, so one OpenMP task each).
template <class T>
void head_gemm(bool bf16, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (bf16) return cpu::gemm_bf16(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
  }
  cpu::gemm(ta, tb, m, n, k, T(1), a, lda, b, ldb, beta, c, ldc);
}

// P[t, :] = softmax over the keys query t may see (causal, window, same document) of
// Q_h·K_gᵀ; masked entries are 0. P is [S, S], row-major.
template <class T>
void probabilities(bool bf16, const Geometry& g, const T* qh, const T* kg, const AttentionMask& mask,
                   const int32_t* doc, T* P) {
  const int64_t S = g.S;
  head_gemm(bf16, false, true, S, S, g.d, qh, g.nh * g.d, kg, g.nkv * g.d, T(0), P, S);
  constexpr T kMasked = -std::numeric_limits<T>::infinity();
  for (int64_t t = 0; t < S; ++t) {
    T* row = P + t * S;
    // Keys outside [s0, t] are masked by causality and the window; a document mask may drop
    // some inside. Row t always sees itself, so mx is finite.
    const int64_t s0 = mask.window > 0 ? std::max<int64_t>(0, t - mask.window + 1) : 0;
    if (doc)
      for (int64_t s = s0; s <= t; ++s)
        if (doc[s] != doc[t]) row[s] = kMasked;
    T mx = kMasked;
    for (int64_t s = s0; s <= t; ++s) mx = std::max(mx, row[s]);
    std::fill(row, row + s0, T(0));
    std::fill(row + t + 1, row + S, T(0));
    // Separate loops, so that the exponentials vectorize and the sum is a SIMD reduction.
    for (int64_t s = s0; s <= t; ++s) row[s] = row[s] == kMasked ? T(0) : cpu::exp_of(row[s] - mx);
    T z = 0;
#pragma omp simd reduction(+ : z)
    for (int64_t s = s0; s <= t; ++s) z += row[s];
    const T inv_z = T(1) / z;
    for (int64_t s = s0; s <= t; ++s) row[s] *= inv_z;
  }
}

}  // namespace

void CpuOps::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                               Tensor& out) {
  const Geometry g = check(q, k, v);
  require(out.numel() == q.numel(), "attention out");
  const bool bf16 = bf16_for(g.S * g.S * g.d);
  dispatch(q.dtype(), [&]<class T>() {
#pragma omp parallel for collapse(2) schedule(dynamic) if(q.numel() * g.S >= cpu::kParallelMin)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.nh; ++h) {
        std::vector<T> P(static_cast<size_t>(g.S * g.S));
        const int64_t kv = h / g.group;
        const T* qh = q.data<T>() + (b * g.S * g.nh + h) * g.d;
        const T* kg = k.data<T>() + (b * g.S * g.nkv + kv) * g.d;
        const T* vg = v.data<T>() + (b * g.S * g.nkv + kv) * g.d;
        const int32_t* doc = mask.doc_ids ? mask.doc_ids->data<int32_t>() + b * g.S : nullptr;
        probabilities(bf16, g, qh, kg, mask, doc, P.data());
        T* oh = out.data<T>() + (b * g.S * g.nh + h) * g.d;
        head_gemm(bf16, false, false, g.S, g.d, g.S, P.data(), g.S, vg, g.nkv * g.d, T(0), oh, g.nh * g.d);
      }
  });
}

void CpuOps::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                                const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Geometry g = check(q, k, v);
  const bool bf16 = bf16_for(g.S * g.S * g.d);
  dispatch(q.dtype(), [&]<class T>() {
    // One task per (batch, KV head): its query heads all add into the same dk/dv rows.
#pragma omp parallel for collapse(2) schedule(dynamic) if(q.numel() * g.S >= cpu::kParallelMin)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t kv = 0; kv < g.nkv; ++kv) {
        const size_t SS = static_cast<size_t>(g.S * g.S);
        std::vector<T> P(SS), dS(SS);
        const T* kg = k.data<T>() + (b * g.S * g.nkv + kv) * g.d;
        const T* vg = v.data<T>() + (b * g.S * g.nkv + kv) * g.d;
        const int32_t* doc = mask.doc_ids ? mask.doc_ids->data<int32_t>() + b * g.S : nullptr;
        const int64_t ldq = g.nh * g.d, ldk = g.nkv * g.d;
        for (int64_t h = kv * g.group; h < (kv + 1) * g.group; ++h) {
          const T* qh = q.data<T>() + (b * g.S * g.nh + h) * g.d;
          const T* doh = dout.data<T>() + (b * g.S * g.nh + h) * g.d;
          probabilities(bf16, g, qh, kg, mask, doc, P.data());
          head_gemm(bf16, false, true, g.S, g.S, g.d, doh, ldq, vg, ldk, T(0), dS.data(), g.S);  // dP
          for (int64_t t = 0; t < g.S; ++t) {
            T* prow = P.data() + t * g.S;
            T* drow = dS.data() + t * g.S;
            T dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t s = 0; s < g.S; ++s) dot += prow[s] * drow[s];
            for (int64_t s = 0; s < g.S; ++s) drow[s] = prow[s] * (drow[s] - dot);
          }
          if (dq.defined())
            head_gemm(bf16, false, false, g.S, g.d, g.S, dS.data(), g.S, kg, ldk, T(1),
                      dq.data<T>() + (b * g.S * g.nh + h) * g.d, ldq);
          if (dk.defined())
            head_gemm(bf16, true, false, g.S, g.d, g.S, dS.data(), g.S, qh, ldq, T(1),
                      dk.data<T>() + (b * g.S * g.nkv + kv) * g.d, ldk);
          if (dv.defined())
            head_gemm(bf16, true, false, g.S, g.d, g.S, P.data(), g.S, doh, ldq, T(1),
                      dv.data<T>() + (b * g.S * g.nkv + kv) * g.d, ldk);
        }
      }
  });
}

}  // namespace tl
