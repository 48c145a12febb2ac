// Chunked GEMM attention: the CPU backend's algorithm (core/cpu/cpu_attention.cpp), one
// block of queries at a time so memory is O(block × S), never O(S²):
//   per (b, h) and query block [t0, t1), with keys [s0, t1), s0 = max(0, t0 − window + 1)
//   (0 without a window; keys after t1 are all masked by causality):
//     Sc = Q_blk·K_gᵀ                      (cuBLASLt, activation dtype, scale 1.0, g = h/group)
//     P  = masked softmax of each row       (kernel; max, exp, Σ and the division in T)
//     O_blk = P·V_g                          (cuBLASLt)
//   backward, P recomputed the same way:
//     dP = dO_blk·V_gᵀ;  dS = P∘(dP − rowsum(P∘dP));
//     dQ_blk += dS·K_g;  dK_g += dSᵀ·Q_blk;  dV_g += Pᵀ·dO_blk.
// allowed(t, s) = s ≤ t, s > t − window (with a window), doc[b,s] = doc[b,t] (packed docs).
// K = V (the 31B's attention_k_eq_v) is the caller passing the same tensor twice. The
// row's log-sum-exp is not kept between the passes: the backward must recompute the scores
// block anyway, and its max and sum cost one more pass over that block.
// BF16 activations: Sc and dP are fp32 GEMM outputs of bf16 operands; the softmax and dS run
// in fp32 on them; P and dS are then rounded to bf16 copies (flash attention's numerics) for
// the products with V, K and Q. O and dQ are bf16 outputs rounded once; dK and dV, which
// gather the blocks and the GQA group's heads, are summed in fp32 copies and rounded once.
#include <cmath>

#include "cuda/cuda_util.cuh"
#include "cuda/gemm_lt.h"

