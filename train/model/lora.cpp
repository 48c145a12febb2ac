#include "train/model/lora.h"

#include <cmath>
#include <regex>

namespace tl {

double lora_scaling(double alpha, int64_t r, bool use_rslora) {
  return use_rslora ? alpha / std::sqrt(double(r)) : alpha / double(r);
}

void lora_init(Tensor& A, Tensor& B, uint64_t seed) {
  // kaiming_uniform_(a=√5) on [r, in]: gain = √(2/(1+5)), bound = gain·√(3/in) = 1/√in.
  const double bound = 1.0 / std::sqrt(double(A.dim(1)));
  for (int64_t i = 0; i < A.numel(); ++i) {
    double u = unit_double(splitmix64(seed ^ splitmix64(uint64_t(i))));
    double v = (2.0 * u - 1.0) * bound;
    if (A.dtype() == DType::F64) A.data<double>()[i] = v;
    else A.data<float>()[i] = float(v);
  }
  std::fill_n(static_cast<char*>(B.raw()), B.nbytes(), 0);
}

namespace {
// PEFT's pattern rule for rank_pattern / alpha_pattern keys: re.match(rf"(.*\.)?({key})$", name).
bool pattern_matches(const std::string& key, const std::string& module) {
  return std::regex_match(module, std::regex("(.*\\.)?(" + key + ")"));
}
}  // namespace

int64_t LoraSpec::rank_for(const std::string& module) const {
  for (const auto& [k, v] : rank_pattern)
    if (pattern_matches(k, module)) return v;
  return r;
}
double LoraSpec::alpha_for(const std::string& module) const {
  for (const auto& [k, v] : alpha_pattern)
    if (pattern_matches(k, module)) return v;
  return alpha;
}
double LoraSpec::scaling_for(const std::string& module) const {
  return lora_scaling(alpha_for(module), rank_for(module), use_rslora);
}

}  // namespace tl
