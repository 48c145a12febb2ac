#include "train/eval/text_measures.h"

#include <algorithm>
#include <set>

#include "core/tensor.h"

namespace tl {

namespace {
// (distinct, total) n-grams of `tokens`.
std::pair<size_t, size_t> ngram_counts(std::span<const int32_t> tokens, int n) {
  if (n < 1) throw Error("n-gram measures: n must be at least 1");
  if (int64_t(tokens.size()) < n) return {0, 0};
  std::set<std::vector<int32_t>> seen;
  const size_t total = tokens.size() - size_t(n) + 1;
  for (size_t i = 0; i < total; ++i) seen.emplace(tokens.begin() + long(i), tokens.begin() + long(i) + n);
  return {seen.size(), total};
}
}  // namespace

double repetition_rate(std::span<const int32_t> tokens, int n) {
  const auto [distinct, total] = ngram_counts(tokens, n);
  return total ? 1.0 - double(distinct) / double(total) : 0.0;
}

double distinct_n(std::span<const int32_t> tokens, int n) {
  const auto [distinct, total] = ngram_counts(tokens, n);
  return total ? double(distinct) / double(total) : 1.0;
}

int64_t longest_repeated_suffix(std::span<const int32_t> t) {
  const int64_t n = int64_t(t.size());
  int64_t best = 0;
  // For each earlier end j, the longest common suffix of t[0, j) and t[0, n).
  for (int64_t j = 1; j < n; ++j) {
    int64_t k = 0;
    while (k < j && t[size_t(j - 1 - k)] == t[size_t(n - 1 - k)]) ++k;
    best = std::max(best, k);
  }
  return best;
}

bool loops(std::span<const int32_t> tokens) {
  const int64_t r = longest_repeated_suffix(tokens);
  return r >= kLoopMinTokens && 4 * r >= int64_t(tokens.size());
}

void GenerationScores::add(std::span<const int32_t> tokens, bool ended) {
  if (ended && !tokens.empty()) tokens = tokens.first(tokens.size() - 1);
  ++count;
  stopped += ended;
  distinct2 += distinct_n(tokens, 2);
  distinct3 += distinct_n(tokens, 3);
  distinct4 += distinct_n(tokens, 4);
  rep4 += repetition_rate(tokens, 4);
  repeated_suffix += double(longest_repeated_suffix(tokens));
  loop_fraction += loops(tokens) ? 1.0 : 0.0;
}

GenerationScores GenerationScores::mean() const {
  GenerationScores m = *this;
  if (count == 0) return m;
  for (double* x : {&m.distinct2, &m.distinct3, &m.distinct4, &m.rep4, &m.repeated_suffix, &m.loop_fraction})
    *x /= double(count);
  return m;
}

}  // namespace tl
