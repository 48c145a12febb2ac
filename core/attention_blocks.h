#pragma once
// The attention's walk by blocks of queries, shared by both backends (core/cpu/cpu_attention.cpp,
// cuda/attention.cu) and by the memory checks that size their scratch (train/step/memory_plan,
// train/model/preflight, the trainer's row check). Per (batch row, KV head) the queries go in
// blocks of kAttentionBlockRows; a block reads only the keys from the earliest one any of its
// queries may see, so the causal triangle costs about half the S² scores and a window w about
// (w + 128)·S.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/config.h"

namespace tl {

constexpr int64_t kAttentionBlockRows = 128;

inline int64_t attention_blocks(int64_t S) { return (S + kAttentionBlockRows - 1) / kAttentionBlockRows; }

// Per query t of one batch row: the first key it may see, max(window start, the first
// position of its document); doc: the row's document ids, or null (one document).
std::vector<int64_t> first_visible_keys(int64_t S, int64_t window, const int32_t* doc);

// The earliest key any query of [t0, t1) sees (`first` from first_visible_keys).
inline int64_t block_first_key(const std::vector<int64_t>& first, int64_t t0, int64_t t1) {
  return *std::min_element(first.begin() + t0, first.begin() + t1);
}

// The widest GQA group of a model: query heads per KV head, over its layers.
int64_t widest_gqa_group(const Gemma4Config& c);

// The scores one block holds at most: its group's G heads × up to 128 queries × S keys.
inline double attention_block_scores(int64_t group, int64_t S) {
  return double(group) * double(std::min(kAttentionBlockRows, S)) * double(S);
}

}  // namespace tl
