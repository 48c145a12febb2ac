// The routed experts of a MoE layer on the GPU (Ops::moe_experts_forward / _backward), the
// routing never read back by the host. cuBLAS needs each product's shape on the host, and an
// expert's row count is only known on the device, so the rows are cut into tiles of kTile:
//   1. route (one thread; n·K ≤ a few ten thousand slots): count each expert's slots, give
//      each expert ceil(count/kTile) tiles, and place every slot s = t·K + k at a row of its
//      expert's tiles (slot order within an expert, as the CPU keeps token order). The tile
//      count is bounded on the host without reading anything: T = ceil(n·K/kTile) + E; tiles
//      an expert does not need are empty (their rows hold zeros and are never read back).
//   2. every product is one batched GEMM over the T tiles (cublasGemmBatchedEx, uniform
//      [kTile × N × Kd] shapes, per-tile pointers made on the device): tile t multiplies its
//      rows by expert e(t)'s weights (dense, or all E experts dequantized from NF4 first).
//   3. per-token kernels combine the K outputs in k order: deterministic, no atomics.
// Empty tiles and the unused rows of a part-filled tile cost up to E·kTile rows of work: at
// most 8,192 rows beside the 16,384 a 26B-A4B step of 2,048 tokens routes (half that on
// average). A grouped GEMM that reads its shapes from the device would spend none; no NVIDIA
// library here offers one without CUTLASS.
#include <climits>

#include "core/nf4.h"
#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

constexpr int64_t kTile = 64;

int64_t tile_bound(int64_t slots, int64_t experts) { return (slots + kTile - 1) / kTile + experts; }

// The routing state in one I32 buffer: slot → row (in tile space) [S], row → token (−1 for
// padding) [T·kTile], tile → expert [T], per-expert scratch (counts, first tile, cursor) [3E].
struct RouteView {
  int32_t *slot_row, *row_token, *tile_expert, *scratch;
};
RouteView view(int32_t* base, int64_t slots, int64_t tiles) {
  return {base, base + slots, base + slots + tiles * kTile, base + slots + tiles * kTile + tiles};
}
int64_t route_ints(int64_t slots, int64_t tiles, int64_t experts) { return slots + tiles * kTile + tiles + 3 * experts; }

__global__ void route_kernel(const int32_t* idx, int64_t slots, int64_t k, int64_t experts, int64_t tiles,
                             RouteView r) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int32_t *count = r.scratch, *first = r.scratch + experts, *cursor = r.scratch + 2 * experts;
  for (int64_t e = 0; e < experts; ++e) count[e] = 0, cursor[e] = 0;
  for (int64_t s = 0; s < slots; ++s) ++count[idx[s]];
  int32_t t = 0;
  for (int64_t e = 0; e < experts; ++e) {
    first[e] = t;
    for (int32_t j = 0; j < (count[e] + kTile - 1) / kTile; ++j) r.tile_expert[t++] = int32_t(e);
  }
  for (; t < tiles; ++t) r.tile_expert[t] = 0;  // empty tiles: any expert, rows all padding
  for (int64_t row = 0; row < tiles * kTile; ++row) r.row_token[row] = -1;
  for (int64_t s = 0; s < slots; ++s) {
    const int32_t e = idx[s], j = cursor[e]++;
    const int32_t row = (first[e] + j / int32_t(kTile)) * int32_t(kTile) + j % int32_t(kTile);
    r.slot_row[s] = row;
    r.row_token[row] = int32_t(s / k);
  }
}

// x_rows[row] = y[row_token[row]], zeros for padding rows.
template <class T>
__global__ void gather_tiles_kernel(const T* y, const int32_t* row_token, T* x, int64_t rows, int64_t h) {
  TL_GRID_STRIDE(i, rows * h) {
    const int32_t t = row_token[i / h];
    x[i] = t < 0 ? cuda::narrow<T>(0.0) : y[int64_t(t) * h + i % h];
  }
}

