// Measures of repetition in generated token sequences: how a depth-upscaled model's loops
// show up before a heal and vanish after it.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

namespace tl {

// seq-rep-n (Welleck et al. 2019): the share of the n-grams of `tokens` that repeat an
// earlier n-gram of the same sequence, 1 − distinct/total; 0 when there are no n-grams.
// A looping generation scores near 1, varied text near 0.
double repetition_rate(std::span<const int32_t> tokens, int n = 4);

// distinct-n (Li et al. 2016) of one sequence: distinct n-grams / n-grams; 1 when there
// are none (nothing repeats). 1 − repetition_rate(tokens, n) where n-grams exist.
double distinct_n(std::span<const int32_t> tokens, int n);

// The length of the longest suffix of `tokens` that also ends at an earlier position
// (occurrences may overlap): a sequence stuck in a cycle of period p from position s has a
// repeated suffix of length N − s − p.
int64_t longest_repeated_suffix(std::span<const int32_t> tokens);

// The loop rule: a generation loops when its longest repeated suffix is at least
// kLoopMinTokens tokens and at least a quarter of the generation, i.e. its end is a copy of
// something it already said, too long to be a chance phrase.
constexpr int64_t kLoopMinTokens = 8;
bool loops(std::span<const int32_t> tokens);

// Means over a set of generations (a stop token at the end is not part of the text).
struct GenerationScores {
  int64_t count = 0, stopped = 0;
  double distinct2 = 0, distinct3 = 0, distinct4 = 0, rep4 = 0, repeated_suffix = 0, loop_fraction = 0;
  void add(std::span<const int32_t> tokens, bool stopped);
  GenerationScores mean() const;  // the sums above divided by count
};

}  // namespace tl
