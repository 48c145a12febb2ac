// The bf16 matmul (oneDNN) against a double-precision product of the same bf16-rounded
// inputs: every transpose case, padded leading dimensions, overwrite and accumulate.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/gemm_bf16.h"
#include "core/half.h"

namespace tl {
namespace {

float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

TEST(GemmBf16, MatchesDoubleProductOfRoundedInputs) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  const int64_t m = 37, n = 29, k = 70;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (float beta : {0.0f, 1.0f}) {
        // Stored shapes with 3 columns of padding each (leading dimension > width).
        const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, lda = a_cols + 3;
        const int64_t b_rows = tb ? n : k, b_cols = tb ? k : n, ldb = b_cols + 3, ldc = n + 3;
        std::vector<float> a(size_t(a_rows * lda)), b(size_t(b_rows * ldb)), c(size_t(m * ldc));
        for (auto& x : a) x = normal(rng);
        for (auto& x : b) x = normal(rng);
        for (auto& x : c) x = normal(rng);
        const std::vector<float> c0 = c;
        cpu::gemm_bf16(ta, tb, m, n, k, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
        double worst = 0;
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < ldc; ++j) {
            if (j >= n) {  // padding is never written
              ASSERT_EQ(c[size_t(i * ldc + j)], c0[size_t(i * ldc + j)]);
              continue;
            }
            double want = beta * c0[size_t(i * ldc + j)];
            for (int64_t p = 0; p < k; ++p) {
              const float av = ta ? a[size_t(p * lda + i)] : a[size_t(i * lda + p)];
              const float bv = tb ? b[size_t(j * ldb + p)] : b[size_t(p * ldb + j)];
              want += double(round_bf16(av)) * double(round_bf16(bv));
            }
            worst = std::max(worst, std::abs(c[size_t(i * ldc + j)] - want));
          }
        // fp32 accumulation of 70 products of size ~1: a few 1e-6.
        EXPECT_LT(worst, 2e-5) << "ta " << ta << " tb " << tb << " beta " << beta;
      }
}

// y = x·Wᵀ through CpuOps with CpuMatmul::Bf16 on a product large enough for the bf16 path:
// it equals the double product of bf16-rounded inputs (and so differs from fp32). A small
// product (a LoRA factor's size) stays in fp32, identical to the exact backend.
void linear_both_ways(int64_t n, int64_t in, int64_t out, double& worst_rounded, double& worst_exact) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  Tensor x = Tensor::zeros({n, in}, DType::F32), w = Tensor::zeros({out, in}, DType::F32);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = normal(rng);
  for (int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] = normal(rng);
  CpuOps fast(DType::F32, CpuMatmul::Bf16), exact(DType::F32);
  Tensor y16 = Tensor::zeros({n, out}, DType::F32), y32 = Tensor::zeros({n, out}, DType::F32);
  fast.linear_forward(x, w, y16, false);
  exact.linear_forward(x, w, y32, false);
  worst_rounded = worst_exact = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < out; ++j) {
      double want = 0;
      for (int64_t p = 0; p < in; ++p)
        want += double(round_bf16(x.data<float>()[i * in + p])) * double(round_bf16(w.data<float>()[j * in + p]));
      const float got = y16.data<float>()[i * out + j];
      worst_rounded = std::max(worst_rounded, std::abs(got - want));
      worst_exact = std::max(worst_exact, double(std::abs(got - y32.data<float>()[i * out + j])));
    }
}

TEST(GemmBf16, CpuOpsLinearUsesItForLargeProducts) {
  double rounded, exact;
  linear_both_ways(64, 256, 256, rounded, exact);  // 2^22 multiply-adds
  EXPECT_LT(rounded, 1e-4);
  EXPECT_GT(exact, 1e-3) << "the bf16 path really rounds its inputs";
  linear_both_ways(16, 64, 8, rounded, exact);  // small: fp32
  EXPECT_EQ(exact, 0.0);
  EXPECT_THROW(CpuOps(DType::F64, CpuMatmul::Bf16), std::exception);
}

}  // namespace
}  // namespace tl