// Per tile: A = the expert's weight matrix, B = the tile's rows of `in`, C = its rows of `out`.
__global__ void pointers_kernel(const int32_t* tile_expert, int64_t tiles, const char* w, int64_t w_bytes,
                                const char* in, int64_t in_bytes, char* out, int64_t out_bytes, const void** a,
                                const void** b, void** c) {
  TL_GRID_STRIDE(t, tiles) {
    a[t] = w + int64_t(tile_expert[t]) * w_bytes;
    b[t] = in + t * in_bytes;
    c[t] = out + t * out_bytes;
  }
}

// out[t] += Σ_k weights[t,k]·o[slot_row[t·K+k]], k in order (fp32 or wider sums).
template <class T>
__global__ void combine_kernel(const T* o, const int32_t* slot_row, const T* weights, T* out, int64_t n, int64_t k,
                               int64_t h) {
  using A = cuda::acc_t<T>;
  TL_GRID_STRIDE(i, n * h) {
    const int64_t t = i / h, j = i % h;
    A acc = cuda::widen(out[i]);
    for (int64_t c = 0; c < k; ++c) {
      const int64_t s = t * k + c;
      acc += cuda::widen(weights[s]) * cuda::widen(o[int64_t(slot_row[s]) * h + j]);
    }
    out[i] = cuda::narrow<T>(acc);
  }
}

// dweights[s] = ⟨o[slot_row[s]], dout[s / K]⟩, one block per slot.
template <class T>
__global__ void route_grad_kernel(const T* o, const int32_t* slot_row, const T* dout, T* dweights, int64_t k,
                                  int64_t h) {
  const int64_t s = blockIdx.x;
  const T* orow = o + int64_t(slot_row[s]) * h;
  const T* drow = dout + (s / k) * h;
  double acc = 0;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) acc += double(cuda::widen(orow[j])) * double(cuda::widen(drow[j]));
  acc = cuda::block_reduce(acc, cuda::Sum{});
  if (threadIdx.x == 0) dweights[s] = cuda::narrow<T>(acc);
}

// d_o[slot_row[s]] = weights[s]·dout[s / K] (rows of no slot stay as filled: zero).
template <class T>
__global__ void spread_grad_kernel(const T* dout, const int32_t* slot_row, const T* weights, T* d_o, int64_t slots,
                                   int64_t k, int64_t h) {
  TL_GRID_STRIDE(i, slots * h) {
    const int64_t s = i / h, j = i % h;
    d_o[int64_t(slot_row[s]) * h + j] =
        cuda::narrow<T>(cuda::widen(weights[s]) * cuda::widen(dout[(s / k) * h + j]));
  }
}

// dy[t] += Σ_k dx[slot_row[t·K+k]], k in order.
template <class T>
__global__ void gather_grad_kernel(const T* dx, const int32_t* slot_row, T* dy, int64_t n, int64_t k, int64_t h) {
  using A = cuda::acc_t<T>;
  TL_GRID_STRIDE(i, n * h) {
    const int64_t t = i / h, j = i % h;
    A acc = cuda::widen(dy[i]);
    for (int64_t c = 0; c < k; ++c) acc += cuda::widen(dx[int64_t(slot_row[t * k + c]) * h + j]);
    dy[i] = cuda::narrow<T>(acc);
  }
}

struct BatchedTypes {
  cudaDataType_t data;
  cublasComputeType_t compute;
};
BatchedTypes batched_types(DType act) {
  if (act == DType::F64) return {CUDA_R_64F, CUBLAS_COMPUTE_64F};
  if (act == DType::BF16) return {CUDA_R_16BF, CUBLAS_COMPUTE_32F};
  return {CUDA_R_32F, CUBLAS_COMPUTE_32F};
}

void check(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& x, DType act) {
  cuda::require(y.rank() == 2 && idx.rank() == 2 && idx.dim(0) == y.dim(0) && weights.numel() == idx.numel(),
                "moe shapes: y [n, H], idx and weights [n, K]");
  cuda::require(idx.dtype() == DType::I32 && y.dtype() == act && weights.dtype() == act, "moe dtypes");
  cuda::require(x.num_experts > 0 && x.intermediate > 0 && (x.gate_up_nf4 || x.gate_up) && (x.down_nf4 || x.down),
                "moe experts");
  cuda::require_device(y, "moe y");
  cuda::require_device(idx, "moe idx");
  cuda::require_device(weights, "moe weights");
  cuda::require(idx.numel() + tile_bound(idx.numel(), x.num_experts) * kTile < INT_MAX, "moe: too many slots");
}

}  // namespace

