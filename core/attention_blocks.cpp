#include "core/attention_blocks.h"

#include <unordered_map>

namespace tl {

std::vector<int64_t> first_visible_keys(int64_t S, int64_t window, const int32_t* doc) {
  std::vector<int64_t> first(static_cast<size_t>(S));
  std::unordered_map<int32_t, int64_t> first_of_doc;
  for (int64_t t = 0; t < S; ++t) {
    int64_t f = window > 0 ? std::max<int64_t>(0, t - window + 1) : 0;
    if (doc) f = std::max(f, first_of_doc.try_emplace(doc[t], t).first->second);
    first[size_t(t)] = f;
  }
  return first;
}

int64_t widest_gqa_group(const Gemma4Config& c) {
  int64_t group = 1;
  for (int i = 0; i < c.num_hidden_layers; ++i)
    group = std::max<int64_t>(group, c.num_attention_heads / std::max<int64_t>(1, c.layer(i).num_kv_heads));
  return group;
}

}  // namespace tl
