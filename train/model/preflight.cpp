#include "train/model/preflight.h"

#include "core/attention_blocks.h"

#include <fmt/format.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>

#include "core/tensor.h"

namespace tl {

void refuse_over_context(const Gemma4Config& c, const std::string& config_file, int64_t tokens,
                         const std::string& what, const std::string& fix) {
  if (tokens <= c.max_position_embeddings) return;
  throw Error(fmt::format("{}: {} tokens, more than the model's context of {} (max_position_embeddings in {}); {}",
                          what, tokens, c.max_position_embeddings, config_file, fix));
}

int64_t checked_max_new_tokens(double n, const Gemma4Config& c, const std::string& config_file) {
  if (!(n >= 1) || n != std::floor(n))
    throw Error(fmt::format("--max-new-tokens {} must be a whole number of at least 1", n));
  refuse_over_context(c, config_file, n > 9e15 ? int64_t(9e15) : int64_t(n), fmt::format("--max-new-tokens {}", n),
                      "lower it");
  return int64_t(n);
}

double forward_peak_bytes(const Gemma4Config& c, int64_t batch, int64_t seq, int64_t act_bytes, bool all_logits,
                          int logit_copies) {
  const double B = double(batch), S = double(seq), a = double(act_bytes);
  int64_t widest_mlp = 0, widest_attn = 0;
  for (const LayerGeometry& g : c.layers()) {
    widest_mlp = std::max(widest_mlp, g.mlp_width);
    widest_attn = std::max(widest_attn, (c.num_attention_heads + 2 * g.num_kv_heads) * g.head_dim);
  }
  if (c.enable_moe_block) widest_mlp += c.moe_intermediate_size * c.top_k_experts;
  // Per token: the residual stream and its norms (a few H), one layer's q/k/v and output, the
  // MLP's gate, up and product, and the per-layer inputs of every layer.
  const double per_token = double(8 * c.hidden_size + 2 * widest_attn + 3 * widest_mlp +
                                  c.num_hidden_layers * std::max<int64_t>(c.hidden_size_per_layer_input, 0));
  // Per thread, one attention block's scores and their bf16 copy (core/attention_blocks.h).
  const double attention = double(omp_get_max_threads()) * 2.0 * attention_block_scores(widest_gqa_group(c), seq);
  const double logits = double(c.vocab_size) * (all_logits ? B * S : B) * double(std::max(1, logit_copies));
  return a * (B * S * per_token + attention + logits);
}

double kv_cache_bytes(const Gemma4Config& c, int64_t tokens, int64_t act_bytes) {
  double total = 0;
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const LayerGeometry& g = c.layer(i);
    if (g.kv_source >= 0) continue;  // reads another layer's cache
    const double kept = double(g.type == LayerType::Sliding ? std::min<int64_t>(tokens, c.sliding_window) : tokens);
    total += kept * double(g.num_kv_heads * g.head_dim) * (g.k_eq_v ? 1.0 : 2.0);
  }
  return total * double(act_bytes);
}

double physical_memory_bytes() { return double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGESIZE)); }

void refuse_over_memory(double need, const std::string& detail, const std::string& what, const std::string& fix) {
  const double have = physical_memory_bytes();
  if (need <= have) return;
  throw OutOfMemory(fmt::format("{}: needs about {:.1f} GiB ({}) but the machine has {:.1f} GiB; {}", what,
                                need / double(1ull << 30), detail, have / double(1ull << 30), fix));
}

}  // namespace tl
