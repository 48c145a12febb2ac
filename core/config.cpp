#include "core/config.h"

#include <fmt/format.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/tensor.h"

namespace tl {

using nlohmann::json;

const char* layer_type_name(LayerType t) {
  return t == LayerType::Full ? "full_attention" : "sliding_attention";
}

namespace {

// Reads key `k` if present and not null; a value of the wrong type is an error naming it.
template <class T>
bool read(const json& j, const char* k, T& out, const std::string& label) {
  auto it = j.find(k);
  if (it == j.end() || it->is_null()) return false;
  try {
    out = it->get<T>();
  } catch (const json::exception&) {
    throw Error(fmt::format("{}: key '{}' has the wrong type ({})", label, k, it->dump()));
  }
  return true;
}

RopeParams read_rope(const json& j, const std::string& label, const char* which) {
  RopeParams r;
  read(j, "rope_type", r.type, label);
  read(j, "rope_theta", r.theta, label);
  read(j, "partial_rotary_factor", r.partial_rotary_factor, label);
  read(j, "factor", r.factor, label);
  if (r.type != "default" && r.type != "proportional")
    throw Error(fmt::format("{}: rope_parameters.{}.rope_type '{}' is not supported "
                            "(expected 'default' or 'proportional')", label, which, r.type));
  if (r.theta <= 0)
    throw Error(fmt::format("{}: rope_parameters.{}.rope_theta must be positive", label, which));
  return r;
}

}  // namespace

Gemma4Config Gemma4Config::from_json(const json& root, const std::string& label) {
  if (!root.is_object()) throw Error(label + ": not a JSON object");
  Gemma4Config c;
  const json* tj = &root;
  std::string model_type;
  read(root, "model_type", model_type, label);
  if (model_type == "gemma4" || root.contains("text_config")) {
    auto it = root.find("text_config");
    if (it == root.end() || !it->is_object())
      throw Error(label + ": model_type 'gemma4' but no 'text_config' object");
    tj = &*it;
    c.nested = true;
    std::string inner;
    read(*tj, "model_type", inner, label);
    if (!inner.empty() && inner != "gemma4_text")
      throw Error(fmt::format("{}: text_config.model_type is '{}', expected 'gemma4_text'", label, inner));
  } else if (!model_type.empty() && model_type != "gemma4_text") {
    throw Error(fmt::format("{}: model_type '{}' is not a Gemma 4 model (expected 'gemma4' or "
                            "'gemma4_text')", label, model_type));
  }
  const json& t = *tj;
  auto need = [&](const char* k, int64_t& v) {
    if (!read(t, k, v, label)) throw Error(fmt::format("{}: missing required key '{}'", label, k));
  };
  need("hidden_size", c.hidden_size);
  need("intermediate_size", c.intermediate_size);
  need("num_hidden_layers", c.num_hidden_layers);
  need("num_attention_heads", c.num_attention_heads);
  need("num_key_value_heads", c.num_key_value_heads);
  read(t, "vocab_size", c.vocab_size, label);
  read(t, "head_dim", c.head_dim, label);
  read(t, "global_head_dim", c.global_head_dim, label);
  int64_t g = 0;
  if (read(t, "num_global_key_value_heads", g, label)) c.num_global_key_value_heads = g;
  read(t, "hidden_activation", c.hidden_activation, label);
  read(t, "rms_norm_eps", c.rms_norm_eps, label);
  read(t, "pad_token_id", c.pad_token_id, label);
  read(t, "bos_token_id", c.bos_token_id, label);
  if (auto it = t.find("eos_token_id"); it != t.end() && !it->is_null())
    c.eos_token_ids = it->is_array() ? it->get<std::vector<int64_t>>()
                                     : std::vector<int64_t>{it->get<int64_t>()};
  read(t, "tie_word_embeddings", c.tie_word_embeddings, label);
  read(t, "sliding_window", c.sliding_window, label);
  double cap = 0;
  if (read(t, "final_logit_softcapping", cap, label)) c.final_logit_softcapping = cap;
  read(t, "vocab_size_per_layer_input", c.vocab_size_per_layer_input, label);
  read(t, "hidden_size_per_layer_input", c.hidden_size_per_layer_input, label);
  read(t, "attention_k_eq_v", c.attention_k_eq_v, label);
  read(t, "num_kv_shared_layers", c.num_kv_shared_layers, label);
  read(t, "enable_moe_block", c.enable_moe_block, label);
  read(t, "use_double_wide_mlp", c.use_double_wide_mlp, label);
  read(t, "num_experts", c.num_experts, label);
  read(t, "top_k_experts", c.top_k_experts, label);
  read(t, "moe_intermediate_size", c.moe_intermediate_size, label);
  if (c.moe_intermediate_size == 0) read(t, "expert_intermediate_size", c.moe_intermediate_size, label);
  read(t, "max_position_embeddings", c.max_position_embeddings, label);
  read(t, "dtype", c.dtype, label) || read(t, "torch_dtype", c.dtype, label);

  std::string bidir;
  read(t, "use_bidirectional_attention", bidir, label);
  if (bidir == "all")
    throw Error(label + ": use_bidirectional_attention 'all' (non-causal text attention) is not supported");

  // transformers reads rope_parameters[layer_type] for each layer type: a given
  // rope_parameters without one of them fails there (KeyError), so it is refused here.
  if (auto it = t.find("rope_parameters"); it != t.end() && !it->is_null()) {
    if (!it->is_object()) throw Error(label + ": rope_parameters must be an object keyed by layer type");
    if (auto s = it->find("sliding_attention"); s != it->end()) c.rope_sliding = read_rope(*s, label, "sliding_attention");
    if (auto f = it->find("full_attention"); f != it->end()) c.rope_full = read_rope(*f, label, "full_attention");
    for (const char* type : {"sliding_attention", "full_attention"})
      if (!it->contains(type))
        throw Error(fmt::format("{}: rope_parameters has no '{}' entry (transformers reads one per layer type)", label,
                                type));
  }
  bool attention_bias = false;
  read(t, "attention_bias", attention_bias, label);
  if (attention_bias) throw Error(label + ": attention_bias true (biased q/k/v/o projections) is not supported");

  if (auto it = t.find("per_layer_config"); it != t.end() && !it->is_null()) {
    if (!it->is_object()) throw Error(label + ": per_layer_config must be an object keyed by layer index");
    std::map<int, LayerOverride> plc;
    for (const auto& [key, val] : it->items()) {
      int idx = -1;
      try {
        size_t used = 0;
        idx = std::stoi(key, &used);
        if (used != key.size()) idx = -1;
      } catch (const std::exception&) {
      }
      if (idx < 0)
        throw Error(fmt::format("{}: per_layer_config key '{}' is not a layer index", label, key));
      if (!val.is_object()) throw Error(fmt::format("{}: per_layer_config['{}'] must be an object", label, key));
      LayerOverride o;
      for (const auto& [k, v] : val.items()) {
        if (k == "head_dim" && v.is_number_integer()) o.head_dim = v.get<int64_t>();
        else if (k == "num_key_value_heads" && v.is_number_integer()) o.num_key_value_heads = v.get<int64_t>();
        else
          throw Error(fmt::format("{}: per_layer_config['{}'].{} = {} is not supported (known: head_dim, "
                                  "num_key_value_heads)", label, key, k, v.dump()));
      }
      plc[idx] = o;
    }
    c.per_layer_config = std::move(plc);
  }

  if (auto it = t.find("layer_types"); it != t.end() && !it->is_null()) {
    if (!it->is_array()) throw Error(label + ": layer_types must be a list");
    for (const auto& v : *it) {
      std::string s = v.is_string() ? v.get<std::string>() : v.dump();
      if (s == "sliding_attention") c.layer_types.push_back(LayerType::Sliding);
      else if (s == "full_attention") c.layer_types.push_back(LayerType::Full);
      else
        throw Error(fmt::format("{}: layer_types[{}] is '{}', expected 'sliding_attention' or "
                                "'full_attention'", label, c.layer_types.size(), s));
    }
  } else {
    // HF default: every 6th layer is full; the last layer is forced to full below.
    for (int64_t i = 0; i < c.num_hidden_layers; ++i)
      c.layer_types.push_back((i + 1) % 6 == 0 ? LayerType::Full : LayerType::Sliding);
  }
  // transformers (Gemma4TextConfig.__post_init__) forces the last layer to full_attention,
  // whatever layer_types says; the model it builds is the one we must build. The shapes the
  // config then implies are checked against the weights by the loaders.
  if (!c.layer_types.empty() && c.layer_types.back() != LayerType::Full) {
    c.layer_types.back() = LayerType::Full;
    c.forced_full_last_layer = true;
  }
  c.finalize(label);
  return c;
}

void Gemma4Config::finalize(const std::string& label) {
  auto positive = [&](const char* k, int64_t v) {
    if (v <= 0) throw Error(fmt::format("{}: {} must be positive (got {})", label, k, v));
  };
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("num_key_value_heads", num_key_value_heads);
  positive("head_dim", head_dim);
  positive("global_head_dim", global_head_dim);
  positive("vocab_size", vocab_size);
  positive("sliding_window", sliding_window);
  if (hidden_activation != "gelu_pytorch_tanh" && hidden_activation != "gelu_tanh")
    throw Error(fmt::format("{}: hidden_activation '{}' is not supported (Gemma 4 uses "
                            "'gelu_pytorch_tanh')", label, hidden_activation));
  if (int64_t(layer_types.size()) != num_hidden_layers)
    throw Error(fmt::format("{}: layer_types has {} entries but num_hidden_layers is {}", label,
                            layer_types.size(), num_hidden_layers));
  if (num_kv_shared_layers < 0 || num_kv_shared_layers >= num_hidden_layers)
    throw Error(fmt::format("{}: num_kv_shared_layers {} must be in [0, num_hidden_layers={})",
                            label, num_kv_shared_layers, num_hidden_layers));
  if (hidden_size_per_layer_input < 0)
    throw Error(label + ": hidden_size_per_layer_input must be >= 0");
  if (enable_moe_block) {
    positive("num_experts", num_experts);
    positive("top_k_experts", top_k_experts);
    positive("moe_intermediate_size", moe_intermediate_size);
    if (top_k_experts > num_experts)
      throw Error(fmt::format("{}: top_k_experts {} exceeds num_experts {}", label, top_k_experts,
                              num_experts));
  }
  if (per_layer_config) {
    for (const auto& [idx, o] : *per_layer_config)
      if (idx >= num_hidden_layers)
        throw Error(fmt::format("{}: per_layer_config names layer {} but num_hidden_layers is {}", label,
                                idx, num_hidden_layers));
    // transformers reads a layer type's settings as per_layer_config[type] (KV sharing, the
    // cache), which refuses a type whose layers' overrides differ: "Layer type '…' is not
    // homogeneous across layers". A config ending on a sliding layer whose per_layer_config has
    // no full-layer entry for it (the last layer is forced to full above) is one such.
    auto same = [](const LayerOverride& a, const LayerOverride& b) {
      return a.head_dim == b.head_dim && a.num_key_value_heads == b.num_key_value_heads;
    };
    auto override_of = [&](int i) {
      auto it = per_layer_config->find(i);
      return it == per_layer_config->end() ? LayerOverride{} : it->second;
    };
    auto text = [](const LayerOverride& o) {
      std::string t;
      if (o.head_dim) t += fmt::format("head_dim {}", *o.head_dim);
      if (o.num_key_value_heads) t += fmt::format("{}num_key_value_heads {}", t.empty() ? "" : ", ", *o.num_key_value_heads);
      return t.empty() ? std::string("none") : t;
    };
    for (int i = 0; i < num_hidden_layers; ++i) {
      int first = 0;
      while (layer_types[size_t(first)] != layer_types[size_t(i)]) ++first;
      if (!same(override_of(i), override_of(first)))
        throw Error(fmt::format("{}: per_layer_config: layer type '{}' is not homogeneous across layers (layer {} "
                                "overrides {}, layer {} {}){}; transformers refuses to load it",
                                label, layer_type_name(layer_types[size_t(i)]), first, text(override_of(first)), i,
                                text(override_of(i)),
                                forced_full_last_layer && i == num_hidden_layers - 1
                                    ? fmt::format(" (layer_types ends on sliding_attention; transformers forces layer {} "
                                                  "to full_attention)",
                                                  i)
                                    : ""));
    }
  }

  layers_.assign(size_t(num_hidden_layers), {});
  const int first_shared = first_kv_shared_layer();
  for (int i = 0; i < num_hidden_layers; ++i) {
    LayerGeometry& g = layers_[size_t(i)];
    g.type = layer_types[size_t(i)];
    bool full = g.type == LayerType::Full;
    g.k_eq_v = full && attention_k_eq_v;
    if (per_layer_config) {
      // transformers >= 5.x: per-layer overrides, else the global values.
      auto it = per_layer_config->find(i);
      LayerOverride o = it == per_layer_config->end() ? LayerOverride{} : it->second;
      g.head_dim = o.head_dim.value_or(head_dim);
      g.num_kv_heads = o.num_key_value_heads.value_or(num_key_value_heads);
    } else {
      // Release-era form: full layers take global_head_dim, and K=V models'
      // full layers take num_global_key_value_heads.
      g.head_dim = full ? global_head_dim : head_dim;
      // transformers overrides the KV heads of full layers only when num_global_key_value_heads
      // is set (and attention_k_eq_v); otherwise they keep num_key_value_heads.
      g.num_kv_heads = g.k_eq_v && num_global_key_value_heads ? *num_global_key_value_heads : num_key_value_heads;
    }
    if (g.head_dim <= 0 || g.head_dim % 2 || g.num_kv_heads <= 0)
      throw Error(fmt::format("{}: layer {} has head_dim {} and {} KV heads (head_dim must be even and "
                              "positive)", label, i, g.head_dim, g.num_kv_heads));
    g.rope = full ? rope_full : rope_sliding;
    if (num_attention_heads % g.num_kv_heads != 0)
      throw Error(fmt::format("{}: num_attention_heads {} is not a multiple of the {} KV heads of "
                              "layer {}", label, num_attention_heads, g.num_kv_heads, i));
    bool shared = num_kv_shared_layers > 0 && i >= first_shared;
    if (shared) {
      // Source: the last non-shared layer of the same attention type (gemma4.md §4.5).
      for (int s = first_shared - 1; s >= 0; --s)
        if (layer_types[size_t(s)] == g.type) { g.kv_source = s; break; }
      if (g.kv_source < 0)
        throw Error(fmt::format("{}: layer {} ({}) shares K/V but no earlier non-shared layer of "
                                "that type exists", label, i, layer_type_name(g.type)));
    }
    g.mlp_width = (use_double_wide_mlp && shared) ? 2 * intermediate_size : intermediate_size;
  }
}

Gemma4Config Gemma4Config::load(const std::filesystem::path& p) {
  auto path = std::filesystem::is_directory(p) ? p / "config.json" : p;
  std::ifstream in(path);
  if (!in) throw Error(path.string() + ": cannot open config");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: invalid JSON ({})", path.string(), e.what()));
  }
  return from_json(j, path.string());
}

