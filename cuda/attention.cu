// Blocked GEMM attention, the CPU backend's algorithm (core/cpu/cpu_attention.cpp): per
// (batch, KV head, block of 128 queries), the group's query heads packed into one
// operand [G·rows, d] (GQA: they share K and V), over the keys [lo, t1) the masks leave
// (lo: the window, and the first position of the block's documents when their ids are known
// on the host; keys after the block's last query are masked by causality):
//     Sc = Q_g·K[lo..]ᵀ                    (cuBLASLt, scale 1.0)
//     P  = masked softmax of each row; its log-sum-exp kept (AttentionMask::lse)
//     O_g = P·V[lo..], unpacked into out
//   backward, P = exp(Sc − lse) from the saved log-sum-exp (else recomputed as above):
//     dP = dO_g·Vᵀ;  dS = P∘(dP − rowsum(P∘dP));
//     dQ_g = dS·K (added into dq);  dK += dSᵀ·Q_g;  dV += Pᵀ·dO_g.
// allowed(t, s) = s ≤ t, s > t − window (with a window), doc[b,s] = doc[b,t] (packed docs).
// K = V (the 31B's attention_k_eq_v) is the caller passing the same tensor twice.
// BF16 activations: Sc and dP are fp32 GEMM outputs of bf16 operands; the softmax and dS run
// in fp32 on them; P and dS are then rounded to bf16 copies (flash attention's numerics) for
// the products with V, K and Q. O is a bf16 output rounded once; dQ_g is an fp32 product
// added into dq and rounded once; dK and dV, which gather the blocks and the GQA group's
// heads, are summed in fp32 copies and rounded once.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/attention_blocks.h"
#include "cuda/cuda_util.cuh"
#include "cuda/gemm_lt.h"

namespace tl {

namespace {

constexpr int kRowThreads = 256;
// Queries per block: the causal triangle then costs 0.53·S² scores at S = 2048.

struct Geometry {
  int64_t B, S, nh, d, nkv, group;
};

Geometry check(const Tensor& q, const Tensor& k, const Tensor& v) {
  cuda::require(q.rank() == 4 && k.rank() == 4 && v.rank() == 4, "attention expects [B,S,heads,d]");
  Geometry g{q.dim(0), q.dim(1), q.dim(2), q.dim(3), k.dim(2), 0};
  cuda::require(k.dim(0) == g.B && k.dim(1) == g.S && k.dim(3) == g.d && v.numel() == k.numel(),
                "attention k/v shape");
  cuda::require(g.nkv > 0 && g.nh % g.nkv == 0, "attention heads");
  cuda::require(k.dtype() == q.dtype() && v.dtype() == q.dtype(), "attention dtypes");
  cuda::require_device(q, "attention q");
  cuda::require_device(k, "attention k");
  cuda::require_device(v, "attention v");
  g.group = g.nh / g.nkv;
  return g;
}

// Per batch row and query t: the first key t may see that the host can tell, max(window
// start, first position of t's document) — the documents only when their ids are on the
// host (mask.doc_ids_host, or doc_ids themselves there). The kernels apply the whole mask.
std::vector<std::vector<int64_t>> first_visible(const Geometry& g, const AttentionMask& mask) {
  const Tensor* docs = mask.doc_ids_host ? mask.doc_ids_host
                       : (mask.doc_ids && mask.doc_ids->device() == Device::CPU) ? mask.doc_ids
                                                                                  : nullptr;
  // The host copy bounds the keys only of the documents the kernels mask: the same ids.
  cuda::require(!mask.doc_ids_host || (mask.doc_ids && mask.doc_ids_host->dtype() == DType::I32 &&
                                       mask.doc_ids_host->numel() == g.B * g.S),
                "attention doc_ids_host: I32 [B, S], given with doc_ids");
  std::vector<std::vector<int64_t>> first(static_cast<size_t>(g.B));
  for (int64_t b = 0; b < g.B; ++b)
    first[size_t(b)] = first_visible_keys(g.S, mask.window, docs ? docs->data<int32_t>() + b * g.S : nullptr);
  return first;
}

template <class T>
__device__ bool allowed(int64_t t, int64_t s, int64_t window, const int32_t* doc) {
  return s <= t && (window <= 0 || s > t - window) && (!doc || doc[s] == doc[t]);
}

// The group's rows of a [B, S, nh, d] tensor for queries [t0, t0 + rows) of batch b, packed
// head-major into [G·rows, d] (pack), or added/copied back (unpack; src fp32 or T).
template <class T>
__global__ void pack_kernel(const T* src, T* dst, int64_t S, int64_t nh, int64_t d, int64_t b, int64_t head0,
                            int64_t t0, int64_t rows, int64_t G) {
  TL_GRID_STRIDE(i, G * rows * d) {
    const int64_t c = i % d, r = (i / d) % rows, j = i / (d * rows);
    dst[i] = src[((b * S + t0 + r) * nh + head0 + j) * d + c];
  }
}
template <class T, class S>
__global__ void unpack_kernel(const S* src, T* dst, int64_t Sq, int64_t nh, int64_t d, int64_t b, int64_t head0,
                              int64_t t0, int64_t rows, int64_t G, bool add) {
  TL_GRID_STRIDE(i, G * rows * d) {
    const int64_t c = i % d, r = (i / d) % rows, j = i / (d * rows);
    T& o = dst[((b * Sq + t0 + r) * nh + head0 + j) * d + c];
    const auto v = cuda::widen(src[i]);
    o = cuda::narrow<T>(add ? cuda::widen(o) + v : v);
  }
}

// Row i of a [G·rows, L] block is head head0 + i / rows at query t = t0 + i % rows over keys
// s = s0 + j. Masked entries get probability 0; a row always sees itself, so Z ≥ 1 after
// subtracting the max. lse[(b·nh + head)·S + t] = max + log Z when given.
template <class T>
__global__ void masked_softmax_kernel(T* P, cuda::bf16* P16, int64_t L, int64_t rows, int64_t t0, int64_t s0,
                                      int64_t window, const int32_t* doc, T* lse, int64_t lse_base, int64_t S) {
  const int64_t i = blockIdx.x, t = t0 + i % rows;
  T* row = P + i * L;
  T mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x)
    if (allowed<T>(t, s0 + j, window, doc)) mx = max(mx, row[j]);
  mx = cuda::block_reduce(mx, cuda::Max{});
  T z = 0;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const T e = allowed<T>(t, s0 + j, window, doc) ? exp(row[j] - mx) : T(0);
    row[j] = e;
    z += e;
  }
  z = cuda::block_reduce(z, cuda::Sum{});
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    row[j] /= z;
    if (P16) P16[i * L + j] = cuda::narrow<cuda::bf16>(row[j]);
  }
  if (lse && threadIdx.x == 0) lse[lse_base + (i / rows) * S + t] = mx + log(z);
}

