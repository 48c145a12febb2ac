#include "train/surgery/llama_cpp.h"

#include <fmt/format.h>

namespace tl {

const char* const kLlamaCppKvRule =
    "llama.cpp makes a KV-shared full_attention layer read layer N-1 and a sliding_attention one read layer "
    "N-2, N being the number of layers with their own K/V, so the last of those must be full_attention with a "
    "sliding_attention layer before it";

std::string llama_cpp_kv_problem(const Gemma4Config& c) {
  if (c.num_kv_shared_layers <= 0) return "";
  const int n = c.first_kv_shared_layer();
  if (n < 2)
    return fmt::format("only {} layer(s) own K/V; llama.cpp needs at least 2 ({})", n, kLlamaCppKvRule);
  for (int i = n; i < int(c.num_hidden_layers); ++i) {
    const LayerGeometry& g = c.layer(i);
    // llama.cpp: n_layer_kv_from_start - (is_swa(il) ? 2 : 1).
    const int llama = n - (g.type == LayerType::Sliding ? 2 : 1);
    if (llama != g.kv_source)
      return fmt::format("KV-shared layer {} ({}) reads layer {} in transformers but layer {} ({}) in llama.cpp "
                         "({})", i, layer_type_name(g.type), g.kv_source, llama,
                         layer_type_name(c.layer(llama).type), kLlamaCppKvRule);
  }
  return "";
}

std::string llama_cpp_kv_summary(const Gemma4Config& c) {
  const std::string p = llama_cpp_kv_problem(c);
  if (!p.empty()) return "llama.cpp: cannot run this KV-sharing layout: " + p;
  if (c.num_kv_shared_layers <= 0) return "llama.cpp: KV-sharing layout runnable (no KV-shared layers)";
  const int n = c.first_kv_shared_layer();
  return fmt::format("llama.cpp: KV-sharing layout runnable (layers {}-{} share K/V; layer {} is {}, layer {} is {})", n,
                     c.num_hidden_layers - 1, n - 2, layer_type_name(c.layer(n - 2).type), n - 1,
                     layer_type_name(c.layer(n - 1).type));
}

}  // namespace tl