json Gemma4Config::to_text_json() const {
  json t;
  t["model_type"] = "gemma4_text";
  t["vocab_size"] = vocab_size;
  t["hidden_size"] = hidden_size;
  t["intermediate_size"] = intermediate_size;
  t["num_hidden_layers"] = num_hidden_layers;
  t["num_attention_heads"] = num_attention_heads;
  t["num_key_value_heads"] = num_key_value_heads;
  t["head_dim"] = head_dim;
  t["global_head_dim"] = global_head_dim;
  t["num_global_key_value_heads"] =
      num_global_key_value_heads ? json(*num_global_key_value_heads) : json(nullptr);
  t["hidden_activation"] = hidden_activation;
  t["rms_norm_eps"] = rms_norm_eps;
  t["pad_token_id"] = pad_token_id;
  t["bos_token_id"] = bos_token_id;
  t["eos_token_id"] = eos_token_ids.size() == 1 ? json(eos_token_ids[0]) : json(eos_token_ids);
  t["tie_word_embeddings"] = tie_word_embeddings;
  t["sliding_window"] = sliding_window;
  t["final_logit_softcapping"] = final_logit_softcapping ? json(*final_logit_softcapping) : json(nullptr);
  t["vocab_size_per_layer_input"] = vocab_size_per_layer_input;
  t["hidden_size_per_layer_input"] = hidden_size_per_layer_input;
  t["attention_k_eq_v"] = attention_k_eq_v;
  t["num_kv_shared_layers"] = num_kv_shared_layers;
  t["enable_moe_block"] = enable_moe_block;
  t["use_double_wide_mlp"] = use_double_wide_mlp;
  t["num_experts"] = enable_moe_block ? json(num_experts) : json(nullptr);
  t["top_k_experts"] = enable_moe_block ? json(top_k_experts) : json(nullptr);
  if (enable_moe_block) t["moe_intermediate_size"] = moe_intermediate_size;
  t["max_position_embeddings"] = max_position_embeddings;
  t["dtype"] = dtype;
  if (per_layer_config) {
    json plc = json::object();
    for (const auto& [idx, o] : *per_layer_config) {
      json e = json::object();
      if (o.head_dim) e["head_dim"] = *o.head_dim;
      if (o.num_key_value_heads) e["num_key_value_heads"] = *o.num_key_value_heads;
      plc[std::to_string(idx)] = e;
    }
    t["per_layer_config"] = plc;
  }
  json lt = json::array();
  for (auto l : layer_types) lt.push_back(layer_type_name(l));
  t["layer_types"] = lt;
  auto rope = [](const RopeParams& r) {
    json o{{"rope_type", r.type}, {"rope_theta", r.theta}};
    if (r.type == "proportional") o["partial_rotary_factor"] = r.partial_rotary_factor;
    if (r.factor != 1.0) o["factor"] = r.factor;
    return o;
  };
  t["rope_parameters"] = {{"sliding_attention", rope(rope_sliding)}, {"full_attention", rope(rope_full)}};
  return t;
}

}  // namespace tl