// P = exp(Sc − lse) on the allowed keys, 0 elsewhere (the forward's probabilities again).
template <class T>
__global__ void probabilities_kernel(T* P, cuda::bf16* P16, int64_t L, int64_t rows, int64_t t0, int64_t s0,
                                     int64_t window, const int32_t* doc, const T* lse, int64_t lse_base, int64_t S) {
  const int64_t i = blockIdx.x, t = t0 + i % rows;
  const T l = lse[lse_base + (i / rows) * S + t];
  T* row = P + i * L;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    row[j] = allowed<T>(t, s0 + j, window, doc) ? exp(row[j] - l) : T(0);
    if (P16) P16[i * L + j] = cuda::narrow<cuda::bf16>(row[j]);
  }
}

// dS = P∘(dP − Σ_j P∘dP) per row, in place on dP, or (bf16 activations) rounded into dS16.
template <class T>
__global__ void softmax_backward_kernel(const T* P, T* dP, cuda::bf16* dS16, int64_t L) {
  const int64_t r = blockIdx.x;
  const T* p = P + r * L;
  T* dp = dP + r * L;
  T dot = 0;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) dot += p[j] * dp[j];
  dot = cuda::block_reduce(dot, cuda::Sum{});
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const T ds = p[j] * (dp[j] - dot);
    if (dS16) dS16[r * L + j] = cuda::narrow<cuda::bf16>(ds);
    else dp[j] = ds;
  }
}

// The GEMM types of one attention: scores (Sc, dP) and outputs (O, dK, dV). F32 / F64:
// everything in that type; BF16: bf16 operands, fp32 scores, bf16 outputs.
struct AttentionTypes {
  cuda::LtType scores, outputs;
  DType score_dtype;  // of the Sc / dP blocks, the softmax kernels and the log-sum-exp
};
// Runs f.template operator()<T>() for the score dtype (float or double; never bf16).
template <class F>
void dispatch_scores(DType t, F&& f) {
  if (t == DType::F64) f.template operator()<double>();
  else f.template operator()<float>();
}

