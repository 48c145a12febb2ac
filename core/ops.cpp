#include "core/ops.h"

namespace tl {

int64_t Ops::count_argmax_hits(const Tensor& logits, const Tensor& labels) {
  Tensor l = download(logits), y = labels.device() == Device::CPU ? labels : download(labels);
  const int64_t n = y.numel(), v = l.numel() / std::max<int64_t>(1, n);
  int64_t hits = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int32_t target = y.data<int32_t>()[t];
    if (target == -100) continue;
    int64_t best = 0;
    for (int64_t j = 1; j < v; ++j)
      if (l.get(t * v + j) > l.get(t * v + best)) best = j;
    hits += best == target;
  }
  return hits;
}

}  // namespace tl
