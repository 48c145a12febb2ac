// Attention on the CPU as GEMMs per (batch, KV head, block of 128 queries), the group's
// query heads stacked into one product (GQA: they share K and V):
//   keys [lo, hi] of a block: hi = its last query (causal); lo = the earliest key any of its
//   queries may see (the window, and the first position of the query's document), so key
//   blocks wholly outside the causal mask, the window or the documents are never multiplied;
//   scores = Q_blk·K[lo..hi]ᵀ (scale 1.0), masked softmax per row, O_blk = P·V[lo..hi];
//   each row's log-sum-exp is kept (AttentionMask::lse) for the backward, which then
//   recomputes P = exp(scores − lse) without the row's max and sum:
//   dP = dO·Vᵀ;  dS = P∘(dP − rowsum(P∘dP));  dQ = dS·K;  dK = dSᵀ·Q;  dV = Pᵀ·dO.
// Scores and softmax are in the activation dtype (fp32 like HF's eager attention, or fp64).
// With CpuMatmul::Bf16 the five products take bf16-rounded operands with fp32 sums, as the
// GPU's attention does under bf16; the softmax and its backward stay fp32.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/attention_blocks.h"
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

// Per batch row, the first key each query may see (core/attention_blocks.h).
std::vector<std::vector<int64_t>> first_visible(const Geometry& g, const AttentionMask& mask) {
  std::vector<std::vector<int64_t>> first(static_cast<size_t>(g.B));
  for (int64_t b = 0; b < g.B; ++b)
    first[size_t(b)] =
        first_visible_keys(g.S, mask.window, mask.doc_ids ? mask.doc_ids->data<int32_t>() + b * g.S : nullptr);
  return first;
}

// A contiguous operand [rows, cols], fp32/fp64, and its bf16 copy when the products run in
// bf16; `buf`/`buf16` are the calling thread's buffers, grown only.
template <class T>
struct Block {
  const T* p = nullptr;
  int64_t ld = 0;
  const uint16_t* bf16 = nullptr;
};

template <class T>
Block<T> with_bf16(bool bf16, const T* p, int64_t rows, int64_t cols, int64_t ld, std::vector<uint16_t>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    if (bf16) {
      cpu::pack_bf16(p, rows, cols, ld, buffer);
      return {p, ld, buffer.data()};
    }
  }
  (void)rows, (void)cols, (void)buffer;
  return {p, ld, nullptr};
}

// C = op(A)·op(B) + beta·C, in fp32/fp64 (OpenBLAS) or, from the operands' bf16 copies,
// with fp32 sums.
template <class T>
void block_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, Block<T> a, Block<T> b, T beta, T* c, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (a.bf16 && b.bf16) return cpu::gemm_bf16_packed(ta, tb, m, n, k, a.bf16, b.bf16, beta, c, ldc);  // contiguous
  }
  cpu::gemm(ta, tb, m, n, k, T(1), a.p, a.ld, b.p, b.ld, beta, c, ldc);
}

// The rows of the group's query heads for queries [t0, t1) of batch b, stacked head-major:
// row j·rows + r is head kv·group + j at query t0 + r. `src` is [B, S, nh, d].
template <class T>
void stack_heads(const Geometry& g, const T* src, int64_t b, int64_t kv, int64_t t0, int64_t rows, T* dst) {
  for (int64_t j = 0; j < g.group; ++j)
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(src + ((b * g.S + t0 + r) * g.nh + kv * g.group + j) * g.d, g.d, dst + (j * rows + r) * g.d);
}
template <class T>
void unstack_heads(const Geometry& g, const T* src, int64_t b, int64_t kv, int64_t t0, int64_t rows, T* dst,
                   bool add) {
  for (int64_t j = 0; j < g.group; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      const T* s = src + (j * rows + r) * g.d;
      T* o = dst + ((b * g.S + t0 + r) * g.nh + kv * g.group + j) * g.d;
      if (add)
        for (int64_t c = 0; c < g.d; ++c) o[c] += s[c];
      else
        std::copy_n(s, g.d, o);
    }
}