AttentionTypes attention_types(DType act) {
  if (act == DType::BF16) return {cuda::LtType::Bf16F32, cuda::LtType::Bf16Bf16, DType::F32};
  if (act == DType::F64) return {cuda::LtType::F64, cuda::LtType::F64, DType::F64};
  return {cuda::LtType::F32, cuda::LtType::F32, DType::F32};
}

void require_like(const Tensor& grad, const Tensor& x, const char* what) {
  if (!grad.defined()) return;
  cuda::require(grad.numel() == x.numel() && grad.dtype() == x.dtype(), what);
  cuda::require_device(grad, what);
}

void* lse_of(const AttentionMask& mask, const Geometry& g, DType score) {
  if (!mask.lse || !mask.lse->defined()) return nullptr;
  cuda::require(mask.lse->numel() == g.B * g.nh * g.S && mask.lse->dtype() == score,
                "attention lse must be [B, nh, S], F32 (F64 with F64 activations)");
  cuda::require_device(*mask.lse, "attention lse");
  return mask.lse->raw();
}

cuda::DeviceInts device_docs(const AttentionMask& mask, const Geometry& g) {
  if (!mask.doc_ids) return {};
  cuda::require(mask.doc_ids->numel() == g.B * g.S, "attention doc_ids must be [B, S]");
  return cuda::device_ints(*mask.doc_ids, "attention doc_ids must be I32");
}


// Block blk of the loops below: queries [t0, t1) of KV head kv's G heads (GR packed rows,
// heads head0 … head0 + G − 1) against keys [s0, t1), s0 the earliest key any of them sees.
struct QueryBlock {
  int64_t t0, rows, t1, GR, head0, s0, L;
};
QueryBlock query_block(const Geometry& g, const std::vector<int64_t>& first, int64_t kv, int64_t blk) {
  QueryBlock q;
  q.t0 = blk * kAttentionBlockRows;
  q.rows = std::min(kAttentionBlockRows, g.S - q.t0);
  q.t1 = q.t0 + q.rows;
  q.GR = g.group * q.rows;
  q.head0 = kv * g.group;
  q.s0 = block_first_key(first, q.t0, q.t1);
  q.L = q.t1 - q.s0;
  return q;
}

}  // namespace

// Every product is column-major on row-major buffers (see linear.cu): a row-major [rows, n]
// operand with leading dimension ld read column-major is its transpose.
void CudaOps::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                                Tensor& out) {
  const Geometry g = check(q, k, v);
  cuda::require(out.numel() == q.numel() && out.dtype() == q.dtype(), "attention out");
  cuda::require_device(out, "attention out");
  if (q.numel() == 0) return;
  const AttentionTypes ty = attention_types(q.dtype());
  void* lse = lse_of(mask, g, ty.score_dtype);
  const cuda::DeviceInts doc = device_docs(mask, g);
  const auto first = first_visible(g, mask);
  const int64_t GRmax = g.group * std::min(kAttentionBlockRows, g.S), es = int64_t(dtype_size(q.dtype()));
  const int64_t ldk = g.nkv * g.d;
  const bool bf16 = q.dtype() == DType::BF16;
  void* P = scratch(4, size_t(GRmax * g.S) * dtype_size(ty.score_dtype));
  cuda::bf16* P16 = bf16 ? static_cast<cuda::bf16*>(scratch(6, size_t(GRmax * g.S) * 2)) : nullptr;
  const void* Pv = bf16 ? static_cast<const void*>(P16) : P;  // the probabilities that multiply V
  void* Qg = scratch(11, size_t(GRmax * g.d) * size_t(es));
  void* Og = scratch(12, size_t(GRmax * g.d) * size_t(es));
  const char* kb = static_cast<const char*>(k.raw());
  const char* vb = static_cast<const char*>(v.raw());
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t kv = 0; kv < g.nkv; ++kv)
      for (int64_t blk = 0; blk < attention_blocks(g.S); ++blk) {
        const QueryBlock qb = query_block(g, first[size_t(b)], kv, blk);
        const int64_t t0 = qb.t0, rows = qb.rows, GR = qb.GR, head0 = qb.head0, s0 = qb.s0, L = qb.L;
        attention_scores_ += GR * L;
        const int32_t* docb = doc.ptr ? doc.ptr + b * g.S : nullptr;
        const char* kg = kb + ((b * g.S + s0) * g.nkv + kv) * g.d * es;
        const char* vg = vb + ((b * g.S + s0) * g.nkv + kv) * g.d * es;
        cuda::dispatch(q.dtype(), [&]<class T>() {
          pack_kernel<T><<<cuda::blocks_for(GR * g.d), cuda::kThreads>>>(q.data<T>(), static_cast<T*>(Qg), g.S, g.nh,
                                                                         g.d, b, head0, t0, rows, g.group);
          TL_CUDA_LAUNCHED("pack_kernel");
        });
        lt().run(ty.scores, true, false, L, GR, g.d, kg, ldk, Qg, g.d, 0.0, P, L, nullptr);  // Scᵀ = K·Q_gᵀ
        dispatch_scores(ty.score_dtype, [&]<class T>() {
          masked_softmax_kernel<T><<<unsigned(GR), kRowThreads>>>(static_cast<T*>(P), P16, L, rows, t0, s0,
                                                                  mask.window, docb, static_cast<T*>(lse),
                                                                  (b * g.nh + head0) * g.S, g.S);
          TL_CUDA_LAUNCHED("masked_softmax_kernel");
        });
        lt().run(ty.outputs, false, false, g.d, GR, L, vg, ldk, Pv, L, 0.0, Og, g.d, nullptr);  // O_gᵀ = Vᵀ·Pᵀ
        cuda::dispatch(q.dtype(), [&]<class T>() {
          unpack_kernel<T, T><<<cuda::blocks_for(GR * g.d), cuda::kThreads>>>(
              static_cast<const T*>(Og), out.data<T>(), g.S, g.nh, g.d, b, head0, t0, rows, g.group, false);
          TL_CUDA_LAUNCHED("unpack_kernel");
        });
      }
}

