// One trainable tensor of the model (a LoRA factor, or a base weight trained at full rank),
// its gradient and its optimizer moments: what the optimizer updates and data parallelism
// reduces.
#pragma once
#include <string>

#include "core/tensor.h"

namespace tl {

// The tensor, its gradient and its Adam moments (fp32/fp64, on the backend).
struct ParamSlot {
  std::string name;
  Tensor* value = nullptr;
  Tensor* grad = nullptr;
  Tensor m, v;
  bool decay = true;  // HF: biases and norm weights are in the no-decay group
};

}  // namespace tl