// One block's mask: row i (head j, query t = t0 + i % rows) sees keys lo + c for c in
// [begin, end) whose document is t's.
struct RowSpan {
  int64_t begin, end;
};
RowSpan row_span(const std::vector<int64_t>& first, int64_t t, int64_t lo) { return {first[size_t(t)] - lo, t - lo + 1}; }

// P = softmax of each row of `sc` [G·rows, L] over the keys its query may see (0 elsewhere),
// in place; lse[row] = max + log Σ exp (when lse is given).
template <class T>
void masked_softmax(T* sc, int64_t G_rows, int64_t rows, int64_t L, int64_t t0, int64_t lo,
                    const std::vector<int64_t>& first, const int32_t* doc, T* lse) {
  constexpr T kMasked = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < G_rows; ++i) {
    const int64_t t = t0 + i % rows;
    const RowSpan sp = row_span(first, t, lo);
    T* row = sc + i * L;
    if (doc)
      for (int64_t c = sp.begin; c < sp.end; ++c)
        if (doc[lo + c] != doc[t]) row[c] = kMasked;
    T mx = kMasked;  // row t always sees itself, so mx is finite
    for (int64_t c = sp.begin; c < sp.end; ++c) mx = std::max(mx, row[c]);
    std::fill(row, row + sp.begin, T(0));
    std::fill(row + sp.end, row + L, T(0));
    // Separate loops, so that the exponentials vectorize and the sum is a SIMD reduction.
    for (int64_t c = sp.begin; c < sp.end; ++c) row[c] = row[c] == kMasked ? T(0) : cpu::exp_of(row[c] - mx);
    T z = 0;
#pragma omp simd reduction(+ : z)
    for (int64_t c = sp.begin; c < sp.end; ++c) z += row[c];
    const T inv_z = T(1) / z;
    for (int64_t c = sp.begin; c < sp.end; ++c) row[c] *= inv_z;
    if (lse) lse[i] = mx + std::log(z);
  }
}

// P = exp(scores − lse) on the visible keys (0 elsewhere), in place: the forward's
// probabilities from its saved log-sum-exp, without the row's max and sum.
template <class T>
void probabilities_from_lse(T* sc, int64_t G_rows, int64_t rows, int64_t L, int64_t t0, int64_t lo,
                            const std::vector<int64_t>& first, const int32_t* doc, const T* lse) {
  for (int64_t i = 0; i < G_rows; ++i) {
    const int64_t t = t0 + i % rows;
    const RowSpan sp = row_span(first, t, lo);
    T* row = sc + i * L;
    std::fill(row, row + sp.begin, T(0));
    std::fill(row + sp.end, row + L, T(0));
    const T l = lse[i];
    for (int64_t c = sp.begin; c < sp.end; ++c) row[c] = cpu::exp_of(row[c] - l);
    if (doc)
      for (int64_t c = sp.begin; c < sp.end; ++c)
        if (doc[lo + c] != doc[t]) row[c] = T(0);
  }
}

// lse rows of the block (head j, query t0 + r) ↔ the [B, nh, S] tensor.
template <class T>
void lse_rows(const Geometry& g, T* lse, int64_t b, int64_t kv, int64_t t0, int64_t rows, T* block, bool store) {
  for (int64_t j = 0; j < g.group; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      T& slot = lse[(b * g.nh + kv * g.group + j) * g.S + t0 + r];
      if (store) slot = block[j * rows + r];
      else block[j * rows + r] = slot;
    }
}

void check_lse(const Tensor* lse, const Geometry& g, DType act) {
  if (!lse || !lse->defined()) return;
  require(lse->numel() == g.B * g.nh * g.S && lse->dtype() == act, "attention lse must be [B, nh, S], F32 (F64 with F64 activations)");
}

}  // namespace