// All E experts' matrices of one kind ([E, out, in] in the activation dtype): the dense
// tensor itself, or each NF4 expert dequantized into scratch `slot`.
const void* CudaOps::expert_weights(const MoeExperts& x, bool gate_up, int slot) {
  const std::vector<Nf4Tensor>* q = gate_up ? x.gate_up_nf4 : x.down_nf4;
  if (!q) {
    const Tensor& w = gate_up ? *x.gate_up : *x.down;
    cuda::require(w.dtype() == act_, "moe: dense experts must have the activation dtype");
    cuda::require_device(w, "moe experts");
    return w.raw();
  }
  const int64_t each = (*q)[0].numel();
  const size_t es = dtype_size(act_);
  char* all = static_cast<char*>(scratch(slot, size_t(x.num_experts * each) * es));
  for (int64_t e = 0; e < x.num_experts; ++e) nf4_dequantize_into((*q)[size_t(e)], all + e * each * es);
  return all;
}

// out_t[kTile, n_out] (+)= in_t[kTile, k_in] · op(W_e): transposed W (`w_t`) for the forward
// (W [n_out, k_in]), plain for the input gradient (W [k_in, n_out]), over all tiles.
void CudaOps::tile_products(const void* w, bool w_t, int64_t n_out, int64_t k_in, const void* in, void* out,
                            const int32_t* tile_expert, int64_t tiles) {
  const size_t es = dtype_size(act_);
  void** ptrs = static_cast<void**>(scratch(10, size_t(3 * tiles) * sizeof(void*)));
  pointers_kernel<<<cuda::blocks_for(tiles), cuda::kThreads>>>(
      tile_expert, tiles, static_cast<const char*>(w), n_out * k_in * int64_t(es), static_cast<const char*>(in),
      kTile * k_in * int64_t(es), static_cast<char*>(out), kTile * n_out * int64_t(es),
      const_cast<const void**>(ptrs), const_cast<const void**>(ptrs + tiles), ptrs + 2 * tiles);
  TL_CUDA_LAUNCHED("pointers_kernel");
  const BatchedTypes ty = batched_types(act_);
  const double one64 = 1, zero64 = 0;
  const float one32 = 1, zero32 = 0;
  const void* alpha = act_ == DType::F64 ? static_cast<const void*>(&one64) : static_cast<const void*>(&one32);
  const void* beta = act_ == DType::F64 ? static_cast<const void*>(&zero64) : static_cast<const void*>(&zero32);
  // Column-major, as linear.cu: outᵀ[n_out, kTile] = op(W's buffer)·inᵀ[k_in, kTile].
  TL_CUDA_CHECK(cublasGemmBatchedEx(blas(), w_t ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, int(n_out), int(kTile),
                                    int(k_in), alpha, const_cast<const void**>(ptrs), ty.data,
                                    int(w_t ? k_in : n_out), const_cast<const void**>(ptrs + tiles), ty.data,
                                    int(k_in), beta, ptrs + 2 * tiles, ty.data, int(n_out), int(tiles), ty.compute,
                                    CUBLAS_GEMM_DEFAULT));
}

