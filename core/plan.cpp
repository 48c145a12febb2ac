#include "core/plan.h"

#include <fmt/format.h>

namespace tl {

double nf4_bytes(int64_t n, bool double_quant) {
  int64_t blocks = (n + 63) / 64;
  double b = double((n + 1) / 2) + 16 * 4;
  if (double_quant) b += double(blocks) + double((blocks + 255) / 256) * 4 + 256 * 4;
  else b += double(blocks) * 4;
  return b;
}

ModelPlan plan_model(const Gemma4Config& c) {
  ModelPlan p;
  for (const WeightSpec& w : text_decoder_weights(c)) {
    int64_t n = shape_numel(w.shape);
    if (!w.is_parameter) {
      p.buffers += n;
      continue;
    }
    p.total_params += n;
    p.params_by_component[w.component] += n;
    p.bytes_bf16 += 2.0 * double(n);
    bool quantized = w.is_linear || w.component == Component::Experts;
    if (quantized && w.component != Component::Experts) p.linear_params += n;
    if (w.component == Component::Experts) {
      // Each expert's [out, in] slice is quantized as its own matrix.
      int64_t per = n / w.shape[0];
      p.bytes_nf4 += double(w.shape[0]) * nf4_bytes(per, true);
    } else {
      p.bytes_nf4 += quantized ? nf4_bytes(n, true) : 2.0 * double(n);
    }
  }
  if (!c.tie_word_embeddings) {
    int64_t n = c.vocab_size * c.hidden_size;
    p.total_params += n;
    p.params_by_component[Component::Embeddings] += n;
    p.bytes_bf16 += 2.0 * double(n);
    p.bytes_nf4 += 2.0 * double(n);
  }
  return p;
}

namespace {
std::string gib(double bytes) { return fmt::format("{:.2f} GiB", bytes / double(1ull << 30)); }
std::string count(int64_t n) {
  return n >= 1000000000 ? fmt::format("{:.3f}B", double(n) / 1e9)
       : n >= 1000000    ? fmt::format("{:.2f}M", double(n) / 1e6)
                         : fmt::format("{}", n);
}
}  // namespace

std::string format_plan(const Gemma4Config& c, const ModelPlan& p, const std::string& title) {
  std::string s = fmt::format("{}\n", title);
  int full = 0, shared = 0;
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    full += c.layer(i).type == LayerType::Full;
    shared += c.layer(i).kv_source >= 0;
  }
  s += fmt::format("  layers            {} ({} sliding, {} full; {} KV-shared)\n", c.num_hidden_layers,
                   c.num_hidden_layers - full, full, shared);
  s += fmt::format("  hidden            {}  heads {}  kv heads {}/{}  head dim {}/{}\n", c.hidden_size,
                   c.num_attention_heads, c.num_key_value_heads,
                   c.num_global_key_value_heads.value_or(c.num_key_value_heads), c.head_dim, c.global_head_dim);
  if (c.has_ple()) s += fmt::format("  per-layer input   {}\n", c.hidden_size_per_layer_input);
  if (c.enable_moe_block)
    s += fmt::format("  experts           {} (top {}, width {})\n", c.num_experts, c.top_k_experts,
                     c.moe_intermediate_size);
  s += "  parameters by component:\n";
  for (const auto& [comp, n] : p.params_by_component)
    s += fmt::format("    {:<22}{:>16}  ({})\n", component_name(comp), n, count(n));
  s += fmt::format("  total parameters  {:>22}  ({})\n", p.total_params, count(p.total_params));
  s += fmt::format("  layer_scalar buffers {}\n", p.buffers);
  s += fmt::format("  weights in bf16   {}\n", gib(p.bytes_bf16));
  s += fmt::format("  weights in NF4    {}  (projections and experts NF4 with double-quantized "
                   "absmax; embeddings and norms bf16)\n", gib(p.bytes_nf4));
  return s;
}

}  // namespace tl