namespace tl {

namespace {

constexpr int kRowThreads = 256;
// Score elements per block (2^24 fp32 = 64 MiB, twice that in the backward with dP).
constexpr int64_t kBlockElems = int64_t(1) << 24;

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

// Queries per block: as many as fit kBlockElems scores of S keys (at least 1).
int64_t block_rows(const Geometry& g) { return std::clamp<int64_t>(kBlockElems / std::max<int64_t>(1, g.S), 1, g.S); }

// Row r of a [rows, L] block is query t = t0 + r over keys s = s0 + j. Masked entries get
// probability 0; a row always sees itself, so Z ≥ 1 after subtracting the max.
template <class T>
__device__ bool allowed(int64_t t, int64_t s, int64_t window, const int32_t* doc) {
  return s <= t && (window <= 0 || s > t - window) && (!doc || doc[s] == doc[t]);
}

// P16 (bf16 activations only) receives P rounded to bf16.
template <class T>
__global__ void masked_softmax_kernel(T* P, cuda::bf16* P16, int64_t L, int64_t t0, int64_t s0, int64_t window,
                                      const int32_t* doc) {
  const int64_t r = blockIdx.x, t = t0 + r;
  T* row = P + r * L;
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
    if (P16) P16[r * L + j] = cuda::narrow<cuda::bf16>(row[j]);
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

// The GEMM types of one attention: scores (Sc, dP) and outputs (O, dQ, dK, dV). F32 / F64:
// everything in that type; BF16: bf16 operands, fp32 scores, bf16 outputs.
struct AttentionTypes {
  cuda::LtType scores, outputs;
  DType score_dtype;  // of the Sc / dP blocks and the softmax kernels
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

}  // namespace

// Each (b, h, block) is a handful of GEMMs on strided views: row-major [rows, d] head slices
// with leading dimension nh·d (Q, O) or nkv·d (K, V) read column-major are their transposes
// (see linear.cu), so Scᵀ[L, rows] = op_T(K_buf)·Q_buf and so on.
void CudaOps::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                                Tensor& out) {
  const Geometry g = check(q, k, v);
  cuda::require(out.numel() == q.numel() && out.dtype() == q.dtype(), "attention out");
  cuda::require_device(out, "attention out");
  if (q.numel() == 0) return;
  cuda::DeviceInts doc;
  if (mask.doc_ids) {
    cuda::require(mask.doc_ids->numel() == g.B * g.S, "attention doc_ids must be [B, S]");
    doc = cuda::device_ints(*mask.doc_ids, "attention doc_ids must be I32");
  }
  const int64_t rows_max = block_rows(g), es = int64_t(dtype_size(q.dtype()));
  const int64_t ldq = g.nh * g.d, ldk = g.nkv * g.d;
  const AttentionTypes ty = attention_types(q.dtype());
  const bool bf16 = q.dtype() == DType::BF16;
  void* P = scratch(4, size_t(rows_max * g.S) * dtype_size(ty.score_dtype));
  cuda::bf16* P16 = bf16 ? static_cast<cuda::bf16*>(scratch(6, size_t(rows_max * g.S) * 2)) : nullptr;
  const void* Pv = bf16 ? static_cast<const void*>(P16) : P;  // the probabilities that multiply V
  const char* qb = static_cast<const char*>(q.raw());
  const char* kb = static_cast<const char*>(k.raw());
  const char* vb = static_cast<const char*>(v.raw());
  char* ob = static_cast<char*>(out.raw());
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < g.nh; ++h) {
      const int64_t kv = h / g.group;
      const int32_t* docb = doc.ptr ? doc.ptr + b * g.S : nullptr;
      for (int64_t t0 = 0; t0 < g.S; t0 += rows_max) {
        const int64_t rows = std::min(rows_max, g.S - t0), t1 = t0 + rows;
        const int64_t s0 = mask.window > 0 ? std::max<int64_t>(0, t0 - mask.window + 1) : 0, L = t1 - s0;
        const char* qh = qb + ((b * g.S + t0) * g.nh + h) * g.d * es;
        const char* kg = kb + ((b * g.S + s0) * g.nkv + kv) * g.d * es;
        const char* vg = vb + ((b * g.S + s0) * g.nkv + kv) * g.d * es;
        char* oh = ob + ((b * g.S + t0) * g.nh + h) * g.d * es;
        lt().run(ty.scores, true, false, L, rows, g.d, kg, ldk, qh, ldq, 0.0, P, L, nullptr);  // Scᵀ = K·Qᵀ
        dispatch_scores(ty.score_dtype, [&]<class T>() {
          masked_softmax_kernel<T><<<unsigned(rows), kRowThreads>>>(static_cast<T*>(P), P16, L, t0, s0,
                                                                    mask.window, docb);
          TL_CUDA_LAUNCHED("masked_softmax_kernel");
        });
        lt().run(ty.outputs, false, false, g.d, rows, L, vg, ldk, Pv, L, 0.0, oh, ldq, nullptr);  // Oᵀ = Vᵀ·Pᵀ
      }
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
  cuda::DeviceInts doc;
  if (mask.doc_ids) {
    cuda::require(mask.doc_ids->numel() == g.B * g.S, "attention doc_ids must be [B, S]");
    doc = cuda::device_ints(*mask.doc_ids, "attention doc_ids must be I32");
  }
  const int64_t rows_max = block_rows(g), es = int64_t(dtype_size(q.dtype()));
  const int64_t ldq = g.nh * g.d, ldk = g.nkv * g.d;
  const AttentionTypes ty = attention_types(q.dtype());
  const bool bf16 = q.dtype() == DType::BF16;
  const size_t block = size_t(rows_max * g.S);
  void* P = scratch(4, block * dtype_size(ty.score_dtype));
  void* dP = scratch(5, block * dtype_size(ty.score_dtype));
  cuda::bf16* P16 = bf16 ? static_cast<cuda::bf16*>(scratch(6, block * 2)) : nullptr;
  cuda::bf16* dS16 = bf16 ? static_cast<cuda::bf16*>(scratch(7, block * 2)) : nullptr;
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
  auto at = [&](const Tensor& t, int64_t b, int64_t s, int64_t heads, int64_t h) {
    return static_cast<char*>(t.raw()) + ((b * g.S + s) * heads + h) * g.d * es;
  };
  auto kv_grad = [&](const Tensor& t, const std::shared_ptr<void>& copy, int64_t b, int64_t s, int64_t kv) -> void* {
    if (!copy) return at(t, b, s, g.nkv, kv);
    return static_cast<char*>(copy.get()) + ((b * g.S + s) * g.nkv + kv) * g.d * 4;
  };
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < g.nh; ++h) {
      const int64_t kv = h / g.group;
      const int32_t* docb = doc.ptr ? doc.ptr + b * g.S : nullptr;
      for (int64_t t0 = 0; t0 < g.S; t0 += rows_max) {
        const int64_t rows = std::min(rows_max, g.S - t0), t1 = t0 + rows;
        const int64_t s0 = mask.window > 0 ? std::max<int64_t>(0, t0 - mask.window + 1) : 0, L = t1 - s0;
        const char* qh = at(q, b, t0, g.nh, h);
        const char* doh = at(dout, b, t0, g.nh, h);
        const char* kg = at(k, b, s0, g.nkv, kv);
        const char* vg = at(v, b, s0, g.nkv, kv);
        lt().run(ty.scores, true, false, L, rows, g.d, kg, ldk, qh, ldq, 0.0, P, L, nullptr);  // Scᵀ = K·Qᵀ
        dispatch_scores(ty.score_dtype, [&]<class T>() {
          masked_softmax_kernel<T><<<unsigned(rows), kRowThreads>>>(static_cast<T*>(P), P16, L, t0, s0,
                                                                    mask.window, docb);
          TL_CUDA_LAUNCHED("masked_softmax_kernel");
        });
        if (dv.defined())
          lt().run(kv_out, false, true, g.d, L, rows, doh, ldq, Pv, L, 1.0, kv_grad(dv, dv32, b, s0, kv), ldk,
                   nullptr);
        if (!dq.defined() && !dk.defined()) continue;
        lt().run(ty.scores, true, false, L, rows, g.d, vg, ldk, doh, ldq, 0.0, dP, L, nullptr);  // dPᵀ = V·dOᵀ
        dispatch_scores(ty.score_dtype, [&]<class T>() {
          softmax_backward_kernel<T><<<unsigned(rows), kRowThreads>>>(static_cast<const T*>(P), static_cast<T*>(dP),
                                                                      dS16, L);
          TL_CUDA_LAUNCHED("softmax_backward_kernel");
        });
        if (dq.defined())
          lt().run(ty.outputs, false, false, g.d, rows, L, kg, ldk, dS, L, 1.0, at(dq, b, t0, g.nh, h), ldq, nullptr);
        if (dk.defined())
          lt().run(kv_out, false, true, g.d, L, rows, qh, ldq, dS, L, 1.0, kv_grad(dk, dk32, b, s0, kv), ldk,
                   nullptr);
      }
    }
  if (dk32) cuda::to_bf16(static_cast<const float*>(dk32.get()), dk.data<uint16_t>(), dk.numel());
  if (dv32) cuda::to_bf16(static_cast<const float*>(dv32.get()), dv.data<uint16_t>(), dv.numel());
}

}  // namespace tl
