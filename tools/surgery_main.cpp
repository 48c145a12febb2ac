// torchless-surgery: inspect and reshape Gemma 4 checkpoints.
//   plan     parameter counts and weight memory, from a checkpoint directory or a config.json
//   convert  copy a checkpoint to another dtype and/or shard size
//   expand   identity layer inserts / block duplication;  upscale  passthrough slices
#include <CLI/CLI.hpp>
#include <yaml-cpp/yaml.h>
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "core/checkpoint_dir.h"
#include "core/config.h"
#include "train/surgery/init_model.h"
#include "train/surgery/llama_cpp.h"
#include "core/output_dir.h"
#include "train/surgery/surgery.h"
#include "core/safetensors.h"
#include "train/data/data.h"
#include "train/surgery/inspect.h"
#include "train/surgery/prune.h"
#include "core/plan.h"
#include "core/tensor.h"
#include "core/weights.h"
#include "core/cpu/thread_policy.h"

namespace fs = std::filesystem;

namespace {
// The layer map a recipe (configs/recipe-*.yaml) describes: `duplicate: [BEGIN, END]`,
// `insert_identity_every: N` or `slices: "A:B,C:D"`.
tl::LayerMap recipe_layer_map(const YAML::Node& r, int n, const std::string& file) {
  if (r["duplicate"]) {
    auto d = r["duplicate"].as<std::vector<int>>();
    if (d.size() != 2) throw tl::Error(file + ": duplicate must be [BEGIN, END]");
    return tl::duplicate_block(n, d[0], d[1], true);
  }
  if (r["insert_identity_every"]) return tl::insert_identity_every(n, r["insert_identity_every"].as<int>());
  if (r["slices"]) return tl::slices_map(n, r["slices"].as<std::string>());
  throw tl::Error(file + ": no layer map (duplicate, insert_identity_every or slices)");
}
}  // namespace

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);  // before any OpenMP region: see core/cpu/thread_policy.h
  CLI::App app{"torchless-surgery: plan, expand, upscale and prune Gemma 4 checkpoints"};
  app.require_subcommand(1);

  std::vector<std::string> plan_inputs;
  auto* plan = app.add_subcommand("plan", "Print parameter counts by component and weight memory "
                                          "(bf16 and NF4) for checkpoints or config.json files");
  std::string plan_recipe;
  plan->add_option("inputs", plan_inputs, "checkpoint directories or config.json files");
  plan->add_option("--recipe", plan_recipe, "a surgery recipe (configs/recipe-*.yaml): plan the model it makes");

  std::string conv_src, conv_out, conv_dtype = "keep", conv_shard = "5GB";
  bool conv_force = false;
  auto* convert = app.add_subcommand("convert", "Copy a checkpoint with its float tensors in another "
                                                "dtype and/or resharded (written atomically)");
  convert->add_option("src", conv_src, "source checkpoint directory")->required();
  convert->add_option("out", conv_out, "output directory (must not exist unless --force)")->required();
  convert->add_option("--dtype", conv_dtype, "bf16, f16, f32 or keep")
      ->check(CLI::IsMember({"bf16", "f16", "f32", "keep"}));
  convert->add_option("--max-shard-size", conv_shard, "largest shard, e.g. 5GB, 500MB, 2GiB");
  convert->add_flag("--force", conv_force, "replace an existing output directory");

  std::vector<std::string> check_dirs;
  auto* check = app.add_subcommand("check", "Validate checkpoint directories: config.json, every "
                                            "safetensors file, and each text-decoder tensor's "
                                            "presence and shape, and whether llama.cpp "
                                            "runs its KV-sharing layout");
  check->add_option("dirs", check_dirs, "checkpoint directories (or bare config.json files: config and layout only)")->required();
  bool check_llama = false;
  check->add_flag("--require-llama-cpp", check_llama, "fail (exit 1) on a KV-sharing layout llama.cpp cannot run");

  std::string init_cfg, init_out, init_copy;
  uint64_t init_seed = 0;
  double init_std = 0.02;
  bool init_force = false;
  auto* init = app.add_subcommand("init", "Write a freshly initialised checkpoint (bf16) for a config.json");
  init->add_option("config", init_cfg, "config.json (gemma4 or gemma4_text)")->required()->check(CLI::ExistingFile);
  init->add_option("out", init_out, "output directory")->required();
  init->add_option("--seed", init_seed, "random seed");
  init->add_option("--std", init_std, "standard deviation of projections and embeddings (HF initializer_range)");
  init->add_option("--copy-from", init_copy, "directory whose tokenizer and template files to copy");
  init->add_flag("--force", init_force, "replace an existing output directory");

  std::string ex_src, ex_out, ex_dup, ex_every, ex_mode = "zero-out";
  bool ex_force = false;
  auto* expand = app.add_subcommand("expand", "Insert layers that start as exact identities (block duplication or "
                                              "identity inserts); logits are unchanged until healed");
  expand->add_option("src", ex_src, "source checkpoint directory")->required();
  expand->add_option("out", ex_out, "output directory")->required();
  expand->add_option("--duplicate", ex_dup, "BEGIN:END: insert identity copies of layers [BEGIN, END) after END-1");
  expand->add_option("--insert-identity", ex_every, "every=N: an identity copy after every N layers");
  expand->add_option("--identity-mode", ex_mode, "zero-out (o_proj, down_proj, experts' down_proj, "
                                                 "per_layer_projection = 0) or zero-postnorm (post-norm weights = 0)")
      ->check(CLI::IsMember({"zero-out", "zero-postnorm"}));
  expand->add_flag("--force", ex_force, "replace an existing output directory");
  bool ex_llama = false;
  expand->add_flag("--require-llama-cpp", ex_llama, "refuse a map whose KV-sharing layout llama.cpp cannot run");
  std::string ex_recipe;
  expand->add_option("--recipe", ex_recipe, "a recipe YAML with duplicate / insert_identity_every (and identity_mode)");

  std::string up_src, up_out, up_slices;
  bool up_force = false;
  auto* upscale = app.add_subcommand("upscale", "Passthrough re-sequencing of layer slices (PLE widened along)");
  upscale->add_option("src", up_src, "source checkpoint directory")->required();
  upscale->add_option("out", up_out, "output directory")->required();
  std::string up_recipe;
  upscale->add_option("--slices", up_slices, "e.g. 0:18,10:26,18:34,26:42 (each BEGIN:END, END exclusive)");
  upscale->add_option("--recipe", up_recipe, "a recipe YAML with slices");
  upscale->add_flag("--force", up_force, "replace an existing output directory");
  bool up_llama = false;
  upscale->add_flag("--require-llama-cpp", up_llama, "refuse slices whose KV-sharing layout llama.cpp cannot run");

  std::string pr_src, pr_out, pr_jsonl, pr_ids, pr_type = "chat", pr_method = "coverage";
  int64_t pr_keep = 0, pr_protect = 16, pr_max_tokens = 4096;
  bool pr_force = false;
  auto* prune = app.add_subcommand("prune", "Prune MoE experts by their contribution on calibration data");
  prune->add_option("src", pr_src, "source checkpoint directory")->required();
  prune->add_option("out", pr_out, "output directory")->required();
  prune->add_option("--keep", pr_keep, "experts kept per layer")->required();
  prune->add_option("--protect", pr_protect, "experts protected per calibration sample and layer (coverage)");
  prune->add_option("--method", pr_method, "coverage, reap or frequency")->check(CLI::IsMember({"coverage", "reap", "frequency"}));
  prune->add_option("--calibration", pr_jsonl, "calibration jsonl (prompt + reference answer), tokenized with the model's tokenizer.json");
  prune->add_option("--type", pr_type, "calibration jsonl type: chat, alpaca, sharegpt or completion");
  prune->add_option("--calibration-ids", pr_ids, "pre-tokenized calibration: safetensors with input_ids [N, S]");
  prune->add_option("--max-tokens", pr_max_tokens, "truncate each calibration sample to this many tokens");
  prune->add_flag("--force", pr_force, "replace an existing output directory");

  std::string in_model, in_adapter, in_text;
  auto* inspect = app.add_subcommand("inspect", "Per-layer diagnostics of a (healed) model: inserted layers, "
                                                "norms of weights that started at zero, LoRA |B|, residual contribution");
  inspect->add_option("model", in_model, "checkpoint directory")->required();
  inspect->add_option("--adapter", in_adapter, "a PEFT LoRA adapter for the model (LoRA |B| per module)");
  inspect->add_option("--text", in_text, "sample text, one sample per line, for ‖out − in‖ / ‖in‖ per layer");

  CLI11_PARSE(app, argc, argv);
  try {
    if (*plan && !plan_recipe.empty()) {
      YAML::Node r = YAML::LoadFile(plan_recipe);
      const fs::path base_cfg = fs::path(plan_recipe).parent_path() / r["base_config"].as<std::string>();
      auto cfg = tl::Gemma4Config::load(base_cfg);
      const std::string op = r["operation"].as<std::string>();
      tl::Gemma4Config out = cfg;
      const int n = int(cfg.num_hidden_layers);
      if (op == "expand" || op == "upscale") {
        out = tl::map_config(cfg, recipe_layer_map(r, n, plan_recipe), op == "expand");
      } else if (op == "prune") {
        out.num_experts = r["keep"].as<int64_t>();
        out.finalize(plan_recipe);
      } else {
        throw tl::Error(plan_recipe + ": operation '" + op + "' is not expand, upscale or prune");
      }
      std::cout << tl::format_plan(cfg, tl::plan_model(cfg), "before: " + base_cfg.lexically_normal().string())
                << tl::format_plan(out, tl::plan_model(out), "after " + op + ": " + plan_recipe)
                << tl::llama_cpp_kv_summary(out) << "\n" << std::flush;
    }
    if (*plan && plan_recipe.empty() && plan_inputs.empty()) throw tl::Error("plan: give config files, directories or --recipe");
    if (*plan) {
      for (const auto& in : plan_inputs) {
        fs::path p(in);
        if (!fs::exists(p)) throw tl::Error(in + ": no such file or directory");
        if (fs::is_directory(p) && !fs::exists(p / "config.json"))
          throw tl::Error(in + ": directory has no config.json");
        auto cfg = tl::Gemma4Config::load(p);
        std::cout << tl::format_plan(cfg, tl::plan_model(cfg), in) << tl::llama_cpp_kv_summary(cfg) << "\n"
                  << std::flush;
      }
    }
    if (*check) {
      for (const auto& dir : check_dirs) {
        auto cfg = tl::Gemma4Config::load(dir);
        if (fs::is_regular_file(dir)) {  // a bare config.json (e.g. a released model's): no weights to check
          std::cout << fmt::format("{}: config ok ({} layers; no weights checked)\n{}: {}\n", dir,
                                   cfg.num_hidden_layers, dir, tl::llama_cpp_kv_summary(cfg));
          if (check_llama && !tl::llama_cpp_kv_problem(cfg).empty())
            throw tl::Error(dir + ": " + tl::llama_cpp_kv_summary(cfg));
          continue;
        }
        auto ckpt = tl::Checkpoint::open(dir);
        int64_t n = tl::check_text_decoder(cfg, ckpt, /*allow_bnb_4bit=*/true);
        const bool bnb = !tl::first_bnb_4bit(ckpt).empty();
        std::cout << fmt::format("{}: ok ({} text-decoder tensors, {} tensors in all{})\n{}: {}\n", dir, n,
                                 ckpt.names().size(),
                                 bnb ? "; projections pre-quantized by bitsandbytes: QLoRA and inference only, "
                                       "no merge or surgery"
                                     : "",
                                 dir, tl::llama_cpp_kv_summary(cfg));
        if (check_llama && !tl::llama_cpp_kv_problem(cfg).empty())
          throw tl::Error(dir + "/config.json: " + tl::llama_cpp_kv_summary(cfg));
      }
    }
    if (*init) {
      auto cfg = tl::Gemma4Config::load(init_cfg);
      tl::init_checkpoint(cfg, init_out, init_seed, init_std, init_force, {init_cfg}, init_copy);
      std::cout << fmt::format("wrote {}\n{}\n", init_out, tl::llama_cpp_kv_summary(cfg));
    }
    if (*expand) {
      auto cfg = tl::Gemma4Config::load(ex_src);
      const int n = int(cfg.num_hidden_layers);
      if (int(!ex_dup.empty()) + int(!ex_every.empty()) + int(!ex_recipe.empty()) != 1)
        throw tl::Error("expand: give exactly one of --duplicate, --insert-identity or --recipe");
      tl::LayerMap map;
      if (!ex_recipe.empty()) {
        YAML::Node r = YAML::LoadFile(ex_recipe);
        map = recipe_layer_map(r, n, ex_recipe);
        if (r["identity_mode"]) ex_mode = r["identity_mode"].as<std::string>();
        if (ex_mode != "zero-out" && ex_mode != "zero-postnorm")
          throw tl::Error(ex_recipe + ": identity_mode '" + ex_mode + "' is not zero-out or zero-postnorm");
      } else if (!ex_dup.empty()) {
        auto colon = ex_dup.find(':');
        if (colon == std::string::npos) throw tl::Error("--duplicate " + ex_dup + ": expected BEGIN:END");
        map = tl::duplicate_block(n, std::stoi(ex_dup.substr(0, colon)), std::stoi(ex_dup.substr(colon + 1)), true);
      } else {
        if (!ex_every.starts_with("every=")) throw tl::Error("--insert-identity " + ex_every + ": expected every=N");
        map = tl::insert_identity_every(n, std::stoi(ex_every.substr(6)));
      }
      const tl::Gemma4Config ex_cfg = tl::map_config(cfg, map, true);
      if (ex_llama && !tl::llama_cpp_kv_problem(ex_cfg).empty())
        throw tl::Error("expand (--require-llama-cpp): " + tl::llama_cpp_kv_summary(ex_cfg));
      auto r = tl::apply_layer_map(ex_src, ex_out, map,
                                   ex_mode == "zero-out" ? tl::IdentityMode::ZeroOut : tl::IdentityMode::ZeroPostnorm,
                                   true, ex_force);
      std::cout << fmt::format("{} → {} layers ({} identity) written to {}\n{}\n", r.layers_in, r.layers_out,
                               r.identity_layers, ex_out, tl::llama_cpp_kv_summary(ex_cfg));
    }
    if (*upscale) {
      auto cfg = tl::Gemma4Config::load(up_src);
      if (up_slices.empty() == up_recipe.empty()) throw tl::Error("upscale: give exactly one of --slices or --recipe");
      auto map = up_recipe.empty() ? tl::slices_map(int(cfg.num_hidden_layers), up_slices)
                                   : recipe_layer_map(YAML::LoadFile(up_recipe), int(cfg.num_hidden_layers), up_recipe);
      const tl::Gemma4Config up_cfg = tl::map_config(cfg, map, false);
      if (up_llama && !tl::llama_cpp_kv_problem(up_cfg).empty())
        throw tl::Error("upscale (--require-llama-cpp): " + tl::llama_cpp_kv_summary(up_cfg));
      auto r = tl::apply_layer_map(up_src, up_out, map, tl::IdentityMode::None, false, up_force);
      std::cout << fmt::format("{} → {} layers written to {}\n{}\n", r.layers_in, r.layers_out, up_out,
                               tl::llama_cpp_kv_summary(up_cfg));
    }
    if (*prune) {
      tl::refuse_overlap(pr_out, {pr_src, pr_jsonl, pr_ids}, "output");
      if (pr_jsonl.empty() == pr_ids.empty()) throw tl::Error("prune: give exactly one of --calibration or --calibration-ids");
      std::vector<std::vector<int32_t>> calib;
      if (!pr_ids.empty()) {
        tl::Tensor ids = tl::SafetensorsFile::open(pr_ids).get("input_ids").to(tl::DType::I32);
        if (ids.rank() != 2) throw tl::Error(pr_ids + ": input_ids must be [N, S]");
        for (int64_t r = 0; r < ids.dim(0); ++r)
          calib.emplace_back(ids.data<int32_t>() + r * ids.dim(1), ids.data<int32_t>() + (r + 1) * ids.dim(1));
      } else {
        tl::DataConfig tc;
        tc.datasets = {tl::DatasetConfig{}};
        tc.datasets[0].path = pr_jsonl;
        tc.datasets[0].type = pr_type;
        if (pr_type == "sharegpt") {
          tc.datasets[0].field_messages = "conversations";
          tc.datasets[0].message_field_role = "from";
          tc.datasets[0].message_field_content = "value";
        }
        tc.sequence_len = pr_max_tokens;
        tc.overlong = "truncate";
        tl::DataStats stats;
        auto tok = tl::Tokenizer::load((fs::path(pr_src) / "tokenizer.json").string());
        for (auto& e : tl::load_examples(tc, tok, stats)) calib.push_back(std::move(e.ids));
      }
      tl::PruneOptions po{pr_keep, pr_protect, pr_method, pr_force};
      auto r = tl::prune_experts(pr_src, pr_out, calib, po);
      std::cout << fmt::format("pruned to {} experts per layer from {} samples ({} routed tokens, {} skipped as "
                               "non-finite); drop map in {}/expert_drop_map.json\n{}\n",
                               pr_keep, r.samples, r.routed_tokens, r.skipped_tokens, pr_out,
                               tl::llama_cpp_kv_summary(tl::Gemma4Config::load(pr_out)));
    }
    if (*inspect) {
      std::vector<std::vector<int32_t>> samples;
      if (!in_text.empty()) {
        auto tok = tl::Tokenizer::load((fs::path(in_model) / "tokenizer.json").string());
        std::ifstream in(in_text);
        if (!in) throw tl::Error(in_text + ": cannot open");
        std::string line;
        while (std::getline(in, line))
          if (!line.empty()) {
            std::vector<int32_t> ids{tok.token_id("<bos>")};
            auto body = tok.encode(line);
            ids.insert(ids.end(), body.begin(), body.end());
            samples.push_back(std::move(ids));
          }
      }
      std::cout << tl::format_inspection(tl::inspect_model(in_model, in_adapter, samples)) << std::flush;
    }
    if (*convert) {
      std::optional<tl::DType> dt;
      if (conv_dtype == "bf16") dt = tl::DType::BF16;
      else if (conv_dtype == "f16") dt = tl::DType::F16;
      else if (conv_dtype == "f32") dt = tl::DType::F32;
      auto conv_cfg = tl::Gemma4Config::load(conv_src);  // refuse what is not a Gemma 4 checkpoint
      tl::convert_checkpoint(conv_src, conv_out, dt, tl::parse_size(conv_shard), conv_force);
      std::cout << fmt::format("wrote {}\n{}\n", conv_out, tl::llama_cpp_kv_summary(conv_cfg));
    }
  } catch (const std::exception& e) {
    std::cerr << "torchless-surgery: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