void CpuOps::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                               Tensor& out) {
  const Geometry g = check(q, k, v);
  require(out.numel() == q.numel(), "attention out");
  check_lse(mask.lse, g, q.dtype());
  const bool bf16 = bf16_for(g.S * g.S * g.d);
  const int64_t blocks = attention_blocks(g.S);
  std::atomic<int64_t> scores{0};
  dispatch(q.dtype(), [&]<class T>() {
    T* lse = mask.lse && mask.lse->defined() ? mask.lse->data<T>() : nullptr;
    const std::vector<std::vector<int64_t>> first = first_visible(g, mask);
#pragma omp parallel for collapse(3) schedule(dynamic) if(q.numel() * g.S >= cpu::kParallelMin)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t kv = 0; kv < g.nkv; ++kv)
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t t0 = blk * kAttentionBlockRows, rows = std::min(kAttentionBlockRows, g.S - t0), GR = g.group * rows;
          const int32_t* doc = mask.doc_ids ? mask.doc_ids->data<int32_t>() + b * g.S : nullptr;
          const int64_t lo = block_first_key(first[size_t(b)], t0, t0 + rows), L = t0 + rows - lo, ldk = g.nkv * g.d;
          scores += GR * L;
          // Per-thread buffers that only grow (each is written whole before it is read).
          thread_local std::vector<T> Q, Sc, O, lse_blk;
          thread_local std::vector<uint16_t> q16, k16, v16, p16;
          if (Q.size() < size_t(GR * g.d)) Q.resize(size_t(GR * g.d)), O.resize(size_t(GR * g.d));
          if (Sc.size() < size_t(GR * L)) Sc.resize(size_t(GR * L));
          if (lse_blk.size() < size_t(GR)) lse_blk.resize(size_t(GR));
          stack_heads(g, q.data<T>(), b, kv, t0, rows, Q.data());
          const T* kp = k.data<T>() + ((b * g.S + lo) * g.nkv + kv) * g.d;
          const T* vp = v.data<T>() + ((b * g.S + lo) * g.nkv + kv) * g.d;
          const auto qb = with_bf16(bf16, static_cast<const T*>(Q.data()), GR, g.d, g.d, q16);
          const auto kb = with_bf16(bf16, kp, L, g.d, ldk, k16);
          block_gemm(false, true, GR, L, g.d, qb, kb, T(0), Sc.data(), L);
          masked_softmax(Sc.data(), GR, rows, L, t0, lo, first[size_t(b)], doc, lse ? lse_blk.data() : nullptr);
          if (lse) lse_rows(g, lse, b, kv, t0, rows, lse_blk.data(), true);
          const auto vb = with_bf16(bf16, vp, L, g.d, ldk, v16);
          const auto pb = with_bf16(bf16, static_cast<const T*>(Sc.data()), GR, L, L, p16);
          block_gemm(false, false, GR, g.d, L, pb, vb, T(0), O.data(), g.d);
          unstack_heads(g, static_cast<const T*>(O.data()), b, kv, t0, rows, out.data<T>(), false);
        }
  });
  attention_scores_ += scores.load();
}

