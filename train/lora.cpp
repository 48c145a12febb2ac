#include "train/lora.h"

#include <cmath>

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

}  // namespace tl
