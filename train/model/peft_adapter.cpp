#include "train/model/peft_adapter.h"

#include <fmt/format.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <cmath>
#include <regex>

#include "core/safetensors.h"
#include "core/weights.h"
#include "train/model/lora.h"

namespace tl {

using nlohmann::json;

namespace {
std::string module_of(const std::string& weight) { return weight.substr(0, weight.size() - 7); }  // drop ".weight"

// PEFT's check_target_module_exists: a string is a regex matched against the whole name;
// a list matches a name equal to an entry or ending in "." + entry; "all-linear" matches
// every projection (our adapters hold nothing else).
bool targets_module(const LoraSpec& s, const std::string& path) {
  if (s.target_regex) {
    try {
      return std::regex_match(path, std::regex(*s.target_regex));
    } catch (const std::regex_error&) {
      throw Error(fmt::format("target_modules '{}' is not a valid regular expression", *s.target_regex));
    }
  }
  if (s.target_modules.size() == 1 && s.target_modules[0] == "all-linear") return true;
  for (const auto& t : s.target_modules)
    if (path == t || path.ends_with("." + t)) return true;
  return false;
}

}  // namespace

std::vector<std::string> select_lora_targets(const Gemma4Config& c, const LoraSpec& spec,
                                             const std::string& decoder_prefix) {
  std::vector<std::string> out;
  const bool all_linear = !spec.target_regex && spec.target_modules.size() == 1 &&
                          spec.target_modules[0] == "all-linear";
  std::optional<std::regex> re;
  if (spec.target_regex) {
    try {
      re.emplace(*spec.target_regex);
    } catch (const std::regex_error& e) {
      throw Error(fmt::format("lora_target_modules: '{}' is not a valid regular expression", *spec.target_regex));
    }
  }
  for (const WeightSpec& w : text_decoder_weights(c)) {
    if (!w.is_linear) continue;  // 2-D projections only; the tied head is never a target
    const std::string module = decoder_prefix + module_of(w.name);
    bool take = false;
    if (all_linear) take = true;
    else if (re) take = std::regex_match(module, *re);
    else
      for (const auto& t : spec.target_modules)
        if (module == t || module.ends_with("." + t)) take = true;
    if (take) out.push_back(w.name);
  }
  if (out.empty())
    throw Error(fmt::format("lora_target_modules {} match no projection of the text decoder",
                            spec.target_regex ? *spec.target_regex : json(spec.target_modules).dump()));
  return out;
}

std::string peft_key(const std::string& weight, const std::string& decoder_prefix, char which) {
  return fmt::format("base_model.model.{}{}.lora_{}.weight", decoder_prefix, module_of(weight), which);
}

void write_peft_adapter(const std::filesystem::path& dir, const LoraSpec& spec,
                        const std::vector<AdapterTensors>& adapters, const std::string& decoder_prefix) {
  std::filesystem::create_directories(dir);
  // The fields PEFT's LoraConfig writes; json objects keep keys sorted, as PEFT's
  // json.dumps(sort_keys=True, indent=2) does.
  json cfg = {{"alpha_pattern", spec.alpha_pattern},
              {"auto_mapping", nullptr},
              {"base_model_name_or_path", spec.base_model_name_or_path},
              {"bias", "none"},
              {"fan_in_fan_out", false},
              {"inference_mode", true},
              {"init_lora_weights", true},
              {"layer_replication", nullptr},
              {"layers_pattern", nullptr},
              {"layers_to_transform", nullptr},
              {"lora_alpha", spec.alpha},
              {"lora_bias", false},
              {"lora_dropout", spec.dropout},
              {"modules_to_save", nullptr},
              {"peft_type", "LORA"},
              {"r", spec.r},
              {"rank_pattern", spec.rank_pattern},
              {"revision", nullptr},
              {"task_type", "CAUSAL_LM"},
              {"use_dora", false},
              {"use_rslora", spec.use_rslora}};
  // Write the resolved module list, so PEFT targets exactly what was trained.
  std::vector<std::string> modules;
  for (const auto& a : adapters) modules.push_back(decoder_prefix + module_of(a.weight));
  cfg["target_modules"] = modules;
  std::vector<NamedTensor> tensors;
  for (const auto& a : adapters) {
    tensors.push_back({peft_key(a.weight, decoder_prefix, 'A'), a.A});
    tensors.push_back({peft_key(a.weight, decoder_prefix, 'B'), a.B});
  }
  write_safetensors(dir / "adapter_model.safetensors", tensors);
  write_file_atomic(dir / "adapter_config.json", cfg.dump(2));
}

PeftAdapter read_peft_adapter(const std::filesystem::path& dir) {
  const auto cfg_path = dir / "adapter_config.json";
  std::ifstream in(cfg_path);
  if (!in) throw Error(cfg_path.string() + ": cannot open");
  json cfg;
  try {
    cfg = json::parse(in);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: invalid JSON ({})", cfg_path.string(), e.what()));
  }
  // Anything else has no keys: every setting would silently take its default.
  if (!cfg.is_object())
    throw Error(fmt::format("{}: is a JSON {}, not an object of LoRA settings (r, lora_alpha, target_modules, …)",
                            cfg_path.string(), cfg.type_name()));
  PeftAdapter out;
  LoraSpec& s = out.spec;
  auto get = [&](const char* k, auto& v) {
    if (cfg.contains(k) && !cfg[k].is_null()) {
      try {
        cfg[k].get_to(v);
      } catch (const json::exception&) {
        throw Error(fmt::format("{}: key '{}' has the wrong type", cfg_path.string(), k));
      }
    }
  };
  std::string peft_type = "LORA";
  get("peft_type", peft_type);
  if (peft_type != "LORA") throw Error(fmt::format("{}: peft_type '{}' is not LORA", cfg_path.string(), peft_type));
  get("r", s.r);
  get("lora_alpha", s.alpha);
  get("lora_dropout", s.dropout);
  get("use_rslora", s.use_rslora);
  get("rank_pattern", s.rank_pattern);
  get("alpha_pattern", s.alpha_pattern);
  get("base_model_name_or_path", s.base_model_name_or_path);
  bool dora = false;
  get("use_dora", dora);
  if (dora) throw Error(cfg_path.string() + ": DoRA adapters (use_dora) are not supported");
  if (cfg.contains("target_modules") && cfg["target_modules"].is_string()) s.target_regex = cfg["target_modules"].get<std::string>();
  else get("target_modules", s.target_modules);

  auto file = SafetensorsFile::open(dir / "adapter_model.safetensors");
  std::map<std::string, AdapterTensors> by_module;
  std::map<std::string, std::string> module_paths;  // module -> the prefix its key carries
  static const std::regex key_re(R"(base_model\.model\.(model\.language_model\.|model\.)(.+)\.lora_([AB])\.weight)");
  for (const auto& e : file.entries()) {
    std::smatch m;
    if (!std::regex_match(e.name, m, key_re))
      throw Error(fmt::format("{}: tensor '{}' is not a LoRA A/B weight of the text decoder",
                              (dir / "adapter_model.safetensors").string(), e.name));
    auto& a = by_module[m[2].str()];
    module_paths[m[2].str()] = m[1].str();
    a.weight = m[2].str() + ".weight";
    Tensor t = file.get(e.name).clone();  // host copy in the file's dtype
    // A NaN or infinity would reach every logit (generation then emits id 0, <pad>, silently)
    // or every merged weight.
    if (dtype_is_float(t.dtype()))
      for (int64_t i = 0; i < t.numel(); ++i)
        if (!std::isfinite(t.get(i)))
          throw Error(fmt::format("{}: tensor '{}' holds {} at flat index {}; a LoRA weight must be finite",
                                  (dir / "adapter_model.safetensors").string(), e.name, t.get(i), i));
    (m[3] == "A" ? a.A : a.B) = std::move(t);
  }
  if (!(s.alpha > 0 && std::isfinite(s.alpha)) || s.r <= 0)
    throw Error(fmt::format("{}: r {} and lora_alpha {} must be positive (and finite)", cfg_path.string(), s.r, s.alpha));
  const std::string file_name = (dir / "adapter_model.safetensors").string();
  for (auto& [module, a] : by_module) {
    if (!a.A.defined() || !a.B.defined())
      throw Error(fmt::format("{}: module '{}' has lora_{} but not lora_{}", file_name,
                              module, a.A.defined() ? 'A' : 'B', a.A.defined() ? 'B' : 'A'));
    // The module as PEFT names it ("model.language_model.layers.0.self_attn.q_proj"), for
    // target_modules and rank_pattern, which PEFT matches against that name.
    const std::string path = module_paths.at(module) + module;
    if (!targets_module(s, path))
      throw Error(fmt::format("{}: holds '{}', which target_modules {} in adapter_config.json does not name", file_name,
                              path, s.target_regex ? *s.target_regex : json(s.target_modules).dump()));
    if (a.A.rank() != 2 || a.B.rank() != 2 || a.A.dim(0) != a.B.dim(1))
      throw Error(fmt::format("{}: '{}' has lora_A {} and lora_B {}, which are not [r, in] and [out, r]", file_name, path,
                              shape_str(a.A.shape()), shape_str(a.B.shape())));
    if (a.A.dim(0) != s.rank_for(path))
      throw Error(fmt::format("{}: '{}' has rank {} (lora_A {}), but adapter_config.json gives it r {}; merging would "
                              "use the wrong scale lora_alpha/r",
                              file_name, path, a.A.dim(0), shape_str(a.A.shape()), s.rank_for(path)));
    out.adapters.push_back(std::move(a));
  }
  return out;
}

}  // namespace tl
