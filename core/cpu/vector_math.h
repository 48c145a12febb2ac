// Float math the compiler can vectorize (no libm calls in the loop): e^x and the tanh-GELU
// with its derivative, for the CPU backend's fp32 loops. libm's expm1f/tanhf are scalar and
// were about a fifth of a QLoRA step (bench/README.md); these are within a few ulp of them.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

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

// tanh(x) in two branches, both computed so that the loop vectorizes:
//   |x| < 0.4: the odd Taylor series to x¹³ (the next term is below 2e-9 there);
//   otherwise: sign(x)·(1 − e)/(1 + e) with e = e^(−2|x|), where 1 − e ≥ 0.55 has no cancellation.
// Within a few ulp of libm's tanhf, which is scalar (a tenth of the E2B-shaped step, bench/README.md).
inline float tanh_f32(float x) {
  const float a = std::abs(x), x2 = x * x;
  float p = 21844.0f / 6081075.0f;
  p = p * x2 - 1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const float series = x + x * x2 * p;
  const float e = exp_f32(-2.0f * a);
  const float tail = std::copysign((1.0f - e) / (1.0f + e), x);
  return a < 0.4f ? series : tail;
}

// e^x through exp_f32 for float, libm for double (the fp64 gradient checks keep libm's exp).
template <class T>
inline T exp_of(T x) {
  if constexpr (std::is_same_v<T, float>) return exp_f32(x);
  else return std::exp(x);
}

// Σ x_j in double, over 16 fixed lanes (then the lanes in order): vectorizes, unlike a single
// double accumulator, and gives the same sum for the same data whatever the threads.
inline double sum_as_double(const float* x, int64_t n) {
  double lane[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) lane[k] += double(x[j + k]);
  for (; j < n; ++j) lane[j % 16] += double(x[j]);
  double s = 0;
  for (double v : lane) s += v;
  return s;
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
