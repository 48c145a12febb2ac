// Gemma4Config: every field of HF's Gemma4TextConfig that shapes the text decoder, read from
// a `config.json` that is either nested (`model_type: gemma4`, decoder under `text_config`)
// or plain (`model_type: gemma4_text`), validated, with the per-layer geometry derived once.
#pragma once
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace tl {

enum class LayerType { Sliding, Full };
const char* layer_type_name(LayerType t);  // "sliding_attention" / "full_attention"

struct RopeParams {
  std::string type = "default";  // "default" | "proportional"
  double theta = 10000.0;
  double partial_rotary_factor = 1.0;
  double factor = 1.0;  // inv_freq is divided by it
};

// One entry of HF's `per_layer_config` (transformers >= 5.x): overrides for one layer.
struct LayerOverride {
  std::optional<int64_t> head_dim;
  std::optional<int64_t> num_key_value_heads;
};

// What one decoder layer looks like, derived from the config (gemma4.md §3, §4).
struct LayerGeometry {
  LayerType type = LayerType::Sliding;
  int64_t head_dim = 0;       // 256-like on sliding layers, 512-like on full layers
  int64_t num_kv_heads = 0;
  bool k_eq_v = false;        // full layer of a K=V model: no v_proj, V is the raw K
  int kv_source = -1;         // -1: computes its own K/V; else the layer whose K/V it reuses
  int64_t mlp_width = 0;      // dense MLP intermediate size (double-wide on shared layers)
  RopeParams rope;
};

struct Gemma4Config {
  int64_t vocab_size = 262144;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 256;
  int64_t global_head_dim = 512;
  std::optional<int64_t> num_global_key_value_heads;
  std::string hidden_activation = "gelu_pytorch_tanh";
  double rms_norm_eps = 1e-6;
  int64_t pad_token_id = 0, bos_token_id = 2;
  std::vector<int64_t> eos_token_ids{1};
  bool tie_word_embeddings = true;
  RopeParams rope_sliding{"default", 1e4, 1.0};
  RopeParams rope_full{"proportional", 1e6, 0.25};
  int64_t sliding_window = 512;
  std::vector<LayerType> layer_types;
  std::optional<double> final_logit_softcapping;
  int64_t vocab_size_per_layer_input = 262144;
  int64_t hidden_size_per_layer_input = 0;  // P; 0 disables per-layer embeddings
  bool attention_k_eq_v = false;
  int64_t num_kv_shared_layers = 0;
  bool enable_moe_block = false;
  bool use_double_wide_mlp = false;
  int64_t num_experts = 0, top_k_experts = 0, moe_intermediate_size = 0;
  int64_t max_position_embeddings = 131072;
  std::string dtype = "bfloat16";

  // HF's `per_layer_config` by layer index, when the file had one. Newer transformers
  // writes it instead of global_head_dim / num_global_key_value_heads; when present it is
  // the source of truth for per-layer head dims and KV heads.
  std::optional<std::map<int, LayerOverride>> per_layer_config;

  // Whether the file's layer_types ended on a sliding layer, which transformers (and so we)
  // turn into full_attention at load.
  bool forced_full_last_layer = false;

  // Whether the file was the multimodal wrapper (tensors under `model.language_model.`).
  bool nested = false;

  static Gemma4Config from_json(const nlohmann::json& j, const std::string& label);
  static Gemma4Config load(const std::filesystem::path& config_json_or_dir);

  // The decoder config as HF's Gemma4TextConfig serialises it (for writing config.json
  // after surgery).
  nlohmann::json to_text_json() const;

  bool has_ple() const { return hidden_size_per_layer_input > 0; }
  int first_kv_shared_layer() const { return int(num_hidden_layers - num_kv_shared_layers); }
  const LayerGeometry& layer(int i) const { return layers_.at(size_t(i)); }
  const std::vector<LayerGeometry>& layers() const { return layers_; }

  // Recompute `layers_` and check consistency; throws tl::Error naming the key at fault.
  void finalize(const std::string& label);

 private:
  std::vector<LayerGeometry> layers_;
};

}  // namespace tl