void CudaOps::moe_experts_forward(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& x,
                                  Tensor& out, MoeTape& tape) {
  check(y, idx, weights, x, act_);
  cuda::require_device(out, "moe out");
  const int64_t n = y.dim(0), H = y.dim(1), I = x.intermediate, K = idx.dim(1), S = idx.numel(),
                E = x.num_experts, T = tile_bound(S, E), R = T * kTile;
  if (n == 0) return;
  tape.aux = zeros({route_ints(S, T, E)}, DType::I32);
  const RouteView r = view(tape.aux.data<int32_t>(), S, T);
  route_kernel<<<1, 1>>>(idx.data<int32_t>(), S, K, E, T, r);
  TL_CUDA_LAUNCHED("route_kernel");
  Tensor rows = empty({R, H}), gu = empty({R, 2 * I});
  tape.gate = empty({R, I});
  tape.up = empty({R, I});
  tape.h = empty({R, I});
  tape.out = empty({R, H});
  cuda::dispatch(act_, [&]<class T2>() {
    gather_tiles_kernel<T2><<<cuda::blocks_for(R * H), cuda::kThreads>>>(y.data<T2>(), r.row_token,
                                                                          rows.data<T2>(), R, H);
    TL_CUDA_LAUNCHED("gather_tiles_kernel");
  });
  tile_products(expert_weights(x, true, 8), true, 2 * I, H, rows.raw(), gu.raw(), r.tile_expert, T);
  copy_columns(gu, 0, tape.gate, 0, I);  // rows [0, I) of gate_up_proj are the gate
  copy_columns(gu, I, tape.up, 0, I);
  gelu_tanh_mul_forward(tape.gate, tape.up, tape.h);
  tile_products(expert_weights(x, false, 9), true, H, I, tape.h.raw(), tape.out.raw(), r.tile_expert, T);
  cuda::dispatch(act_, [&]<class T2>() {
    combine_kernel<T2><<<cuda::blocks_for(n * H), cuda::kThreads>>>(tape.out.data<T2>(), r.slot_row,
                                                                     weights.data<T2>(), out.data<T2>(), n, K, H);
    TL_CUDA_LAUNCHED("combine_kernel");
  });
}

void CudaOps::moe_experts_backward(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& x,
                                   const MoeTape& tape, const Tensor& dout, Tensor& dy, Tensor& dweights) {
  check(y, idx, weights, x, act_);
  cuda::require_device(dout, "moe dout");
  cuda::require_device(dy, "moe dy");
  cuda::require_device(dweights, "moe dweights");
  const int64_t n = y.dim(0), H = y.dim(1), I = x.intermediate, K = idx.dim(1), S = idx.numel(),
                E = x.num_experts, T = tile_bound(S, E), R = T * kTile;
  if (n == 0) return;
  cuda::require(tape.aux.numel() == route_ints(S, T, E) && tape.out.numel() == R * H, "moe tape");
  const RouteView r = view(const_cast<int32_t*>(tape.aux.data<int32_t>()), S, T);
  Tensor d_o = zeros({R, H}), dh = empty({R, I}), dgate = zeros({R, I}), dup = zeros({R, I}), dgu = empty({R, 2 * I}),
         dx = empty({R, H});
  cuda::dispatch(act_, [&]<class T2>() {
    route_grad_kernel<T2><<<unsigned(S), cuda::kThreads>>>(tape.out.data<T2>(), r.slot_row, dout.data<T2>(),
                                                           dweights.data<T2>(), K, H);
    TL_CUDA_LAUNCHED("route_grad_kernel");
    spread_grad_kernel<T2><<<cuda::blocks_for(S * H), cuda::kThreads>>>(dout.data<T2>(), r.slot_row,
                                                                         weights.data<T2>(), d_o.data<T2>(), S, K, H);
    TL_CUDA_LAUNCHED("spread_grad_kernel");
  });
  tile_products(expert_weights(x, false, 9), false, I, H, d_o.raw(), dh.raw(), r.tile_expert, T);
  gelu_tanh_mul_backward(tape.gate, tape.up, dh, dgate, dup);
  copy_columns(dgate, 0, dgu, 0, I);
  copy_columns(dup, 0, dgu, I, I);
  tile_products(expert_weights(x, true, 8), false, H, 2 * I, dgu.raw(), dx.raw(), r.tile_expert, T);
  cuda::dispatch(act_, [&]<class T2>() {
    gather_grad_kernel<T2><<<cuda::blocks_for(n * H), cuda::kThreads>>>(dx.data<T2>(), r.slot_row, dy.data<T2>(),
                                                                         n, K, H);
    TL_CUDA_LAUNCHED("gather_grad_kernel");
  });
}

}  // namespace tl
