// torchless-eval: the measures of a heal for any checkpoint (train/eval/evaluate.h), and with
// --report the heal report (train/eval/report.h) comparing it with the model before.
//   torchless-eval --model DIR [--adapter DIR] [--config heal.yaml | --data FILE --type chat]
//                  [--prompts FILE] [--reference DIR] [--parent DIR] [--mc FILE] [--report [--out DIR]]
// With a parent (--parent, else the config's distill_from, upscale_from or
// eval_reference_model, else --reference) the model's KL to it and top-1 agreement with it on
// the held-out targets are measured too, and --report shows parent / before / after.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <fstream>
#include <iostream>

#include "core/chat_template.h"
#include "core/cpu/cpu_ops.h"
#include "core/output_dir.h"
#include "train/eval/evaluate.h"
#include "train/eval/generate.h"
#include "train/eval/plot.h"
#include "train/eval/report.h"
#include "train/model/preflight.h"
#include "train/train_config.h"
#include "train/trainer.h"
#include "core/cpu/thread_policy.h"

namespace fs = std::filesystem;

namespace {

struct Inputs {
  std::vector<tl::Row> rows;                  // held-out rows
  std::vector<std::vector<int32_t>> prompts;  // generation prompts
  std::vector<tl::McItem> mc;
  int64_t micro_batch = 4, max_new_tokens = 64;
};

// The measures of one model on the inputs (with a parent: its KL to it and top-1 agreement).
tl::EvalMeasures evaluate(tl::EvalModel& m, tl::Ops& ops, const Inputs& in, tl::EvalModel* reference,
                          std::vector<tl::Generation>* gens_out, tl::EvalModel* parent = nullptr) {
  tl::EvalMeasures r;
  if (!in.rows.empty()) {
    const tl::HeldOut h = tl::held_out(*m.model, parent ? parent->model.get() : nullptr, in.rows, in.micro_batch);
    r.eval_loss = h.loss.mean();
    r.perplexity = std::exp(h.loss.mean());
    if (h.parent.count > 0) {
      r.kl_parent = h.parent.kl / double(h.parent.count);
      r.top1_parent = double(h.parent.agree) / double(h.parent.count);
    }
  }
  if (!in.prompts.empty()) {
    auto gens = tl::greedy_generations(*m.model, ops, in.prompts, in.max_new_tokens, m.stop_tokens);
    tl::score_generations(r, gens);
    if (reference) r.cross_perplexity = tl::cross_perplexity(*reference->model, gens);
    if (gens_out) *gens_out = std::move(gens);
  }
  if (!in.mc.empty()) {
    const tl::McResult mc = tl::score_mc(*m.model, ops, *m.tokenizer, in.mc);
    r.mc_accuracy = mc.accuracy();
    r.mc_accuracy_norm = mc.accuracy_norm();
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);  // before any OpenMP region: see core/cpu/thread_policy.h
  CLI::App app{"torchless-eval: held-out loss, generation repetition, cross-perplexity and multiple-choice accuracy"};
  std::string model, adapter, config, data, type = "chat", prompts, reference, mc, out, before_model, parent;
  bool nf4 = false, report = false;
  int64_t table = 8;
  Inputs in;
  app.add_option("--model,-m", model, "checkpoint directory")->required();
  app.add_option("--adapter", adapter, "a PEFT LoRA adapter directory (a heal's output_dir)");
  app.add_flag("--4bit", nf4, "hold the base projections and MoE experts in NF4 (as QLoRA trains against them)");
  app.add_option("--config,-c", config, "heal.yaml: held-out set = its validation split (same seed), prompts from it");
  app.add_option("--data", data, "jsonl held out as a whole (instead of --config)");
  app.add_option("--type", type, "--data's type: chat, completion, alpaca, sharegpt");
  app.add_option("--prompts", prompts, "jsonl of {\"prompt\": …} user turns to generate from (default: held-out prompts)");
  app.add_option("--table-size", table, "held-out prompts to generate from (default 8)");
  double max_new_arg = 64;  // checked_max_new_tokens makes it a count
  app.add_option("--max-new-tokens,-n", max_new_arg, "greedy tokens per prompt (1 to the model's context)");
  app.add_option("--reference", reference, "a model to score the generations' cross-perplexity under (e.g. before surgery)");
  app.add_option("--parent", parent,
                 "the model before surgery, measured beside (default: --config's distill_from, upscale_from or "
                 "eval_reference_model, else --reference)");
  app.add_option("--mc", mc, "GPQA-style multiple-choice jsonl");
  app.add_flag("--report", report, "write the heal report (report.md, report.json, PNG plots)");
  app.add_option("--before", before_model, "--report: the model 'before' (default: --model without --adapter)");
  app.add_option("--out,-o", out, "--report: the folder to write it to (not an input; written whole, then renamed)");
  bool force = false;
  app.add_flag("--force", force, "--report: replace an existing report folder that torchless wrote");
  CLI11_PARSE(app, argc, argv);
  try {
    if (!config.empty() && !data.empty()) throw tl::Error("give --config or --data, not both");
    // Before anything is loaded: the report goes to a folder of its own that is no input, and
    // --max-new-tokens fits the model's context.
    std::vector<fs::path> inputs{model, adapter, config, data, prompts, reference, mc, before_model, parent};
    if (report && out.empty())
      throw tl::Error("--report needs --out DIR: the report is written to a folder of its own, never into the model "
                      "or adapter it reads");
    if (!out.empty() && !report) throw tl::Error("--out is where --report writes; give --report too");
    if (report) tl::refuse_overlap(out, inputs, "--out");
    const std::string config_file = (fs::path(model) / "config.json").string();
    in.max_new_tokens = tl::checked_max_new_tokens(max_new_arg, tl::Gemma4Config::load(model), config_file);
    tl::CpuOps ops(tl::DType::F32);
    tl::EvalModel m = tl::load_eval_model(model, adapter, nf4, ops);
    std::vector<tl::Example> held;
    std::string config_parent;  // the parent the heal config names
    if (!config.empty() || !data.empty()) {
      tl::TrainConfig cfg;
      if (!config.empty()) {
        cfg = tl::TrainConfig::load(config);
        // As the trainer chose it; the surgery record is the one of the model before the heal.
        config_parent = tl::parent_dir(cfg, before_model.empty() ? model : before_model).dir;
      } else {
        cfg.source = data;
        tl::DatasetConfig d;
        d.path = data;
        d.type = type;
        cfg.datasets = {d};
        cfg.sequence_len = 1024;
      }
      tl::DataStats stats;
      std::vector<tl::Example> all = tl::load_examples(cfg.data(), *m.tokenizer, stats);
      if (!config.empty()) tl::split_validation(all, held, cfg.val_set_size, cfg.seed);
      else held = all;
      in.rows = tl::make_rows(held, cfg.sequence_len, cfg.sample_packing);
      in.micro_batch = cfg.micro_batch_size;
    }
    if (!prompts.empty()) {
      if (fs::is_directory(prompts)) throw tl::Error(prompts + ": is a directory, not a prompts file");
      std::ifstream pf(prompts);
      if (!pf) throw tl::Error(prompts + ": cannot open the prompts file");
      std::string line;
      for (int64_t no = 1; std::getline(pf, line); ++no) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        if (const auto bad = tl::invalid_utf8_at(line))
          throw tl::Error(fmt::format("{}:{}: invalid UTF-8 at byte {} of the line", prompts, no, *bad + 1));
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
          throw tl::Error(fmt::format("{}:{}: not valid JSON ({})", prompts, no, e.what()));
        }
        if (!j.is_object() || !j.contains("prompt") || !j["prompt"].is_string())
          throw tl::Error(fmt::format("{}:{}: not a JSON object with a 'prompt' string", prompts, no));
        in.prompts.push_back(m.tokenizer->encode(
            tl::render_chat({{"user", j["prompt"].get<std::string>(), ""}}, {.add_generation_prompt = true})));
      }
    } else {
      for (const tl::Example& e : held) {
        if (int64_t(in.prompts.size()) == table) break;
        if (auto p = tl::generation_prompt(e, 512); !p.empty()) in.prompts.push_back(std::move(p));
      }
    }
    // Before any pass allocates: every prompt with its generation, and every held-out row, within
    // the model's context and this machine's memory.
    const tl::Gemma4Config& mcfg = m.model->config();
    for (size_t i = 0; i < in.prompts.size(); ++i) {
      const int64_t n = int64_t(in.prompts[i].size()), total = n + in.max_new_tokens;
      const std::string what = fmt::format("{} prompt {} ({} tokens + --max-new-tokens {})",
                                           prompts.empty() ? "held-out" : prompts, i + 1, n, in.max_new_tokens);
      tl::refuse_over_context(mcfg, config_file, total, what, "lower --max-new-tokens or shorten the prompt");
      tl::refuse_over_memory(tl::forward_peak_bytes(mcfg, 1, n, 4, false) + tl::kv_cache_bytes(mcfg, total, 4),
                             fmt::format("the prompt's forward pass and a cache of {} positions", total), what,
                             "lower --max-new-tokens or shorten the prompt");
    }
    int64_t longest = 0;
    for (const tl::Row& r : in.rows) longest = std::max(longest, int64_t(r.ids.size()));
    if (longest > 0) {
      const std::string what = fmt::format("a held-out row of {}", config.empty() ? data : config);
      tl::refuse_over_context(mcfg, config_file, longest, what, "lower sequence_len");
      tl::refuse_over_memory(tl::forward_peak_bytes(mcfg, in.micro_batch, longest, 4, true),
                             fmt::format("logits [{}, {}, {}]", in.micro_batch, longest, mcfg.vocab_size), what,
                             "lower sequence_len or micro_batch_size");
    }
    if (!mc.empty()) {
      in.mc = tl::load_mc_jsonl(mc);
      const auto [longest_mc, item] = tl::mc_longest_sequence(*m.tokenizer, in.mc);
      const std::string what = fmt::format("{} item {} (question and option)", mc, item + 1);
      tl::refuse_over_context(mcfg, config_file, longest_mc, what, "shorten the question or its options");
      tl::refuse_over_memory(tl::forward_peak_bytes(mcfg, 1, longest_mc, 4, true),
                             fmt::format("logits [1, {}, {}]", longest_mc, mcfg.vocab_size), what,
                             "shorten the question or its options");
    }
    std::unique_ptr<tl::EvalModel> ref;
    if (!reference.empty()) {
      // The generations are scored under the reference, whose context may be shorter.
      const tl::Gemma4Config rc = tl::Gemma4Config::load(reference);
      for (size_t i = 0; i < in.prompts.size(); ++i)
        tl::refuse_over_context(rc, (fs::path(reference) / "config.json").string(),
                                int64_t(in.prompts[i].size()) + in.max_new_tokens,
                                fmt::format("--reference: prompt {} with --max-new-tokens {}", i + 1, in.max_new_tokens),
                                "lower --max-new-tokens or shorten the prompt");
      ref = std::make_unique<tl::EvalModel>(tl::load_eval_model(reference, {}, false, ops));
    }

