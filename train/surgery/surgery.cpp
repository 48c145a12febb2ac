#include "train/surgery/surgery.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/checkpoint_dir.h"
#include "core/safetensors.h"
#include "core/weights.h"

namespace tl {

namespace fs = std::filesystem;
using nlohmann::json;

LayerMap duplicate_block(int n, int begin, int end, bool identity) {
  if (begin < 0 || end > n || begin >= end)
    throw Error(fmt::format("--duplicate {}:{}: range outside the model's {} layers", begin, end, n));
  LayerMap m;
  for (int i = 0; i < end; ++i) m.push_back({i, false});
  for (int i = begin; i < end; ++i) m.push_back({i, identity});
  for (int i = end; i < n; ++i) m.push_back({i, false});
  return m;
}

LayerMap insert_identity_every(int n, int every) {
  if (every <= 0) throw Error(fmt::format("--insert-identity every={}: must be positive", every));
  LayerMap m;
  for (int i = 0; i < n; ++i) {
    m.push_back({i, false});
    if ((i + 1) % every == 0 && i + 1 < n) m.push_back({i, true});
  }
  // Nothing after the last layer (it must stay the last full-attention one): every ≥ n inserts
  // nothing, and the "expanded" model would be an unchanged copy.
  if (int(m.size()) == n)
    throw Error(fmt::format("--insert-identity every={} inserts no layer into a model of {} layers (an identity layer "
                            "goes after every {}th layer, never after the last); use every=N with N below {}",
                            every, n, every, n));
  return m;
}

LayerMap slices_map(int n, const std::string& slices) {
  LayerMap m;
  std::stringstream ss(slices);
  std::string part;
  while (std::getline(ss, part, ',')) {
    int a = 0, b = 0;
    char colon = 0;
    std::stringstream ps(part);
    if (!(ps >> a >> colon >> b) || colon != ':' || !ps.eof())
      throw Error(fmt::format("--slices: '{}' is not BEGIN:END", part));
    if (a < 0 || b > n || a >= b)
      throw Error(fmt::format("--slices: {}:{} is outside the model's {} layers", a, b, n));
    for (int i = a; i < b; ++i) m.push_back({i, false});
  }
  if (m.empty()) throw Error("--slices: no layers");
  return m;
}

Gemma4Config map_config(const Gemma4Config& c, const LayerMap& map, bool keep_kv_producers) {
  const int M = int(map.size());
  Gemma4Config out = c;
  out.num_hidden_layers = M;
  out.layer_types.clear();
  int shared = 0;
  for (int i = 0; i < M; ++i) {
    const LayerSlot& s = map[size_t(i)];
    if (s.source < 0 || s.source >= c.num_hidden_layers)
      throw Error(fmt::format("layer map: output layer {} names source layer {}, outside the model's {} layers", i,
                              s.source, c.num_hidden_layers));
    out.layer_types.push_back(c.layer_types[size_t(s.source)]);
    shared += c.layer(s.source).kv_source >= 0;
  }
  // KV-shared layers own no K/V weights: they must stay in the trailing shared block.
  const int first_shared = c.num_hidden_layers - c.num_kv_shared_layers;
  for (int i = 0; i < M; ++i) {
    const bool is_shared = c.layer(map[size_t(i)].source).kv_source >= 0;
    if (!is_shared || i >= M - shared) continue;
    int later = i + 1;  // the non-shared layer that follows it
    while (c.layer(map[size_t(later)].source).kv_source >= 0) ++later;
    throw Error(fmt::format(
        "layer map: output layer {} copies layer {}, which is KV-shared (layers {}–{} of this model read another "
        "layer's K/V and have no k_proj/v_proj of their own), but output layer {} after it copies non-shared layer "
        "{}, so output layer {} would need K/V weights that do not exist; put every slice of layers {}–{} after "
        "all slices of layers 0–{}",
        i, map[size_t(i)].source, first_shared, c.num_hidden_layers - 1, later, map[size_t(later)].source, i,
        first_shared, c.num_hidden_layers - 1, first_shared - 1));
  }
  // transformers forces the last layer to full_attention when loading (Gemma4TextConfig.
  // __post_init__); a copied sliding layer there would be run as a full one, with other
  // head sizes, so such a map is refused rather than written.
  if (out.layer_types.back() != LayerType::Full)
    throw Error(fmt::format("layer map: the last output layer copies layer {}, a sliding_attention layer; "
                            "transformers forces the last layer to full_attention, so end the map on a "
                            "full_attention layer",
                            map.back().source));
  out.num_kv_shared_layers = shared;
  if (c.per_layer_config) {
    std::map<int, LayerOverride> plc;
    for (int i = 0; i < M; ++i)
      if (auto it = c.per_layer_config->find(map[size_t(i)].source); it != c.per_layer_config->end()) plc[i] = it->second;
    out.per_layer_config = plc;
  }
  out.finalize("layer map");
  if (keep_kv_producers && shared > 0) {
    // The shared layers must keep reading the K/V of the original producer instance.
    for (int i = M - shared; i < M; ++i) {
      const int producer = out.layer(i).kv_source;
      const int original = c.layer(map[size_t(i)].source).kv_source;  // the producer it read before
      int first_slot = -1;
      for (int j = 0; j < M; ++j)
        if (map[size_t(j)].source == original && !map[size_t(j)].identity) { first_slot = j; break; }
      if (producer != first_slot)
        throw Error(fmt::format("layer map: output layer {} (source {}) would become the last {} layer before the "
                                "KV-shared layers, so they would read its K/V instead of source layer {}'s; insert "
                                "new layers before layer {}", producer, map[size_t(producer)].source,
                                layer_type_name(out.layer(i).type), original, original));
    }
  }
  return out;
}

namespace {

// Copies column block `from` of a [rows, blocks·w] tensor into column block `to` of `dst`.
void copy_block_columns(const Tensor& src, int64_t from, Tensor& dst, int64_t to, int64_t w) {
  const size_t es = dtype_size(src.dtype());
  const int64_t rows = src.dim(0), sc = src.dim(1), dc = dst.dim(1);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(static_cast<char*>(dst.raw()) + (r * dc + to * w) * es,
                static_cast<const char*>(src.raw()) + (r * sc + from * w) * es, size_t(w) * es);
}

Tensor filled(const Tensor& like, double value) {
  Tensor t = Tensor::zeros(like.shape(), DType::F64);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = value;
  return t.to(like.dtype());
}

bool zeroed_by(IdentityMode mode, const std::string& rest) {
  static const std::set<std::string> zero_out = {"self_attn.o_proj.weight", "mlp.down_proj.weight",
                                                 "experts.down_proj", "per_layer_projection.weight"};
  static const std::set<std::string> zero_post = {"post_attention_layernorm.weight", "post_feedforward_layernorm.weight",
                                                  "post_per_layer_input_norm.weight"};
  return mode == IdentityMode::ZeroOut ? zero_out.count(rest) > 0 : zero_post.count(rest) > 0;
}

}  // namespace

SurgeryReport apply_layer_map(const fs::path& src, const fs::path& out, const LayerMap& map, IdentityMode mode,
                              bool keep_kv_producers, bool force) {
  const Gemma4Config c = Gemma4Config::load(src);
  for (const auto& s : map)
    if (s.identity && mode == IdentityMode::None)
      throw Error("layer map has identity layers but no identity mode (zero-out or zero-postnorm)");
  const Gemma4Config nc = map_config(c, map, keep_kv_producers);
  Checkpoint ckpt = Checkpoint::open(src);
  // Identity layers zero weights and PLE slices columns: neither is possible on packed NF4.
  if (const std::string q = first_bnb_4bit(ckpt); !q.empty())
    throw Error(fmt::format("{}: cannot rewrite a checkpoint pre-quantized by bitsandbytes ('{}' is 4-bit); use "
                            "the full-precision model",
                            src.string(), q));
  // A source whose config contradicts its weights (a wrong hidden_size, a transposed tensor,
  // an integer dtype) would be copied into an output that looks good: refused as check does.
  check_text_decoder(c, ckpt);
  const std::string prefix = decoder_prefix(ckpt);
  const std::string layers = prefix + "layers.";
  const int64_t P = c.hidden_size_per_layer_input, M = int64_t(map.size());

  // Tensors of each source layer, by the part of the name after "layers.{j}.".
  std::map<int, std::vector<std::pair<std::string, std::string>>> by_layer;
  std::vector<NamedTensor> tensors;
  for (const std::string& name : ckpt.names()) {
    if (name.starts_with(layers)) {
      const size_t dot = name.find('.', layers.size());
      const int j = std::stoi(name.substr(layers.size(), dot - layers.size()));
      by_layer[j].push_back({name.substr(dot + 1), name});
    } else if (P > 0 && name == prefix + "embed_tokens_per_layer.weight") {
      Tensor t = ckpt.get(name), w = Tensor::zeros({t.dim(0), M * P}, t.dtype());
      for (int64_t i = 0; i < M; ++i) copy_block_columns(t, map[size_t(i)].source, w, i, P);
      tensors.push_back({name, w});
    } else if (P > 0 && name == prefix + "per_layer_model_projection.weight") {
      Tensor t = ckpt.get(name), w = Tensor::zeros({M * P, t.dim(1)}, t.dtype());
      const size_t row_block = size_t(P * t.dim(1)) * dtype_size(t.dtype());
      for (int64_t i = 0; i < M; ++i)
        std::memcpy(static_cast<char*>(w.raw()) + size_t(i) * row_block,
                    static_cast<const char*>(t.raw()) + size_t(map[size_t(i)].source) * row_block, row_block);
      tensors.push_back({name, w});
    } else {
      tensors.push_back({name, ckpt.get(name)});  // embeddings, final norm, vision/audio towers
    }
  }
  SurgeryReport report{c.num_hidden_layers, M, 0};
  for (int64_t i = 0; i < M; ++i) {
    const LayerSlot& s = map[size_t(i)];
    report.identity_layers += s.identity;
    for (const auto& [rest, name] : by_layer[s.source]) {
      Tensor t = ckpt.get(name);
      if (s.identity && rest == "layer_scalar") t = filled(t, 1.0);
      else if (s.identity && zeroed_by(mode, rest)) t = filled(t, 0.0);
      tensors.push_back({fmt::format("{}{}.{}", layers, i, rest), t});
    }
  }
  std::sort(tensors.begin(), tensors.end(), [](const NamedTensor& a, const NamedTensor& b) { return natural_less(a.name, b.name); });

  // config.json: the original with the decoder's depth fields rewritten, everything else kept.
  std::ifstream in(fs::path(src) / "config.json");
  json cfg = json::parse(in);
  json& text = cfg.contains("text_config") ? cfg["text_config"] : cfg;
  json t = nc.to_text_json();
  for (const char* k : {"num_hidden_layers", "layer_types", "num_kv_shared_layers"}) text[k] = t[k];
  if (nc.per_layer_config) {
    // HF writes the keys zero-padded to the widest index.
    json plc = json::object();
    const size_t width = std::to_string(nc.per_layer_config->empty() ? 0 : nc.per_layer_config->rbegin()->first).size();
    for (const auto& [idx, o] : *nc.per_layer_config) {
      std::string key = std::to_string(idx);
      key.insert(0, width - key.size(), '0');
      json e = json::object();
      if (o.head_dim) e["head_dim"] = *o.head_dim;
      if (o.num_key_value_heads) e["num_key_value_heads"] = *o.num_key_value_heads;
      plc[key] = e;
    }
    text["per_layer_config"] = plc;
  }
  json record = {{"tool", "torchless-surgery"}, {"source", fs::absolute(src).lexically_normal().string()},
                 {"identity_mode", mode == IdentityMode::ZeroOut ? "zero-out" : mode == IdentityMode::ZeroPostnorm ? "zero-postnorm" : "none"}};
  json lm = json::array();
  for (const auto& s : map) lm.push_back({{"source", s.source}, {"mode", s.identity ? "identity" : "copy"}});
  record["layer_map"] = lm;

  write_derived_checkpoint(src, out, force, tensors, cfg.dump(2) + "\n", "torchless_surgery.json",
                           record.dump(2) + "\n");
  return report;
}

std::optional<SurgeryRecord> read_surgery_record(const fs::path& model_dir) {
  const fs::path file = model_dir / "torchless_surgery.json";
  std::ifstream in(file);
  if (!in) return std::nullopt;
  const json j = json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw Error(fmt::format("{}: not a JSON object", file.string()));
  SurgeryRecord r;
  if (!j.contains("source") || !j["source"].is_string())
    throw Error(fmt::format("{}: no 'source' directory recorded", file.string()));
  r.source = j["source"].get<std::string>();
  if (!j.contains("layer_map") || !j["layer_map"].is_array())
    throw Error(fmt::format("{}: no 'layer_map' recorded", file.string()));
  for (size_t i = 0; i < j["layer_map"].size(); ++i) {
    const json& e = j["layer_map"][i];
    if (!e.is_object() || !e.contains("source") || !e["source"].is_number_integer() || !e.contains("mode") ||
        !e["mode"].is_string() || (e["mode"] != "copy" && e["mode"] != "identity"))
      throw Error(fmt::format("{}: layer_map[{}] is not {{\"source\": N, \"mode\": \"copy\"|\"identity\"}}",
                              file.string(), i));
    r.map.push_back({e["source"].get<int>(), e["mode"] == "identity"});
  }
  return r;
}

std::optional<std::vector<int>> parent_layer_order(const LayerMap& map, int parent_layers,
                                                   const std::vector<int>& trained, std::string& why) {
  std::vector<int> order(size_t(parent_layers), -1);
  for (int i = 0; i < int(map.size()); ++i) {
    const LayerSlot& s = map[size_t(i)];
    if (s.identity || s.source < 0 || s.source >= parent_layers || order[size_t(s.source)] >= 0) continue;
    if (std::find(trained.begin(), trained.end(), i) != trained.end()) continue;
    order[size_t(s.source)] = i;
  }
  for (int j = 0; j < parent_layers; ++j)
    if (order[size_t(j)] < 0) {
      why = fmt::format("parent layer {} has no frozen copy in the layer map", j);
      return std::nullopt;
    }
  return order;
}

}  // namespace tl
