// LoRA adapters with PEFT's semantics (formats.md §2):
//   y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ,   A: [r, in], B: [out, r], s = alpha/r (or alpha/√r, rsLoRA)
// Adapters attach to the model's base projections; the base stays frozen.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/math.h"
#include "core/tensor.h"

namespace tl {

struct LoraAdapter {
  std::string name;   // the base weight's HF name, e.g. "layers.3.self_attn.q_proj.weight"
  Tensor A, B;        // on the backend, in Ops::master_dtype() (fp32 master weights)
  Tensor dA, dB;      // gradients, same shapes and dtype
  double scaling = 1.0;
  double dropout = 0.0;
  uint64_t dropout_seed = 0;  // with the step counter, fixes the dropout mask of each pass

  int64_t rank() const { return A.dim(0); }
};

// Which projections get adapters and with what rank and alpha (PEFT's LoraConfig; heal.yaml's
// lora_* keys).
struct LoraSpec {
  int64_t r = 8;
  double alpha = 8;
  double dropout = 0.0;
  bool use_rslora = false;
  // Either a list of module-name suffixes ("q_proj", "mlp.down_proj"), the single entry
  // "all-linear", or a regular expression that must match the whole module name.
  std::vector<std::string> target_modules{"all-linear"};
  std::optional<std::string> target_regex;
  std::map<std::string, int64_t> rank_pattern;   // regex key → r for matching modules
  std::map<std::string, double> alpha_pattern;   // regex key → alpha
  std::string base_model_name_or_path;

  int64_t rank_for(const std::string& module) const;
  double alpha_for(const std::string& module) const;
  double scaling_for(const std::string& module) const;
};

// PEFT's scaling: alpha/r, or alpha/√r with rsLoRA.
double lora_scaling(double alpha, int64_t r, bool use_rslora);

// PEFT's default init on the host: A ~ U(−1/√in, 1/√in) (kaiming_uniform with a=√5), B = 0.
// Deterministic in `seed` (our own generator: PyTorch's stream is not reproduced).
void lora_init(Tensor& A_host, Tensor& B_host, uint64_t seed);

// splitmix64 and unit_double (every random draw torchless makes) are in core/math.h.

}  // namespace tl