    const std::string parent_dir = !parent.empty() ? parent : !config_parent.empty() ? config_parent : reference;
    std::unique_ptr<tl::EvalModel> par;
    if (!parent_dir.empty()) par = std::make_unique<tl::EvalModel>(tl::load_eval_model(parent_dir, {}, nf4, ops));

    std::vector<tl::Generation> gens_after, gens_before, gens_parent;
    const tl::EvalMeasures after = evaluate(m, ops, in, ref.get(), &gens_after, par.get());
    std::cout << after.to_json().dump() << "\n";
    if (!report) return 0;

    tl::HealReport r;
    r.title = fmt::format("Report: {}", fs::path(adapter.empty() ? model : adapter).filename().string());
    const std::string before_dir = !before_model.empty() ? before_model : adapter.empty() ? "" : model;
    if (!before_dir.empty()) {
      tl::EvalModel b = tl::load_eval_model(before_dir, {}, nf4, ops);
      r.before = evaluate(b, ops, in, ref.get(), &gens_before, par.get());
      r.before_label = before_model.empty() ? "base (no adapter)" : fs::path(before_dir).filename().string();
    }
    r.after = after;
    r.after_label = adapter.empty() ? fs::path(model).filename().string() : "with the adapter";
    if (par) {
      r.has_parent = true;
      r.parent = evaluate(*par, ops, in, ref.get(), &gens_parent);
      r.parent_label = fmt::format("parent ({})", fs::path(parent_dir).filename().string());
    }
    for (size_t i = 0; i < gens_after.size() && i < 6; ++i)
      r.samples.push_back({m.tokenizer->decode(gens_after[i].prompt),
                           i < gens_before.size() ? m.tokenizer->decode(gens_before[i].tokens) : "",
                           m.tokenizer->decode(gens_after[i].tokens),
                           i < gens_parent.size() ? m.tokenizer->decode(gens_parent[i].tokens) : ""});
    fs::path metrics = fs::path(adapter.empty() ? model : adapter) / "metrics.jsonl";
    std::vector<fs::path> pngs;
    const fs::path dir = tl::write_output_dir(out, inputs, force, [&](const fs::path& tmp) {
      for (const fs::path& p : tl::write_heal_report(tmp, r, metrics)) pngs.push_back(p.filename());
    }, std::cerr);  // stdout holds the measures' JSON alone
    for (const fs::path& p : pngs) std::cerr << "plot: " << (dir / p).string() << "\n";
    if (!tl::plots_available()) std::cerr << "plots skipped: this build has no cairo\n";
    std::cerr << "report: " << (dir / "report.md").string() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "torchless-eval: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
