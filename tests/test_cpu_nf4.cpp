// The CPU backend's tiled NF4 projections against a dense product with the dequantized
// weight (the values bitsandbytes multiplies by): several tiles and a partial last one, and
// the default budget's single tile, forward and backward, exact fp32 and the bf16 matmul.
#include <gtest/gtest.h>

#include <random>
#include <tuple>

#include "core/cpu/cpu_ops.h"
#include "core/half.h"
#include "core/nf4.h"
#include "golden_util.h"
#include "tests/bf16_kernel_test.h"

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
// (NF4 values in bf16 are exact), so only the summation order differs. Once per bf16 kernel.
class CpuNf4Bf16 : public test::Bf16KernelTest {};
TL_INSTANTIATE_BF16_KERNELS(CpuNf4Bf16);

TEST_P(CpuNf4Bf16, TiledProductsEqualTheDenseDequantizedWeight) {
  check(CpuMatmul::Bf16, 100, 1e-5, 256);
  check(CpuMatmul::Bf16, 100, 1e-5, 0);
}

// Blocks whose scale puts code ±1 exactly halfway between two bf16 values, both ways (even
// and odd last kept bit), so that round-to-nearest-even is tested, beside random codes.
Nf4Tensor ties(DType orig) {
  Nf4Tensor t;
  t.shape = {4, 64};
  t.orig_dtype = orig;
  t.absmax = {1.0f + 3.0f / 256, 1.0f + 1.0f / 256, 0.5f + 3.0f / 512, 2.0f + 5.0f / 128};
  std::mt19937 rng(6);
  t.packed.resize(128);
  for (auto& b : t.packed) b = uint8_t(rng());
  for (size_t k = 0; k < t.packed.size(); k += 4) t.packed[k] = 0xF0;  // codes 15 (+1) and 0 (−1)
  return t;
}

// The dequantization tables (vector code on AVX-512 CPUs) against the scalar roundings of
// core/half.h, bit for bit: rows that start and end inside 64-element blocks (37 × 100), the
// three original dtypes, ties, and fp32 out rounded through bf16 as well as bf16 out.
TEST(CpuNf4, DequantizedRowsRoundAsTheScalarHelpers) {
  std::vector<std::tuple<Nf4Tensor, int64_t, int64_t>> cases;  // tensor, rows [r0, r1) checked
  for (DType orig : {DType::BF16, DType::F16, DType::F32})
    cases.emplace_back(nf4_quantize(random_tensor({37, 100}, 5).to(orig), true), 3, 29);
  for (DType orig : {DType::BF16, DType::F32}) cases.emplace_back(ties(orig), 0, 4);
  for (const auto& [q, r0, r1] : cases) {
    const int64_t rows = q.shape[0], cols = q.shape[1];
    std::vector<float> exact(size_t(rows * cols)), via_bf16(exact.size());
    std::vector<uint16_t> bf16(exact.size());
    nf4_dequantize_rows(q, 0, rows, exact.data(), DType::F32);  // code · absmax, no rounding
    nf4_dequantize_rows(q, r0, r1, via_bf16.data(), DType::BF16);
    nf4_dequantize_rows_bf16(q, r0, r1, bf16.data());
    int64_t bad = 0;
    for (int64_t i = r0 * cols; i < r1 * cols; ++i) {
      const float v = exact[size_t(i)];
      const float through = q.orig_dtype == DType::F16 ? f16_to_float(float_to_f16(v)) : v;
      bad += bf16[size_t(i - r0 * cols)] != float_to_bf16(through);
      bad += float_bits(via_bf16[size_t(i - r0 * cols)]) != float_bits(bf16_to_float(float_to_bf16(v)));
    }
    EXPECT_EQ(bad, 0) << dtype_name(q.orig_dtype) << " " << shape_str(q.shape);
  }
}

}  // namespace
}  // namespace tl