void CudaOps::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                                 const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Geometry g = check(q, k, v);
  cuda::require(dout.numel() == q.numel() && dout.dtype() == q.dtype(), "attention_backward dout");
  cuda::require_device(dout, "attention_backward dout");
  require_like(dq, q, "attention_backward dq");
  require_like(dk, k, "attention_backward dk");
  require_like(dv, v, "attention_backward dv");
  if (q.numel() == 0 || (!dq.defined() && !dk.defined() && !dv.defined())) return;
  const AttentionTypes ty = attention_types(q.dtype());
  const void* lse = lse_of(mask, g, ty.score_dtype);
  const cuda::DeviceInts doc = device_docs(mask, g);
  const auto first = first_visible(g, mask);
  const int64_t GRmax = g.group * std::min(kAttentionBlockRows, g.S), es = int64_t(dtype_size(q.dtype()));
  const int64_t ldk = g.nkv * g.d;
  const bool bf16 = q.dtype() == DType::BF16;
  const size_t block = size_t(GRmax * g.S), ss = dtype_size(ty.score_dtype);
  void* P = scratch(4, block * ss);
  void* dP = scratch(5, block * ss);
  cuda::bf16* P16 = bf16 ? static_cast<cuda::bf16*>(scratch(6, block * 2)) : nullptr;
  cuda::bf16* dS16 = bf16 ? static_cast<cuda::bf16*>(scratch(7, block * 2)) : nullptr;
  void* Qg = scratch(11, size_t(GRmax * g.d) * size_t(es));
  void* dOg = scratch(12, size_t(GRmax * g.d) * size_t(es));
  void* dQg = scratch(13, size_t(GRmax * g.d) * ss);  // fp32 (fp64) before its one rounding into dq
  // The operands of the output products: P (for dV) and dS (for dQ, dK).
  const void* Pv = bf16 ? static_cast<const void*>(P16) : P;
  const void* dS = bf16 ? static_cast<const void*>(dS16) : dP;
  // dK, dV: in place (F32, F64), or fp32 copies of the bf16 tensors (added back at the end).
  std::shared_ptr<void> dk32, dv32;
  auto widen_copy = [&](const Tensor& grad, std::shared_ptr<void>& copy) {
    if (!bf16 || !grad.defined()) return;
    copy = cuda::device_alloc(size_t(grad.numel()) * 4);
    cuda::from_bf16(grad.data<uint16_t>(), static_cast<float*>(copy.get()), grad.numel());
  };
  widen_copy(dk, dk32);
  widen_copy(dv, dv32);
  const cuda::LtType kv_out = bf16 ? cuda::LtType::Bf16F32 : ty.outputs;
  auto kv_at = [&](const Tensor& t, int64_t b, int64_t s, int64_t kv) {
    return static_cast<const char*>(t.raw()) + ((b * g.S + s) * g.nkv + kv) * g.d * es;
  };
  auto kv_grad = [&](const Tensor& t, const std::shared_ptr<void>& copy, int64_t b, int64_t s, int64_t kv) -> void* {
    if (!copy) return static_cast<char*>(t.raw()) + ((b * g.S + s) * g.nkv + kv) * g.d * es;
    return static_cast<char*>(copy.get()) + ((b * g.S + s) * g.nkv + kv) * g.d * 4;
  };
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t kv = 0; kv < g.nkv; ++kv)
      for (int64_t blk = 0; blk < attention_blocks(g.S); ++blk) {
        const QueryBlock qb = query_block(g, first[size_t(b)], kv, blk);
        const int64_t t0 = qb.t0, rows = qb.rows, GR = qb.GR, head0 = qb.head0, s0 = qb.s0, L = qb.L;
        attention_scores_ += GR * L;
        const int32_t* docb = doc.ptr ? doc.ptr + b * g.S : nullptr;
        const int64_t lse_base = (b * g.nh + head0) * g.S;
        const char* kg = kv_at(k, b, s0, kv);
        const char* vg = kv_at(v, b, s0, kv);
        cuda::dispatch(q.dtype(), [&]<class T>() {
          pack_kernel<T><<<cuda::blocks_for(GR * g.d), cuda::kThreads>>>(q.data<T>(), static_cast<T*>(Qg), g.S, g.nh,
                                                                         g.d, b, head0, t0, rows, g.group);
          TL_CUDA_LAUNCHED("pack_kernel");
          pack_kernel<T><<<cuda::blocks_for(GR * g.d), cuda::kThreads>>>(
              dout.data<T>(), static_cast<T*>(dOg), g.S, g.nh, g.d, b, head0, t0, rows, g.group);
          TL_CUDA_LAUNCHED("pack_kernel");
        });
        lt().run(ty.scores, true, false, L, GR, g.d, kg, ldk, Qg, g.d, 0.0, P, L, nullptr);  // Scᵀ = K·Q_gᵀ
        dispatch_scores(ty.score_dtype, [&]<class T>() {
          if (lse)
            probabilities_kernel<T><<<unsigned(GR), kRowThreads>>>(static_cast<T*>(P), P16, L, rows, t0, s0,
                                                                   mask.window, docb, static_cast<const T*>(lse),
                                                                   lse_base, g.S);
          else
            masked_softmax_kernel<T><<<unsigned(GR), kRowThreads>>>(static_cast<T*>(P), P16, L, rows, t0, s0,
                                                                    mask.window, docb, nullptr, 0, g.S);
          TL_CUDA_LAUNCHED("attention probabilities");
        });
        if (dv.defined())  // dV_gᵀ[d, L] += dO_gᵀ·P
          lt().run(kv_out, false, true, g.d, L, GR, dOg, g.d, Pv, L, 1.0, kv_grad(dv, dv32, b, s0, kv), ldk, nullptr);
        if (!dq.defined() && !dk.defined()) continue;
        lt().run(ty.scores, true, false, L, GR, g.d, vg, ldk, dOg, g.d, 0.0, dP, L, nullptr);  // dPᵀ = V·dO_gᵀ
        dispatch_scores(ty.score_dtype, [&]<class T>() {
          softmax_backward_kernel<T><<<unsigned(GR), kRowThreads>>>(static_cast<const T*>(P), static_cast<T*>(dP),
                                                                    dS16, L);
          TL_CUDA_LAUNCHED("softmax_backward_kernel");
        });
        if (dq.defined()) {  // dQ_gᵀ[d, GR] = Kᵀ·dSᵀ, in the score dtype, then added into dq once
          lt().run(ty.scores, false, false, g.d, GR, L, kg, ldk, dS, L, 0.0, dQg, g.d, nullptr);
          cuda::dispatch(q.dtype(), [&]<class T>() {
            dispatch_scores(ty.score_dtype, [&]<class Sc>() {
              unpack_kernel<T, Sc><<<cuda::blocks_for(GR * g.d), cuda::kThreads>>>(
                  static_cast<const Sc*>(dQg), dq.data<T>(), g.S, g.nh, g.d, b, head0, t0, rows, g.group, true);
              TL_CUDA_LAUNCHED("unpack_kernel");
            });
          });
        }
        if (dk.defined())  // dK_gᵀ[d, L] += Q_gᵀ·dS
          lt().run(kv_out, false, true, g.d, L, GR, Qg, g.d, dS, L, 1.0, kv_grad(dk, dk32, b, s0, kv), ldk, nullptr);
      }
  if (dk32) cuda::to_bf16(static_cast<const float*>(dk32.get()), dk.data<uint16_t>(), dk.numel());
  if (dv32) cuda::to_bf16(static_cast<const float*>(dv32.get()), dv.data<uint16_t>(), dv.numel());
}

}  // namespace tl
