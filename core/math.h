// Scalar math shared by the CPU and CUDA backends (compiled into both, tested on the CPU).
#pragma once
#include <cmath>

#include "core/half.h"

namespace tl {

// SplitMix64: the counter-based generator used for every random draw torchless makes
// (LoRA init, dropout masks, data shuffling), so runs are reproducible and resumable; TL_HD
// so a GPU draws the same numbers where its tensors live.
TL_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// A uniform double in [0, 1) from a 64-bit value.
TL_HD double unit_double(uint64_t bits) { return double(bits >> 11) * 0x1.0p-53; }

// Inverted dropout's mask value of element i: 1/(1−p) when kept (unit_double ≥ p), else 0.
TL_HD double dropout_keep(uint64_t seed, int64_t i, double p) {
  return unit_double(splitmix64(seed + uint64_t(i))) >= p ? 1.0 / (1.0 - p) : 0.0;
}

// gelu with the tanh approximation (PyTorch's gelu(approximate="tanh")):
// 0.5·z·(1 + tanh(√(2/π)·(z + 0.044715·z³)))
template <class T>
TL_HD T gelu_tanh(T z) {
  const T k = T(0.7978845608028654);  // √(2/π)
  return T(0.5) * z * (T(1) + std::tanh(k * (z + T(0.044715) * z * z * z)));
}

// d/dz gelu_tanh(z) = 0.5·(1 + t) + 0.5·z·(1 − t²)·k·(1 + 3·0.044715·z²), t = tanh(k(z + 0.044715z³))
template <class T>
TL_HD T gelu_tanh_grad(T z) {
  const T k = T(0.7978845608028654);
  T t = std::tanh(k * (z + T(0.044715) * z * z * z));
  return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * z * z);
}

// Final-logit soft cap: cap·tanh(z/cap); derivative 1 − tanh²(z/cap).
template <class T>
TL_HD T softcap(T z, T cap) {
  return cap * std::tanh(z / cap);
}

}  // namespace tl
