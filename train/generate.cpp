#include "train/generate.h"

#include <algorithm>
#include <set>

namespace tl {

GreedyResult greedy_generate(Gemma4Model& model, Ops& ops, std::span<const int32_t> prompt, int64_t max_new_tokens,
                             std::span<const int32_t> stop_tokens) {
  if (prompt.empty()) throw Error("greedy_generate: empty prompt");
  std::vector<int32_t> seq(prompt.begin(), prompt.end());
  GreedyResult r;
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    Tensor ids = Tensor::zeros({1, int64_t(seq.size())}, DType::I32);
    std::copy(seq.begin(), seq.end(), ids.data<int32_t>());
    const Tensor hidden = model.forward_hidden(Batch{ids, {}, {}});
    const int64_t last = hidden.dim(0) - 1;
    const Tensor logits = ops.download(model.logits(hidden.slice_rows(last, last + 1)));
    int32_t best = 0;
    double best_value = logits.get(0);
    for (int64_t v = 1; v < logits.numel(); ++v)
      if (const double x = logits.get(v); x > best_value) best_value = x, best = int32_t(v);
    seq.push_back(best);
    r.tokens.push_back(best);
    if (std::find(stop_tokens.begin(), stop_tokens.end(), best) != stop_tokens.end()) {
      r.stopped = true;
      break;
    }
  }
  return r;
}

double repetition_rate(std::span<const int32_t> tokens, int n) {
  if (n < 1) throw Error("repetition_rate: n must be at least 1");
  if (int64_t(tokens.size()) < n) return 0.0;
  std::set<std::vector<int32_t>> seen;
  const size_t total = tokens.size() - size_t(n) + 1;
  for (size_t i = 0; i < total; ++i) seen.emplace(tokens.begin() + i, tokens.begin() + i + n);
  return 1.0 - double(seen.size()) / double(total);
}

}  // namespace tl
