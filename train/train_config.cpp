#include "train/train_config.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>

#include "core/tensor.h"

namespace tl {

namespace {

const std::vector<std::string> kDatasetKeys = {
    "path", "type", "field", "field_instruction", "field_input", "field_output", "field_messages",
    "message_field_role", "message_field_content", "roles_to_train"};

size_t levenshtein(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

struct Reader {
  const std::string& file;
  template <class T>
  void operator()(const YAML::Node& n, const char* key, T& out) const {
    const YAML::Node v = n[key];
    if (!v || v.IsNull()) return;
    try {
      out = v.as<T>();
    } catch (const YAML::Exception&) {
      throw Error(fmt::format("{}: key '{}' has the wrong type (got '{}')", file, key, YAML::Dump(v)));
    }
  }
};

void check_keys(const YAML::Node& n, const std::vector<std::string>& valid, const std::string& file,
                const std::string& where) {
  for (const auto& kv : n) {
    const std::string k = kv.first.as<std::string>();
    if (std::find(valid.begin(), valid.end(), k) == valid.end())
      throw Error(fmt::format("{}: unknown key '{}'{} (did you mean '{}'?)", file, k, where, nearest_key(k, valid)));
  }
}

template <class T>
void require_in(const std::string& file, const char* key, const T& v, std::initializer_list<T> allowed) {
  if (std::find(allowed.begin(), allowed.end(), v) == allowed.end()) {
    std::vector<std::string> names;
    for (const auto& a : allowed) names.push_back(fmt::format("{}", a));
    throw Error(fmt::format("{}: {} '{}' is not one of {}", file, key, v, fmt::join(names, ", ")));
  }
}

// yaml-cpp keeps both entries of a repeated key and reads the first; PyYAML (and so axolotl)
// silently keeps the last. Either way one value is ignored, so a repeat is an error.
void refuse_duplicate_keys(const YAML::Node& n, const std::string& file, const std::string& where) {
  if (n.IsMap()) {
    std::vector<std::string> seen;
    for (const auto& kv : n) {
      const std::string k = kv.first.Scalar();
      if (std::find(seen.begin(), seen.end(), k) != seen.end())
        throw Error(fmt::format("{}: key '{}' appears twice (line {})", file, where + k, kv.first.Mark().line + 1));
      seen.push_back(k);
      refuse_duplicate_keys(kv.second, file, where + k + ".");
    }
  } else if (n.IsSequence()) {
    for (size_t i = 0; i < n.size(); ++i)
      refuse_duplicate_keys(n[i], file, fmt::format("{}[{}].", where.empty() ? "" : where.substr(0, where.size() - 1), i));
  }
}

// lo <= v <= hi (or lo < v, v < hi when open); written so NaN fails every test.
void require_range(const std::string& file, const char* key, double v, double lo, double hi, bool lo_open,
                   bool hi_open, const char* why) {
  const bool ok = (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  if (!ok)
    throw Error(fmt::format("{}: {} must be in {}{}, {}{} (got {}){}", file, key, lo_open ? "(" : "[", lo,
                            std::isinf(hi) ? "inf" : fmt::format("{}", hi), hi_open ? ")" : "]", v, why));
}

// The ranges PyTorch's AdamW, transformers' TrainingArguments / schedulers and PEFT's
// LoraConfig accept (NaN is never in range), checked once the keys are read.
void check_ranges(const TrainConfig& c, const std::string& f) {
  const double inf = INFINITY;
  require_range(f, "learning_rate", c.learning_rate, 0, inf, false, true, " (torch.optim.AdamW: 0 <= lr)");
  require_range(f, "adam_beta1", c.adam_beta1, 0, 1, false, true, " (torch.optim.AdamW: 0 <= beta < 1)");
  require_range(f, "adam_beta2", c.adam_beta2, 0, 1, false, true, " (torch.optim.AdamW: 0 <= beta < 1)");
  require_range(f, "adam_epsilon", c.adam_epsilon, 0, inf, false, true, " (torch.optim.AdamW: 0 <= eps)");
  require_range(f, "weight_decay", c.weight_decay, 0, inf, false, true, " (torch.optim.AdamW: 0 <= weight_decay)");
  require_range(f, "max_grad_norm", c.max_grad_norm, 0, inf, false, true, " (0 turns clipping off)");
  require_range(f, "max_memory_gib", c.max_memory_gib, 0, inf, false, true, " (0: the device's free memory)");
  require_range(f, "warmup_ratio", c.warmup_ratio, 0, 1, false, false, " (transformers: warmup_ratio in [0, 1])");
  require_range(f, "cosine_min_lr_ratio", c.cosine_min_lr_ratio, 0, 1, false, false, " (a fraction of learning_rate)");
  require_range(f, "num_epochs", c.num_epochs, 0, inf, false, true, "");
  require_range(f, "lora_alpha", c.lora.alpha, 0, inf, true, true, " (0 would train an adapter that does nothing)");
  require_range(f, "lora_dropout", c.lora.dropout, 0, 1, false, true, " (torch.nn.Dropout: 0 <= p; 1 drops everything)");
  require_range(f, "val_set_size", c.val_set_size, 0, 1, false, true, " (a fraction of the examples)");
  for (const auto& [pattern, r] : c.lora.rank_pattern)
    if (r <= 0) throw Error(fmt::format("{}: lora_rank_pattern['{}'] must be positive (got {})", f, pattern, r));
  for (const auto& [pattern, a] : c.lora.alpha_pattern)
    if (!(a > 0 && std::isfinite(a)))
      throw Error(fmt::format("{}: lora_alpha_pattern['{}'] must be positive and finite (got {})", f, pattern, a));
  auto at_least = [&](const char* key, int64_t v, int64_t lo, const char* why) {
    if (v < lo) throw Error(fmt::format("{}: {} must be at least {} (got {}){}", f, key, lo, v, why));
  };
  at_least("max_steps", c.max_steps, 0, " (0: train num_epochs epochs)");
  at_least("warmup_steps", c.warmup_steps, 0, "");
  at_least("save_steps", c.save_steps, 0, " (0: no intermediate checkpoints)");
  at_least("save_total_limit", c.save_total_limit, 0, " (0: keep every checkpoint)");
  at_least("logging_steps", c.logging_steps, 1, "");
  at_least("eval_steps", c.eval_steps, 0, " (0: no evaluation)");
  for (int layer : c.full_train_layers) at_least("full_train_layers entry", layer, 0, "");
  require_range(f, "distill_alpha", c.distill_alpha, 0, 1, false, false, " (the KL term's weight against cross-entropy)");
  require_range(f, "distill_temperature", c.distill_temperature, 0, inf, true, true, " (softmax temperature)");
  at_least("distill_top_k", c.distill_top_k, 0, " (0: the whole vocabulary)");
}

// Data-parallel keys (docs/ddp.md); they matter only under mpirun.
void read_ddp_keys(const YAML::Node& root, const std::string& file, TrainConfig& c) {
  Reader read{file};
  read(root, "ddp_timeout", c.ddp_timeout);
  read(root, "ddp_io_timeout", c.ddp_io_timeout);
  read(root, "ddp_bucket_mb", c.ddp_bucket_mb);
  read(root, "ddp_check_sync_steps", c.ddp_check_sync_steps);
  if (!(c.ddp_timeout > 0) || !(c.ddp_io_timeout > 0))
    throw Error(file + ": ddp_timeout and ddp_io_timeout must be positive (seconds)");
  if (!(c.ddp_bucket_mb > 0)) throw Error(file + ": ddp_bucket_mb must be positive");
  if (c.ddp_check_sync_steps < 0) throw Error(file + ": ddp_check_sync_steps must be at least 0");
}

}  // namespace

const std::vector<std::string>& train_config_keys() {
  static const std::vector<std::string> keys = {
      "base_model", "adapter", "load_in_4bit", "quant_type", "double_quant", "lora_r", "lora_alpha",
      "lora_dropout", "lora_target_modules", "lora_target_linear", "use_rslora", "lora_rank_pattern",
      "lora_alpha_pattern", "full_train_layers", "sequence_len", "sample_packing", "overlong",
      "datasets", "train_on_inputs", "chat_template", "val_set_size", "micro_batch_size",
      "gradient_accumulation_steps", "num_epochs", "max_steps", "learning_rate", "lr_scheduler",
      "warmup_ratio", "warmup_steps", "cosine_min_lr_ratio", "optimizer", "weight_decay", "adam_beta1",
      "adam_beta2", "adam_epsilon", "max_grad_norm", "nan_policy", "gradient_checkpointing", "max_memory_gib", "bf16",
      "backend",
      "output_dir", "save_steps", "save_total_limit", "logging_steps", "eval_steps", "eval_table_size",
      "eval_max_new_tokens", "eval_reference_model", "eval_mc_file", "upscale_from", "upscale_slices",
      "distill_from", "distill_alpha", "distill_temperature", "distill_top_k", "seed",
      "overwrite_output_dir", "resume_from_checkpoint",
      "ddp_timeout", "ddp_io_timeout", "ddp_bucket_mb", "ddp_check_sync_steps"};
  return keys;
}

std::string nearest_key(const std::string& key, const std::vector<std::string>& valid) {
  std::string best;
  size_t best_d = SIZE_MAX;
  for (const auto& v : valid) {
    size_t d = levenshtein(key, v);
    if (d < best_d) best_d = d, best = v;
  }
  return best;
}

TrainConfig TrainConfig::load(const std::filesystem::path& yaml, const std::vector<std::string>& overrides) {
  const std::string file = yaml.string();
  YAML::Node root;
  try {
    root = YAML::LoadFile(file);
  } catch (const YAML::BadFile&) {
    throw Error(file + ": cannot open");
  } catch (const YAML::Exception& e) {
    throw Error(fmt::format("{}: invalid YAML at line {}: {}", file, e.mark.line + 1, e.msg));
  }
  if (!root.IsMap()) throw Error(file + ": expected a mapping of keys to values");
  refuse_duplicate_keys(root, file, "");
  for (const auto& o : overrides) {
    auto eq = o.find('=');
    if (eq == std::string::npos || eq == 0) throw Error(fmt::format("override '{}' is not key=value", o));
    const std::string k = o.substr(0, eq);
    const auto& valid = train_config_keys();
    if (std::find(valid.begin(), valid.end(), k) == valid.end())
      throw Error(fmt::format("override: unknown key '{}' (did you mean '{}'?)", k, nearest_key(k, valid)));
    try {
      root[k] = YAML::Load(o.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      throw Error(fmt::format("override '{}': invalid value ({})", o, e.msg));
    }
  }
  check_keys(root, train_config_keys(), file, "");
  TrainConfig c;
  c.source = yaml;
  Reader read{file};
  read(root, "base_model", c.base_model);
  if (c.base_model.empty()) throw Error(file + ": missing required key 'base_model'");
  read(root, "adapter", c.adapter);
  require_in<std::string>(file, "adapter", c.adapter, {"qlora", "lora", "full"});
  c.load_in_4bit = c.adapter == "qlora";
  read(root, "load_in_4bit", c.load_in_4bit);
  if (c.load_in_4bit && c.adapter != "qlora")
    throw Error(fmt::format("{}: load_in_4bit needs adapter 'qlora' (got '{}')", file, c.adapter));
  std::string quant_type = "nf4";
  read(root, "quant_type", quant_type);
  require_in<std::string>(file, "quant_type", quant_type, {"nf4"});
  read(root, "double_quant", c.double_quant);

  read(root, "lora_r", c.lora.r);
  read(root, "lora_alpha", c.lora.alpha);
  read(root, "lora_dropout", c.lora.dropout);
  read(root, "use_rslora", c.lora.use_rslora);
  read(root, "lora_rank_pattern", c.lora.rank_pattern);
  read(root, "lora_alpha_pattern", c.lora.alpha_pattern);
  if (c.lora.r <= 0) throw Error(fmt::format("{}: lora_r must be positive (got {})", file, c.lora.r));
  if (c.lora.dropout < 0 || c.lora.dropout >= 1) throw Error(fmt::format("{}: lora_dropout must be in [0, 1)", file));
  bool target_linear = false;
  read(root, "lora_target_linear", target_linear);
  if (const YAML::Node t = root["lora_target_modules"]; t && !t.IsNull()) {
    if (t.IsScalar()) c.lora.target_regex = t.as<std::string>();
    else read(root, "lora_target_modules", c.lora.target_modules);
    if (target_linear) throw Error(file + ": give either lora_target_modules or lora_target_linear, not both");
  } else if (!target_linear && c.adapter != "full") {
    c.lora.target_modules = {"all-linear"};  // the default, as lora_target_linear: true
  }
  read(root, "full_train_layers", c.full_train_layers);

  read(root, "sequence_len", c.sequence_len);
  if (c.sequence_len < 2) throw Error(file + ": sequence_len must be at least 2");
  read(root, "sample_packing", c.sample_packing);
  read(root, "overlong", c.overlong);
  require_in<std::string>(file, "overlong", c.overlong, {"truncate", "drop"});
  read(root, "train_on_inputs", c.train_on_inputs);
  std::string chat_template = "gemma4";
  read(root, "chat_template", chat_template);
  require_in<std::string>(file, "chat_template", chat_template, {"gemma4", "tokenizer_default"});
  read(root, "val_set_size", c.val_set_size);
  if (c.val_set_size < 0 || c.val_set_size >= 1) throw Error(file + ": val_set_size must be in [0, 1)");

  const YAML::Node ds = root["datasets"];
  if (!ds || !ds.IsSequence() || ds.size() == 0) throw Error(file + ": 'datasets' must be a non-empty list");
  for (size_t i = 0; i < ds.size(); ++i) {
    const YAML::Node d = ds[i];
    const std::string where = fmt::format(" in datasets[{}]", i);
    if (!d.IsMap()) throw Error(fmt::format("{}: datasets[{}] must be a mapping with 'path' and 'type'", file, i));
    check_keys(d, kDatasetKeys, file, where);
    DatasetConfig dc;
    read(d, "path", dc.path);
    if (dc.path.empty()) throw Error(fmt::format("{}: datasets[{}] has no 'path'", file, i));
    read(d, "type", dc.type);
    require_in<std::string>(file, "type", dc.type, {"completion", "text", "alpaca", "chat", "chat_template", "sharegpt"});
    if (dc.type == "sharegpt") {
      dc.field_messages = "conversations";
      dc.message_field_role = "from";
      dc.message_field_content = "value";
    }
    read(d, "field", dc.field);
    read(d, "field_instruction", dc.field_instruction);
    read(d, "field_input", dc.field_input);
    read(d, "field_output", dc.field_output);
    read(d, "field_messages", dc.field_messages);
    read(d, "message_field_role", dc.message_field_role);
    read(d, "message_field_content", dc.message_field_content);
    read(d, "roles_to_train", dc.roles_to_train);
    // Relative dataset paths are relative to the YAML file.
    if (std::filesystem::path(dc.path).is_relative()) dc.path = (yaml.parent_path() / dc.path).lexically_normal().string();
    c.datasets.push_back(dc);
  }

  read(root, "micro_batch_size", c.micro_batch_size);
  read(root, "gradient_accumulation_steps", c.gradient_accumulation_steps);
  read(root, "num_epochs", c.num_epochs);
  read(root, "max_steps", c.max_steps);
  if (c.micro_batch_size < 1 || c.gradient_accumulation_steps < 1)
    throw Error(file + ": micro_batch_size and gradient_accumulation_steps must be at least 1");
  if (c.max_steps <= 0 && c.num_epochs <= 0) throw Error(file + ": set num_epochs or max_steps");
  read(root, "learning_rate", c.learning_rate);
  read(root, "lr_scheduler", c.lr_scheduler);
  require_in<std::string>(file, "lr_scheduler", c.lr_scheduler, {"cosine", "linear", "constant", "constant_with_warmup"});
  read(root, "warmup_ratio", c.warmup_ratio);
  read(root, "warmup_steps", c.warmup_steps);
  read(root, "cosine_min_lr_ratio", c.cosine_min_lr_ratio);
  read(root, "optimizer", c.optimizer);
  require_in<std::string>(file, "optimizer", c.optimizer, {"adamw", "adamw_torch", "adamw_torch_fused"});
  read(root, "weight_decay", c.weight_decay);
  read(root, "adam_beta1", c.adam_beta1);
  read(root, "adam_beta2", c.adam_beta2);
  read(root, "adam_epsilon", c.adam_epsilon);
  read(root, "max_grad_norm", c.max_grad_norm);
  read(root, "nan_policy", c.nan_policy);
  require_in<std::string>(file, "nan_policy", c.nan_policy, {"skip", "stop"});
  read(root, "gradient_checkpointing", c.gradient_checkpointing);
  std::transform(c.gradient_checkpointing.begin(), c.gradient_checkpointing.end(), c.gradient_checkpointing.begin(),
                 [](unsigned char ch) { return char(std::tolower(ch)); });
  require_in<std::string>(file, "gradient_checkpointing", c.gradient_checkpointing, {"auto", "true", "false"});
  read(root, "max_memory_gib", c.max_memory_gib);
  read(root, "bf16", c.bf16);
  read(root, "backend", c.backend);
  require_in<std::string>(file, "backend", c.backend, {"auto", "cpu", "cuda"});
  read(root, "output_dir", c.output_dir);
  if (std::filesystem::path(c.output_dir).is_relative())
    c.output_dir = (yaml.parent_path() / c.output_dir).lexically_normal().string();
  read(root, "save_steps", c.save_steps);
  read(root, "save_total_limit", c.save_total_limit);
  read(root, "logging_steps", c.logging_steps);
  read(root, "eval_steps", c.eval_steps);
  read(root, "eval_table_size", c.eval_table_size);
  read(root, "eval_max_new_tokens", c.eval_max_new_tokens);
  if (c.eval_table_size < 0 || c.eval_max_new_tokens < 1)
    throw Error(file + ": eval_table_size must be at least 0 and eval_max_new_tokens at least 1");
  if (c.eval_table_size > 0 && c.val_set_size <= 0)
    throw Error(file + ": eval_table_size takes its prompts from the validation split; set val_set_size");
  // Read signed first: yaml-cpp would wrap "-1" into a huge unsigned seed.
  int64_t seed = int64_t(c.seed);
  if (root["seed"] && !root["seed"].IsNull() && root["seed"].Scalar().starts_with("-")) {
    read(root, "seed", seed);
    throw Error(fmt::format("{}: seed must be at least 0 (got {})", file, seed));
  }
  read(root, "eval_reference_model", c.eval_reference_model);
  read(root, "eval_mc_file", c.eval_mc_file);
  read(root, "upscale_from", c.upscale_from);
  read(root, "upscale_slices", c.upscale_slices);
  if (c.upscale_from.empty() != c.upscale_slices.empty())
    throw Error(file + ": upscale_from and upscale_slices go together (the model to damage and its slices)");
  read(root, "distill_from", c.distill_from);
  read(root, "distill_alpha", c.distill_alpha);
  read(root, "distill_temperature", c.distill_temperature);
  read(root, "distill_top_k", c.distill_top_k);
  if (c.distill_from.empty())
    for (const char* k : {"distill_alpha", "distill_temperature", "distill_top_k"})
      if (root[k] && !root[k].IsNull())
        throw Error(fmt::format("{}: {} has no effect without distill_from (the parent's directory, or auto)", file, k));
  // Paths relative to the YAML file, as base_model.
  if (c.distill_from != "auto" && !c.distill_from.empty() && std::filesystem::path(c.distill_from).is_relative())
    c.distill_from = (yaml.parent_path() / c.distill_from).lexically_normal().string();
  for (std::string* p : {&c.eval_reference_model, &c.eval_mc_file, &c.upscale_from})
    if (!p->empty() && std::filesystem::path(*p).is_relative())
      *p = (yaml.parent_path() / *p).lexically_normal().string();
  if (!c.upscale_from.empty() && std::filesystem::path(c.base_model).is_relative())
    c.base_model = (yaml.parent_path() / c.base_model).lexically_normal().string();
  read(root, "seed", c.seed);
  read(root, "overwrite_output_dir", c.overwrite_output_dir);
  read(root, "resume_from_checkpoint", c.resume_from_checkpoint);
  read_ddp_keys(root, file, c);
  if (std::filesystem::path(c.base_model).is_relative() && std::filesystem::exists(yaml.parent_path() / c.base_model))
    c.base_model = (yaml.parent_path() / c.base_model).lexically_normal().string();
  check_ranges(c, file);
  return c;
}

}  // namespace tl
