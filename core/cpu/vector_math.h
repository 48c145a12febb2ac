// Float math the compiler can vectorize (no libm calls in the loop): e^x and the tanh-GELU
// with its derivative, for the CPU backend's fp32 loops. libm's expm1f/tanhf are scalar and
// were about a fifth of a QLoRA step (bench/README.md); these are within a few ulp of them.
#pragma once
#include <algorithm>
#include <bit>
#include <cstdint>

namespace tl::cpu {

// e^x for x in [−87, 88] (clamped outside, where the callers only need "tiny" or "huge"):
// x = n·ln2 + r with |r| ≤ ln2/2 (Cody–Waite split of ln2), e^r by its degree-7 Taylor
// polynomial (truncation < 6e-9 relative), times 2^n built in the exponent bits.
inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5·2^23: adding it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606820309417232e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * std::bit_cast<float>((int32_t(n) + 127) << 23);
}

// gelu_tanh(z) = 0.5·z·(1 + tanh(u)) with u = √(2/π)·(z + 0.044715·z³). Since
// 1 + tanh(u) = 2σ(2u), this is z·σ(2u) = z / (1 + e^(−2u)): one exp, no cancellation.
inline float gelu_tanh_sigmoid(float z, float& s) {
  const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
  s = 1.0f / (1.0f + exp_f32(-2.0f * u));
  return z * s;
}

// d/dz gelu_tanh(z) with s = σ(2u): 0.5(1 + t) = s and 1 − t² = 4s(1 − s), so
// gelu' = s + 2·z·s(1 − s)·√(2/π)·(1 + 3·0.044715·z²).
inline float gelu_tanh_grad_from(float z, float s) {
  return s + 2.0f * z * s * (1.0f - s) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * z * z);
}

}  // namespace tl::cpu
