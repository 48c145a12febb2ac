// The bf16 matmul against a double-precision product of the same bf16-rounded inputs: every
// transpose case, padded leading dimensions, overwrite and accumulate; each test once per
// kernel (oneDNN where the CPU has bf16 instructions, the portable kernel everywhere).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/gemm_bf16.h"
#include "core/half.h"
#include "tests/bf16_kernel_test.h"

namespace tl {
namespace {

float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

class GemmBf16 : public test::Bf16KernelTest {};
TL_INSTANTIATE_BF16_KERNELS(GemmBf16);

TEST_P(GemmBf16, MatchesDoubleProductOfRoundedInputs) {
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

TEST_P(GemmBf16, CpuOpsLinearUsesItForLargeProducts) {
  double rounded, exact;
  linear_both_ways(64, 256, 256, rounded, exact);  // 2^22 multiply-adds
  EXPECT_LT(rounded, 1e-4);
  EXPECT_GT(exact, 1e-3) << "the bf16 path really rounds its inputs";
  linear_both_ways(16, 64, 8, rounded, exact);  // small: fp32
  EXPECT_EQ(exact, 0.0);
  EXPECT_THROW(CpuOps(DType::F64, CpuMatmul::Bf16), std::exception);
}

// A held matmul input (Ops::hold_matmul_input) is rounded to bf16 once and reused: the
// products that read it give bit for bit what they give unheld, whether it is the product's
// A (x·Wᵀ, x·Aᵀ) or its B (dW = dyᵀ·x), and a held tensor of another shape or dtype, or a
// buffer that only starts at the held one, is not mistaken for it.
TEST_P(GemmBf16, HeldInputGivesTheSameProductsAsUnheld) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto random = [&](Shape shape) {
    Tensor t = Tensor::zeros(std::move(shape), DType::F32);
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = nd(rng);
    return t;
  };
  CpuOps ops(DType::F32, CpuMatmul::Bf16);
  const int64_t n = 128, in = 256, out = 256;  // 2^23 multiply-adds: the bf16 path
  Tensor x = random({n, in}), w = random({out, in}), w2 = random({out, in}), dy = random({n, out});
  auto products = [&]() {
    std::vector<Tensor> r;
    for (const Tensor* wt : {&w, &w2}) {
      Tensor y = Tensor::zeros({n, out}, DType::F32);
      ops.linear_forward(x, *wt, y, false);
      r.push_back(y);
    }
    Tensor dx = Tensor::zeros({n, in}, DType::F32), dw = Tensor::zeros({out, in}, DType::F32);
    ops.linear_backward(x, w, dy, dx, dw);
    r.push_back(dx);
    r.push_back(dw);
    return r;
  };
  const std::vector<Tensor> unheld = products();
  std::vector<Tensor> held;
  {
    MatmulInputHold hx(ops, x), hdy(ops, dy), other(ops, x.slice_rows(0, n / 2));
    held = products();
    held.push_back(products()[0]);  // the second use reads the kept bf16 copy
  }
  ASSERT_EQ(held.size(), unheld.size() + 1);
  for (size_t i = 0; i < held.size(); ++i) {
    const Tensor& want = unheld[i < unheld.size() ? i : 0];
    for (int64_t j = 0; j < want.numel(); ++j)
      ASSERT_EQ(held[i].data<float>()[j], want.data<float>()[j]) << "product " << i << " element " << j;
  }
  // The slice held above is a prefix of x: a product over the whole of x must not read it.
  {
    MatmulInputHold prefix(ops, x.slice_rows(0, n / 2));
    Tensor y = Tensor::zeros({n, out}, DType::F32);
    ops.linear_forward(x, w, y, false);
    for (int64_t j = 0; j < y.numel(); ++j) ASSERT_EQ(y.data<float>()[j], unheld[0].data<float>()[j]) << j;
  }
  EXPECT_THROW(ops.release_matmul_input(), std::exception);  // every hold was released
}

// Attention through CpuOps with CpuMatmul::Bf16 (S·S·d = 2^22, the bf16 threshold): the
// forward equals a double-precision reference that rounds Q, K, V and the probabilities P
// to bf16 where the backend does; the backward stays within bf16's rounding of the exact
// backend's gradients, and both differ from fp32, so the bf16 path really ran.
TEST_P(GemmBf16, CpuOpsAttentionRoundsItsProductsToBf16) {
  const int64_t B = 2, S = 256, nh = 4, nkv = 2, d = 64, group = nh / nkv, window = 100;
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  auto filled = [&](Shape shape, float scale) {
    Tensor t = Tensor::zeros(std::move(shape), DType::F32);
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = scale * normal(rng);
    return t;
  };
  Tensor q = filled({B, S, nh, d}, 0.3f), k = filled({B, S, nkv, d}, 0.3f), v = filled({B, S, nkv, d}, 1.0f);
  Tensor dout = filled({B, S, nh, d}, 1.0f);
  Tensor docs = Tensor::zeros({B, S}, DType::I32);
  for (int64_t s = 0; s < B * S; ++s) docs.data<int32_t>()[s] = (s % S) < 170 ? 0 : 1;  // two documents
  AttentionMask mask{window, &docs};
  CpuOps fast(DType::F32, CpuMatmul::Bf16), exact(DType::F32);
  Tensor o16 = Tensor::zeros({B, S, nh, d}, DType::F32), o32 = o16.clone();
  fast.attention_forward(q, k, v, mask, o16);
  exact.attention_forward(q, k, v, mask, o32);

  double worst_ref = 0, worst_exact = 0, scale = 0;
  std::vector<double> p(static_cast<size_t>(S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t t = 0; t < S; ++t) {
        const int64_t g = h / group;
        auto at = [&](const Tensor& x, int64_t heads, int64_t s, int64_t hh, int64_t j) {
          return double(round_bf16(x.data<float>()[((b * S + s) * heads + hh) * d + j]));
        };
        double mx = -1e300, z = 0;
        for (int64_t s = 0; s < S; ++s) {
          const bool ok = s <= t && t - s < window && docs.data<int32_t>()[b * S + s] == docs.data<int32_t>()[b * S + t];
          double dot = 0;
          for (int64_t j = 0; ok && j < d; ++j) dot += at(q, nh, t, h, j) * at(k, nkv, s, g, j);
          p[size_t(s)] = ok ? dot : -1e300;
          mx = std::max(mx, p[size_t(s)]);
        }
        for (int64_t s = 0; s < S; ++s) z += (p[size_t(s)] = p[size_t(s)] < -1e299 ? 0.0 : std::exp(p[size_t(s)] - mx));
        for (int64_t j = 0; j < d; ++j) {
          double want = 0;
          for (int64_t s = 0; s < S; ++s) want += double(round_bf16(float(p[size_t(s)] / z))) * at(v, nkv, s, g, j);
          const size_t i = size_t(((b * S + t) * nh + h) * d + j);
          worst_ref = std::max(worst_ref, std::abs(o16.data<float>()[i] - want));
          worst_exact = std::max(worst_exact, double(std::abs(o16.data<float>()[i] - o32.data<float>()[i])));
          scale = std::max(scale, std::abs(want));
        }
      }
  EXPECT_LT(worst_ref, 2e-3 * scale) << "against the bf16-rounded double reference";
  EXPECT_GT(worst_exact, 1e-4 * scale) << "the bf16 path really rounds";

  Tensor dq16 = Tensor::zeros(q.shape(), DType::F32), dk16 = Tensor::zeros(k.shape(), DType::F32),
         dv16 = Tensor::zeros(v.shape(), DType::F32);
  Tensor dq32 = dq16.clone(), dk32 = dk16.clone(), dv32 = dv16.clone();
  fast.attention_backward(q, k, v, mask, dout, dq16, dk16, dv16);
  exact.attention_backward(q, k, v, mask, dout, dq32, dk32, dv32);
  for (auto [g16, g32] : {std::pair{&dq16, &dq32}, std::pair{&dk16, &dk32}, std::pair{&dv16, &dv32}}) {
    double worst = 0, big = 0;
    for (int64_t i = 0; i < g32->numel(); ++i) {
      worst = std::max(worst, double(std::abs(g16->data<float>()[i] - g32->data<float>()[i])));
      big = std::max(big, double(std::abs(g32->data<float>()[i])));
    }
    EXPECT_LT(worst, 3e-2 * big);
    EXPECT_GT(worst, 1e-5 * big);
  }
}

}  // namespace
}  // namespace tl
