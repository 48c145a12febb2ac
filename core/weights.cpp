#include "core/weights.h"

#include "core/nf4.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "core/safetensors.h"

namespace tl {

const char* component_name(Component c) {
  switch (c) {
    case Component::Embeddings: return "embeddings";
    case Component::PLE: return "per-layer embeddings";
    case Component::Attention: return "attention";
    case Component::MLP: return "mlp";
    case Component::Experts: return "experts";
    case Component::Router: return "router";
    case Component::Norms: return "norms";
    case Component::LayerScalar: return "layer_scalar";
  }
  return "?";
}

std::vector<WeightSpec> text_decoder_weights(const Gemma4Config& c) {
  std::vector<WeightSpec> w;
  const int64_t H = c.hidden_size, L = c.num_hidden_layers, P = c.hidden_size_per_layer_input;
  auto add = [&](std::string name, Shape shape, Component comp, int layer = -1, bool linear = false,
                 bool param = true) {
    w.push_back({std::move(name), std::move(shape), comp, layer, linear, param});
  };
  add("embed_tokens.weight", {c.vocab_size, H}, Component::Embeddings);
  if (c.has_ple()) {
    add("embed_tokens_per_layer.weight", {c.vocab_size_per_layer_input, L * P}, Component::PLE);
    add("per_layer_model_projection.weight", {L * P, H}, Component::PLE, -1, true);
    add("per_layer_projection_norm.weight", {P}, Component::PLE);
  }
  add("norm.weight", {H}, Component::Norms);

  for (int i = 0; i < L; ++i) {
    const LayerGeometry& g = c.layer(i);
    const std::string p = fmt::format("layers.{}.", i);
    const int64_t d = g.head_dim, nh = c.num_attention_heads;
    add(p + "input_layernorm.weight", {H}, Component::Norms, i);
    add(p + "self_attn.q_proj.weight", {nh * d, H}, Component::Attention, i, true);
    add(p + "self_attn.q_norm.weight", {d}, Component::Attention, i);
    if (g.kv_source < 0) {
      add(p + "self_attn.k_proj.weight", {g.num_kv_heads * d, H}, Component::Attention, i, true);
      if (!g.k_eq_v)
        add(p + "self_attn.v_proj.weight", {g.num_kv_heads * d, H}, Component::Attention, i, true);
      add(p + "self_attn.k_norm.weight", {d}, Component::Attention, i);
    }
    add(p + "self_attn.o_proj.weight", {H, nh * d}, Component::Attention, i, true);
    add(p + "post_attention_layernorm.weight", {H}, Component::Norms, i);
    add(p + "pre_feedforward_layernorm.weight", {H}, Component::Norms, i);
    add(p + "mlp.gate_proj.weight", {g.mlp_width, H}, Component::MLP, i, true);
    add(p + "mlp.up_proj.weight", {g.mlp_width, H}, Component::MLP, i, true);
    add(p + "mlp.down_proj.weight", {H, g.mlp_width}, Component::MLP, i, true);
    add(p + "post_feedforward_layernorm.weight", {H}, Component::Norms, i);
    if (c.enable_moe_block) {
      const int64_t E = c.num_experts, I = c.moe_intermediate_size;
      add(p + "router.proj.weight", {E, H}, Component::Router, i, true);
      add(p + "router.scale", {H}, Component::Router, i);
      add(p + "router.per_expert_scale", {E}, Component::Router, i);
      add(p + "experts.gate_up_proj", {E, 2 * I, H}, Component::Experts, i);
      add(p + "experts.down_proj", {E, H, I}, Component::Experts, i);
      add(p + "pre_feedforward_layernorm_2.weight", {H}, Component::Norms, i);
      add(p + "post_feedforward_layernorm_1.weight", {H}, Component::Norms, i);
      add(p + "post_feedforward_layernorm_2.weight", {H}, Component::Norms, i);
    }
    if (c.has_ple()) {
      add(p + "per_layer_input_gate.weight", {P, H}, Component::PLE, i, true);
      add(p + "per_layer_projection.weight", {H, P}, Component::PLE, i, true);
      add(p + "post_per_layer_input_norm.weight", {H}, Component::PLE, i);
    }
    add(p + "layer_scalar", {1}, Component::LayerScalar, i, false, false);
  }
  return w;
}

}  // namespace tl

