// The vectorizable float exp, tanh and tanh-GELU of the CPU backend against double-precision libm.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>

#include "core/cpu/vector_math.h"
#include "core/math.h"

namespace tl {
namespace {

TEST(VectorMath, ExpIsWithinTwoUlpOfLibm) {
  double worst = 0;
  for (double x = -87.0; x <= 88.0; x += 0.00137) {
    const float xf = float(x);
    const double want = std::exp(double(xf));
    worst = std::max(worst, std::abs(double(cpu::exp_f32(xf)) - want) / want);
  }
  EXPECT_LT(worst, 2.4e-7) << "2 ulp of float is 2.4e-7 relative";
  RecordProperty("exp_f32_max_rel_err", fmt::format("{:.3g}", worst));
  // Clamped outside [−87, 88]: finite, and tiny or huge as the callers need.
  EXPECT_GT(cpu::exp_f32(-1000.0f), 0.0f);
  EXPECT_LT(cpu::exp_f32(-1000.0f), 2e-38f);
  EXPECT_GT(cpu::exp_f32(1000.0f), 1e38f);
  EXPECT_TRUE(std::isfinite(cpu::exp_f32(1000.0f)));
}

TEST(VectorMath, TanhIsWithinAFewUlpOfLibm) {
  double worst = 0;
  for (double x = -20.0; x <= 20.0; x += 0.000731) {
    const float xf = float(x);
    const double want = std::tanh(double(xf));
    if (want == 0) continue;
    worst = std::max(worst, std::abs(double(cpu::tanh_f32(xf)) - want) / std::abs(want));
  }
  RecordProperty("tanh_f32_max_rel_err", fmt::format("{:.3g}", worst));
  EXPECT_LT(worst, 4.8e-7) << "4 ulp of float is 4.8e-7 relative";
  // Both branches near the switch at 0.4, tiny arguments, and saturation without NaN.
  for (float x : {0.39999998f, 0.4f, 0.40000004f, 1e-30f, -1e-6f})
    EXPECT_NEAR(cpu::tanh_f32(x), std::tanh(double(x)), 4.8e-7 * std::abs(std::tanh(double(x)))) << x;
  EXPECT_EQ(cpu::tanh_f32(100.0f), 1.0f);
  EXPECT_EQ(cpu::tanh_f32(-1e30f), -1.0f);
  EXPECT_EQ(cpu::tanh_f32(0.0f), 0.0f);
}

TEST(VectorMath, GeluAndItsGradientMatchTheTanhFormulaInDouble) {
  double worst_f = 0, worst_g = 0;
  for (double z = -12.0; z <= 12.0; z += 0.00091) {
    const float zf = float(z);
    float s;
    const float f = cpu::gelu_tanh_sigmoid(zf, s);
    const float g = cpu::gelu_tanh_grad_from(zf, s);
    // Error relative to the scale of the terms (|z| or 1), as fp32 arithmetic allows.
    const double scale = std::max(1.0, std::abs(double(zf)));
    worst_f = std::max(worst_f, std::abs(f - gelu_tanh(double(zf))) / scale);
    worst_g = std::max(worst_g, std::abs(g - gelu_tanh_grad(double(zf))) / scale);
  }
  RecordProperty("gelu_max_err", fmt::format("{:.3g}", worst_f));
  RecordProperty("gelu_grad_max_err", fmt::format("{:.3g}", worst_g));
  EXPECT_LT(worst_f, 5e-7);
  EXPECT_LT(worst_g, 5e-7);
  float s;
  EXPECT_LE(std::abs(cpu::gelu_tanh_sigmoid(-100.0f, s)), 1e-35f);  // σ(−huge) ≈ 0, no NaN
  EXPECT_EQ(cpu::gelu_tanh_sigmoid(100.0f, s), 100.0f);
  EXPECT_EQ(cpu::gelu_tanh_grad_from(100.0f, s), 1.0f);
}

}  // namespace
}  // namespace tl