void CpuOps::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                                const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Geometry g = check(q, k, v);
  check_lse(mask.lse, g, q.dtype());
  const bool bf16 = bf16_for(g.S * g.S * g.d);
  const int64_t blocks = attention_blocks(g.S);
  std::atomic<int64_t> scores{0};
  dispatch(q.dtype(), [&]<class T>() {
    const T* lse = mask.lse && mask.lse->defined() ? mask.lse->data<T>() : nullptr;
    const std::vector<std::vector<int64_t>> first_of_row = first_visible(g, mask);
    // One task per (batch, KV head): its query blocks and heads all add into the same dk/dv rows.
#pragma omp parallel for collapse(2) schedule(dynamic) if(q.numel() * g.S >= cpu::kParallelMin)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t kv = 0; kv < g.nkv; ++kv) {
        const int32_t* doc = mask.doc_ids ? mask.doc_ids->data<int32_t>() + b * g.S : nullptr;
        const std::vector<int64_t>& first = first_of_row[size_t(b)];
        const int64_t ldk = g.nkv * g.d;
        T* const dkg = dk.defined() ? dk.data<T>() + (b * g.S * g.nkv + kv) * g.d : nullptr;
        T* const dvg = dv.defined() ? dv.data<T>() + (b * g.S * g.nkv + kv) * g.d : nullptr;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t t0 = blk * kAttentionBlockRows, rows = std::min(kAttentionBlockRows, g.S - t0), GR = g.group * rows;
          const int64_t lo = block_first_key(first, t0, t0 + rows), L = t0 + rows - lo;
          scores += GR * L;
          thread_local std::vector<T> Q, dO, P, dS, dQ, lse_blk;
          thread_local std::vector<uint16_t> q16, k16, v16, do16, p16, ds16;
          if (Q.size() < size_t(GR * g.d)) Q.resize(size_t(GR * g.d)), dO.resize(size_t(GR * g.d)), dQ.resize(size_t(GR * g.d));
          if (P.size() < size_t(GR * L)) P.resize(size_t(GR * L)), dS.resize(size_t(GR * L));
          if (lse_blk.size() < size_t(GR)) lse_blk.resize(size_t(GR));
          stack_heads(g, q.data<T>(), b, kv, t0, rows, Q.data());
          stack_heads(g, dout.data<T>(), b, kv, t0, rows, dO.data());
          const T* kp = k.data<T>() + ((b * g.S + lo) * g.nkv + kv) * g.d;
          const T* vp = v.data<T>() + ((b * g.S + lo) * g.nkv + kv) * g.d;
          const auto qb = with_bf16(bf16, static_cast<const T*>(Q.data()), GR, g.d, g.d, q16);
          const auto kb = with_bf16(bf16, kp, L, g.d, ldk, k16);
          const auto vb = with_bf16(bf16, vp, L, g.d, ldk, v16);
          const auto dob = with_bf16(bf16, static_cast<const T*>(dO.data()), GR, g.d, g.d, do16);
          block_gemm(false, true, GR, L, g.d, qb, kb, T(0), P.data(), L);
          if (lse) {
            lse_rows(g, const_cast<T*>(lse), b, kv, t0, rows, lse_blk.data(), false);
            probabilities_from_lse(P.data(), GR, rows, L, t0, lo, first, doc, lse_blk.data());
          } else {
            masked_softmax(P.data(), GR, rows, L, t0, lo, first, doc, static_cast<T*>(nullptr));
          }
          block_gemm(false, true, GR, L, g.d, dob, vb, T(0), dS.data(), L);  // dP
          for (int64_t i = 0; i < GR; ++i) {
            T* prow = P.data() + i * L;
            T* drow = dS.data() + i * L;
            T dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < L; ++c) dot += prow[c] * drow[c];
            for (int64_t c = 0; c < L; ++c) drow[c] = prow[c] * (drow[c] - dot);
          }
          const auto dsb = with_bf16(bf16, static_cast<const T*>(dS.data()), GR, L, L, ds16);
          if (dq.defined()) {
            block_gemm(false, false, GR, g.d, L, dsb, kb, T(0), dQ.data(), g.d);
            unstack_heads(g, static_cast<const T*>(dQ.data()), b, kv, t0, rows, dq.data<T>(), true);
          }
          if (dkg) block_gemm(true, false, L, g.d, GR, dsb, qb, T(1), dkg + lo * ldk, ldk);
          if (dvg) {
            const auto pb = with_bf16(bf16, static_cast<const T*>(P.data()), GR, L, L, p16);
            block_gemm(true, false, L, g.d, GR, pb, dob, T(1), dvg + lo * ldk, ldk);
          }
        }
      }
  });
  attention_scores_ += scores.load();
}

}  // namespace tl
