// QLoRA's frozen NF4 projections on the CPU: dequantize tiles of W's rows and multiply
// them straight into (or out of) their column block of y, instead of the generic path's
// per-tile temporaries, copies and transposes (core/ops.cpp). A tile holds up to 2^24
// weights (32 MiB in bf16; CpuOps::set_nf4_tile_elements), so every projection of
// E2B-sized models is one tile and one product: 256-row tiles made the backward's
// dx += dy[:, tile]·tile a K = 256 product that read and wrote all of dx once per tile
// (24 times for an MLP's gate). With CpuMatmul::Bf16 the activations are rounded to bf16
// once per call, not once per tile, and each tile is dequantized straight into bf16
// (nf4_dequantize_rows_bf16: the same values as dequantizing to the original dtype and
// rounding, without the fp32 tile).
#include <algorithm>
#include <vector>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/cpu_util.h"
#include "core/cpu/gemm_bf16.h"
#include "core/nf4.h"

namespace tl {

namespace {
// For each tile of up to max(1, max_elements / in) rows of W: dequantize(r0, r1, tile)
// fills `tile` with rows [r0, r1), then use(r0, rows, tile) multiplies with it. `tile`
// only grows.
template <class T, class Dequantize, class Use>
void for_each_tile(const Nf4Tensor& w, int64_t max_elements, std::vector<T>& tile, Dequantize dequantize, Use use) {
  const int64_t out = w.shape[0], in = w.shape[1];
  const int64_t tile_rows = std::min(out, std::max<int64_t>(1, max_elements / std::max<int64_t>(in, 1)));
  const size_t need = size_t(tile_rows * in);
  if (tile.size() < need) tile.resize(need);
  for (int64_t r0 = 0; r0 < out; r0 += tile_rows) {
    const int64_t rows = std::min(out, r0 + tile_rows) - r0;
    dequantize(r0, r0 + rows, tile.data());
    use(r0, rows, tile.data());
  }
}

auto to_bf16(const Nf4Tensor& w) {
  return [&w](int64_t r0, int64_t r1, uint16_t* tile) { nf4_dequantize_rows_bf16(w, r0, r1, tile); };
}
auto to_f32(const Nf4Tensor& w) {
  return [&w](int64_t r0, int64_t r1, float* tile) { nf4_dequantize_rows(w, r0, r1, tile, w.orig_dtype); };
}
}  // namespace

void CpuOps::linear_nf4_forward(const Tensor& x, const Nf4Tensor& w, Tensor& y) {
  if (act_ != DType::F32) return Ops::linear_nf4_forward(x, w, y);
  const int64_t out = w.shape[0], in = w.shape[1], n = x.numel() / in;
  cpu::require(x.numel() == n * in && y.numel() == n * out, "linear_nf4_forward sizes");
  if (n == 0) return;
  // y[:, r0:r0+rows] = x·W[r0:r0+rows]ᵀ, written in place (leading dimension out).
  if (bf16_for(n * out * in)) {
    thread_local std::vector<uint16_t> x16, w16;
    const uint16_t* xb = as_bf16(x.data<float>(), n, in, in, x16);
    for_each_tile(w, nf4_tile_elements_, w16, to_bf16(w), [&](int64_t r0, int64_t rows, const uint16_t* tile) {
      cpu::gemm_bf16_packed(false, true, n, rows, in, xb, tile, 0.0f, y.data<float>() + r0, out);
    });
    return;
  }
  thread_local std::vector<float> w32;
  for_each_tile(w, nf4_tile_elements_, w32, to_f32(w), [&](int64_t r0, int64_t rows, const float* tile) {
    cpu::gemm(false, true, n, rows, in, 1.0f, x.data<float>(), in, tile, in, 0.0f, y.data<float>() + r0, out);
  });
}

void CpuOps::linear_nf4_backward(const Tensor& dy, const Nf4Tensor& w, Tensor& dx) {
  if (act_ != DType::F32) return Ops::linear_nf4_backward(dy, w, dx);
  const int64_t out = w.shape[0], in = w.shape[1], n = dy.numel() / out;
  cpu::require(dy.numel() == n * out && dx.numel() == n * in, "linear_nf4_backward sizes");
  if (n == 0) return;
  // dx += dy[:, r0:r0+rows]·W[r0:r0+rows], reading dy's column block in place (leading
  // dimension out); in bf16, dy is rounded once for all tiles.
  if (bf16_for(n * out * in)) {
    thread_local std::vector<uint16_t> dy16, w16;
    const uint16_t* dyb = as_bf16(dy.data<float>(), n, out, out, dy16);
    for_each_tile(w, nf4_tile_elements_, w16, to_bf16(w), [&](int64_t r0, int64_t rows, const uint16_t* tile) {
      cpu::gemm_bf16_packed(false, false, n, in, rows, dyb + r0, out, tile, in, 1.0f, dx.data<float>(), in);
    });
    return;
  }
  thread_local std::vector<float> w32;
  for_each_tile(w, nf4_tile_elements_, w32, to_f32(w), [&](int64_t r0, int64_t rows, const float* tile) {
    cpu::gemm(false, false, n, in, rows, 1.0f, dy.data<float>() + r0, out, tile, in, 1.0f, dx.data<float>(), in);
  });
}

}  // namespace tl
