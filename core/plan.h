// Parameter counts and weight memory of a Gemma 4 text decoder, from its config alone.
#pragma once
#include <map>
#include <string>

#include "core/config.h"
#include "core/weights.h"

namespace tl {

struct ModelPlan {
  int64_t total_params = 0;                        // parameters (tied embeddings once), as HF counts
  int64_t buffers = 0;                             // layer_scalar elements (not parameters)
  std::map<Component, int64_t> params_by_component;
  int64_t linear_params = 0;                       // the projections NF4 would quantize
  double bytes_bf16 = 0;                           // all parameters in bf16
  double bytes_nf4 = 0;                            // linears + experts in NF4 (double-quant absmax), rest bf16
};

ModelPlan plan_model(const Gemma4Config& c);

// Bytes of one NF4 tensor of n elements with blocksize 64: packed nibbles, plus absmax
// (double-quantized: u8 codes, fp32 per 256 blocks, the 256-entry map; else fp32 per block)
// plus the 16-entry NF4 map.
double nf4_bytes(int64_t n, bool double_quant);

// The human report `torchless-surgery plan` prints.
std::string format_plan(const Gemma4Config& c, const ModelPlan& p, const std::string& title);

}  // namespace tl
