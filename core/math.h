// Scalar math shared by the CPU and CUDA backends (compiled into both, tested on the CPU).
#pragma once
#include <cmath>

#include "core/half.h"

namespace tl {

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
