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

// One head's operand of a product: rows × cols at p (leading dimension ld) and, when the
// products run in bf16, its bf16 copy (contiguous), rounded once however many products read
// it (in the backward, K and V serve every query head of their group, and Q, dO, P and dS two
// products each).
template <class T>
struct Operand {
  const T* p;
  int64_t ld;
  const uint16_t* bf16 = nullptr;
};

// `buffer` holds the copy: one per operand and thread, grown only.
template <class T>
Operand<T> operand(bool bf16, const T* p, int64_t rows, int64_t cols, int64_t ld, std::vector<uint16_t>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    if (bf16) {
      cpu::pack_bf16(p, rows, cols, ld, buffer);
      return {p, ld, buffer.data()};
    }
  }
  (void)rows, (void)cols, (void)buffer;
  return {p, ld};
}

// C = op(A)·op(B) + beta·C for one head, in fp32/fp64 (OpenBLAS) or, from the operands' bf16
// copies, with fp32 sums (oneDNN).
template <class T>
void head_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, Operand<T> a, Operand<T> b, T beta, T* c,
               int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (a.bf16 && b.bf16) return cpu::gemm_bf16_packed(ta, tb, m, n, k, a.bf16, b.bf16, beta, c, ldc);
  }
  cpu::gemm(ta, tb, m, n, k, T(1), a.p, a.ld, b.p, b.ld, beta, c, ldc);
}

// P[t, :] = softmax over the keys query t may see (causal, window, same document) of
// Q_h·K_gᵀ; masked entries are 0. P is [S, S], row-major.
template <class T>
void probabilities(const Geometry& g, Operand<T> qh, Operand<T> kg, const AttentionMask& mask, const int32_t* doc,
                   T* P) {
  const int64_t S = g.S;
  head_gemm(false, true, S, S, g.d, qh, kg, T(0), P, S);
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
        // Per-thread buffers that only grow: probabilities() writes all of P, so a fresh
        // zero-filled one per task was a memset of S² values for nothing.
        thread_local std::vector<T> P;
        if (P.size() < size_t(g.S * g.S)) P.resize(size_t(g.S * g.S));
        thread_local std::vector<uint16_t> q16, k16, v16, p16;
        const int64_t kv = h / g.group, ldq = g.nh * g.d, ldk = g.nkv * g.d;
        const auto qh = operand(bf16, q.data<T>() + (b * g.S * g.nh + h) * g.d, g.S, g.d, ldq, q16);
        const auto kg = operand(bf16, k.data<T>() + (b * g.S * g.nkv + kv) * g.d, g.S, g.d, ldk, k16);
        const int32_t* doc = mask.doc_ids ? mask.doc_ids->data<int32_t>() + b * g.S : nullptr;
        probabilities(g, qh, kg, mask, doc, P.data());
        const auto vg = operand(bf16, v.data<T>() + (b * g.S * g.nkv + kv) * g.d, g.S, g.d, ldk, v16);
        const auto ph = operand(bf16, static_cast<const T*>(P.data()), g.S, g.S, g.S, p16);
        T* oh = out.data<T>() + (b * g.S * g.nh + h) * g.d;
        head_gemm(false, false, g.S, g.d, g.S, ph, vg, T(0), oh, ldq);
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
        thread_local std::vector<T> P, dS;  // written whole (probabilities(), the dP product): grown only
        if (P.size() < SS) P.resize(SS), dS.resize(SS);
        thread_local std::vector<uint16_t> k16, v16, q16, do16, p16, ds16;
        const int64_t ldq = g.nh * g.d, ldk = g.nkv * g.d;
        T* const dkg = dk.defined() ? dk.data<T>() + (b * g.S * g.nkv + kv) * g.d : nullptr;
        T* const dvg = dv.defined() ? dv.data<T>() + (b * g.S * g.nkv + kv) * g.d : nullptr;
        const auto kg = operand(bf16, k.data<T>() + (b * g.S * g.nkv + kv) * g.d, g.S, g.d, ldk, k16);
        const auto vg = operand(bf16, v.data<T>() + (b * g.S * g.nkv + kv) * g.d, g.S, g.d, ldk, v16);
        const int32_t* doc = mask.doc_ids ? mask.doc_ids->data<int32_t>() + b * g.S : nullptr;
        for (int64_t h = kv * g.group; h < (kv + 1) * g.group; ++h) {
          const auto qh = operand(bf16, q.data<T>() + (b * g.S * g.nh + h) * g.d, g.S, g.d, ldq, q16);
          const auto doh = operand(bf16, dout.data<T>() + (b * g.S * g.nh + h) * g.d, g.S, g.d, ldq, do16);
          probabilities(g, qh, kg, mask, doc, P.data());
          head_gemm(false, true, g.S, g.S, g.d, doh, vg, T(0), dS.data(), g.S);  // dP
          for (int64_t t = 0; t < g.S; ++t) {
            T* prow = P.data() + t * g.S;
            T* drow = dS.data() + t * g.S;
            T dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t s = 0; s < g.S; ++s) dot += prow[s] * drow[s];
            for (int64_t s = 0; s < g.S; ++s) drow[s] = prow[s] * (drow[s] - dot);
          }
          const auto ds = operand(bf16, static_cast<const T*>(dS.data()), g.S, g.S, g.S, ds16);
          if (dq.defined())
            head_gemm(false, false, g.S, g.d, g.S, ds, kg, T(1), dq.data<T>() + (b * g.S * g.nh + h) * g.d, ldq);
          if (dkg) head_gemm(true, false, g.S, g.d, g.S, ds, qh, T(1), dkg, ldk);
          if (dvg) {
            const auto ph = operand(bf16, static_cast<const T*>(P.data()), g.S, g.S, g.S, p16);
            head_gemm(true, false, g.S, g.d, g.S, ph, doh, T(1), dvg, ldk);
          }
        }
      }
  });
}

}  // namespace tl
