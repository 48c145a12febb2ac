// The CPU backend's tiled NF4 projections against a dense product with the dequantized
// weight (the values bitsandbytes multiplies by): several tiles and a partial last one, and
// the default budget's single tile, forward and backward, exact fp32 and the bf16 matmul.
#include <gtest/gtest.h>

#include <random>

#include "core/cpu/cpu_ops.h"
#include "core/nf4.h"
#include "golden_util.h"

namespace tl {
namespace {

Tensor random_tensor(Shape shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Tensor t = Tensor::zeros(std::move(shape), DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = normal(rng);
  return t;
}

// tile_rows 0: the default tile budget (the whole weight in one tile).
void check(CpuMatmul matmul, int64_t n, double bound, int64_t tile_rows) {
  const int64_t out = 600, in = 96;
  Tensor w_bf16 = random_tensor({out, in}, 1).to(DType::BF16);
  const Nf4Tensor q = nf4_quantize(w_bf16, true);
  const Tensor dense = nf4_dequantize(q).to(DType::F32);
  const Tensor x = random_tensor({n, in}, 2), dy = random_tensor({n, out}, 3);
  CpuOps ops(DType::F32, matmul);
  if (tile_rows) ops.set_nf4_tile_elements(tile_rows * in);  // 256: tiles of 256, 256, 88 rows

  Tensor y_tiles = Tensor::zeros({n, out}, DType::F32), y_dense = Tensor::zeros({n, out}, DType::F32);
  ops.linear_nf4_forward(x, q, y_tiles);
  ops.linear_forward(x, dense, y_dense, false);
  EXPECT_LE(test::compare(y_tiles, y_dense).rel(), bound) << "forward";

  // Backward accumulates into dx: start both from the same non-zero values.
  Tensor dx_tiles = random_tensor({n, in}, 4), dx_dense = dx_tiles.clone(), none;
  ops.linear_nf4_backward(dy, q, dx_tiles);
  ops.linear_backward(x, dense, dy, dx_dense, none);
  EXPECT_LE(test::compare(dx_tiles, dx_dense).rel(), bound) << "backward";
}

TEST(CpuNf4, TiledProductsEqualTheDenseDequantizedWeightFp32) {
  check(CpuMatmul::F32, 7, 1e-6, 256);
  check(CpuMatmul::F32, 7, 1e-6, 0);
}

// 100·600·96 multiply-adds use the bf16 path in both: the same rounding of both operands
// (NF4 values in bf16 are exact), so only the summation order differs.
TEST(CpuNf4, TiledProductsEqualTheDenseDequantizedWeightBf16) {
  check(CpuMatmul::Bf16, 100, 1e-5, 256);
  check(CpuMatmul::Bf16, 100, 1e-5, 0);
}

}  // namespace
}  // namespace tl