namespace tl {

std::string decoder_prefix(const Checkpoint& ckpt) {
  for (const char* p : {kNestedPrefix, kPlainPrefix})
    if (ckpt.contains(std::string(p) + "embed_tokens.weight")) return p;
  throw Error(fmt::format("{}: no Gemma 4 text decoder found (no '{}embed_tokens.weight' or "
                          "'{}embed_tokens.weight')", ckpt.dir().string(), kNestedPrefix, kPlainPrefix));
}

namespace {
constexpr const char* kBnbStateSuffixes[] = {".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"};

// The "shape" a Linear4bit's quant_state JSON records (the weight's original shape).
Shape bnb_4bit_shape(const Checkpoint& ckpt, const std::string& full) {
  for (const char* suffix : kBnbStateSuffixes) {
    if (!ckpt.contains(full + suffix)) continue;
    const Tensor qs = ckpt.get(full + suffix);
    try {
      return nlohmann::json::parse(std::string(qs.data<char>(), size_t(qs.numel()))).at("shape").get<Shape>();
    } catch (const nlohmann::json::exception& e) {
      throw Error(fmt::format("{}: '{}{}' is not a bitsandbytes quant_state with a shape: {}", ckpt.dir().string(),
                              full, suffix, e.what()));
    }
  }
  throw std::logic_error("bnb_4bit_shape of a tensor that is not pre-quantized");
}
}  // namespace

bool is_bnb_4bit(const Checkpoint& ckpt, const std::string& full) {
  if (!ckpt.contains(full) || ckpt.entry(full).dtype != DType::U8) return false;
  for (const char* suffix : kBnbStateSuffixes)
    if (ckpt.contains(full + suffix)) return true;
  return false;
}

std::string first_bnb_4bit(const Checkpoint& ckpt) {
  for (const std::string& name : ckpt.names())
    for (const char* suffix : kBnbStateSuffixes)
      if (name.ends_with(suffix)) return name.substr(0, name.size() - std::string(suffix).size());
  return "";
}

int64_t check_text_decoder(const Gemma4Config& c, const Checkpoint& ckpt, bool allow_bnb_4bit) {
  const std::string prefix = decoder_prefix(ckpt);
  int64_t n = 0;
  for (const WeightSpec& s : text_decoder_weights(c)) {
    const std::string full = prefix + s.name;
    if (!ckpt.contains(full))
      throw Error(fmt::format("{}: missing tensor '{}' (expected shape {})", ckpt.dir().string(), full,
                              shape_str(s.shape)));
    if (is_bnb_4bit(ckpt, full)) {
      if (!allow_bnb_4bit)
        throw Error(fmt::format("{}: tensor '{}' is pre-quantized by bitsandbytes (4-bit); this needs a "
                                "full-precision checkpoint (the model the -bnb-4bit one was made from)",
                                ckpt.dir().string(), full));
      const Shape shape = bnb_4bit_shape(ckpt, full);
      if (!s.is_linear || shape != s.shape)
        throw Error(fmt::format("{}: pre-quantized tensor '{}' has shape {} but the config implies {}{}",
                                ckpt.dir().string(), full, shape_str(shape), shape_str(s.shape),
                                s.is_linear ? "" : " (not a projection)"));
      // Its quantization state as the loader reads it: a damaged absmax (NaN, inf) passed here
      // and gave a NaN loss later.
      check_nf4_state(full.substr(0, full.size() - 6), ckpt);
      ++n;
      continue;
    }
    const TensorEntry& e = ckpt.entry(full);
    if (e.shape != s.shape)
      throw Error(fmt::format("{}: tensor '{}' has shape {} but the config implies {}", ckpt.dir().string(),
                              full, shape_str(e.shape), shape_str(s.shape)));
    if (!dtype_is_float(e.dtype))
      throw Error(fmt::format("{}: tensor '{}' has dtype {}, expected a float type", ckpt.dir().string(),
                              full, dtype_name(e.dtype)));
    ++n;
  }
  return n;
}

}  // namespace tl
