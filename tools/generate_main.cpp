// torchless-generate: KV-cached generation from a Gemma 4 checkpoint (optionally with a PEFT
// adapter, or its projections in NF4 as a QLoRA run sees them).
//   torchless-generate --model DIR (--prompt TEXT | --prompts IN.jsonl [--out OUT.jsonl] | --chat)
// Prompts are user turns in Gemma 4's chat format (--raw: plain text after <bos>); a prompts
// line is {"prompt": TEXT} or {"messages": [{"role", "content"}…]}; each output line is
// {"prompt", "completion", "tokens", "stopped"}.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/chat_template.h"
#include "core/cpu/cpu_ops.h"
#include "core/output_dir.h"
#include "core/safetensors.h"
#include "train/eval/evaluate.h"
#include "train/eval/generate.h"
#include "train/model/preflight.h"
#include "core/cpu/thread_policy.h"

namespace {

struct Session {
  tl::EvalModel& m;
  tl::Ops& ops;
  tl::SamplingOptions sampling;
  int64_t max_new_tokens;
  bool raw;
  std::string config_file;

  std::vector<int32_t> encode(const std::vector<tl::ChatMessage>& messages, const std::string& text) const {
    if (raw) {
      std::vector<int32_t> ids{m.tokenizer->token_id("<bos>")};
      for (int32_t t : m.tokenizer->encode(text)) ids.push_back(t);
      return ids;
    }
    return m.tokenizer->encode(tl::render_chat(messages, {.add_generation_prompt = true}));
  }
  // Before a generation allocates: the prompt and the tokens to come within the model's
  // context, and the prompt's forward pass and the cache within memory.
  void check(const std::vector<int32_t>& prompt, const std::string& what) const {
    const tl::Gemma4Config& c = m.model->config();
    const int64_t n = int64_t(prompt.size());
    tl::refuse_over_context(c, config_file, n + max_new_tokens,
                            fmt::format("{} ({} prompt tokens + --max-new-tokens {})", what, n, max_new_tokens),
                            "lower --max-new-tokens or shorten the prompt");
    tl::refuse_over_memory(tl::forward_peak_bytes(c, 1, n, 4, false) + tl::kv_cache_bytes(c, n + max_new_tokens, 4),
                           fmt::format("the prompt's forward pass and a cache of {} positions", n + max_new_tokens),
                           what, "lower --max-new-tokens or shorten the prompt");
  }
  // The completion's text without its stop token.
  std::pair<std::string, tl::GreedyResult> run(const std::vector<int32_t>& prompt) {
    tl::GreedyResult g = tl::generate(*m.model, ops, prompt, max_new_tokens, sampling, m.stop_tokens);
    std::vector<int32_t> text(g.tokens.begin(), g.tokens.end() - (g.stopped ? 1 : 0));
    return {m.tokenizer->decode(text), g};
  }
};

// Each sampling option in its range, NaN included (a NaN compares false with every bound).
void check_sampling(const tl::SamplingOptions& s) {
  auto bad = [](const char* name, double v, const char* range) {
    throw tl::Error(fmt::format("sampling options out of range: {} {} (must be {})", name, v, range));
  };
  if (!(s.temperature >= 0 && std::isfinite(s.temperature))) bad("--temperature", s.temperature, "finite and ≥ 0");
  if (!(s.top_p > 0 && s.top_p <= 1)) bad("--top-p", s.top_p, "in (0, 1]");
  if (!(s.min_p >= 0 && s.min_p < 1)) bad("--min-p", s.min_p, "in [0, 1)");
  if (!(s.repetition_penalty > 0 && std::isfinite(s.repetition_penalty)))
    bad("--repetition-penalty", s.repetition_penalty, "finite and > 0");
  if (!(s.dry_multiplier >= 0 && std::isfinite(s.dry_multiplier))) bad("--dry-multiplier", s.dry_multiplier, "finite and ≥ 0");
  if (!(s.dry_base >= 1 && std::isfinite(s.dry_base))) bad("--dry-base", s.dry_base, "finite and ≥ 1");
  if (s.top_k < 0) bad("--top-k", double(s.top_k), "≥ 0");
  if (s.dry_allowed_length < 0) bad("--dry-allowed-length", double(s.dry_allowed_length), "≥ 0");
}

std::string dump(const nlohmann::json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

}  // namespace

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);  // before any OpenMP region: see core/cpu/thread_policy.h
  CLI::App app{"torchless-generate: KV-cached generation (greedy or sampled) from a Gemma 4 checkpoint"};
  std::string model, adapter, prompt, prompts, out, system;
  bool nf4 = false, chat = false, raw = false;
  double max_new_arg = 128;  // checked_max_new_tokens makes it a count
  tl::SamplingOptions s;
  std::vector<int32_t> breakers;
  app.add_option("--model,-m", model, "checkpoint directory (config.json, safetensors, tokenizer.json)")->required();
  app.add_option("--adapter", adapter, "a PEFT LoRA adapter directory to apply");
  app.add_flag("--4bit", nf4, "hold the base projections and MoE experts in NF4 (as QLoRA trains against them)");
  auto* one = app.add_option("--prompt,-p", prompt, "one prompt (a user turn)");
  auto* many = app.add_option("--prompts", prompts, "jsonl of prompts: {\"prompt\": …} or {\"messages\": […]} per line");
  auto* interactive = app.add_flag("--chat", chat, "interactive chat in the terminal (empty line or /exit ends)");
  one->excludes(many)->excludes(interactive);
  many->excludes(interactive);
  app.add_option("--out,-o", out, "output jsonl for --prompts (default: stdout)");
  app.add_option("--system", system, "a system turn before each prompt");
  app.add_flag("--raw", raw, "plain text after <bos>, no chat format");
  app.add_option("--max-new-tokens,-n", max_new_arg, "tokens to generate at most (1 to the model's context)");
  app.add_option("--temperature,-t", s.temperature, "0: greedy (default); else sample from softmax(logits / T)");
  app.add_option("--top-k", s.top_k, "keep the k most likely tokens (0: off)");
  app.add_option("--top-p", s.top_p, "keep the most likely tokens up to this probability (1: off)");
  app.add_option("--min-p", s.min_p, "drop tokens below min-p × the top probability (0: off)");
  app.add_option("--repetition-penalty", s.repetition_penalty, "CTRL penalty on tokens already seen (1: off)");
  app.add_option("--dry-multiplier", s.dry_multiplier, "DRY penalty strength (0: off)");
  app.add_option("--dry-base", s.dry_base, "DRY: growth per repeated token");
  app.add_option("--dry-allowed-length", s.dry_allowed_length, "DRY: repeats this long go unpenalised");
  app.add_option("--dry-breaker", breakers, "DRY: token ids a repeat may not cross (newline is one by default)");
  app.add_option("--seed", s.seed, "sampling seed");
  CLI11_PARSE(app, argc, argv);
  try {
    if (prompt.empty() && prompts.empty() && !chat) throw tl::Error("give --prompt, --prompts or --chat");
    check_sampling(s);
    // Before anything is loaded: the output is no input (the model's files, the adapter's, the
    // prompts file, or a symlink to one), and --max-new-tokens fits the model's context.
    if (!out.empty()) out = tl::check_output_file(out, {model, adapter, prompts}, "--out").string();
    const std::string config_file = (std::filesystem::path(model) / "config.json").string();
    const int64_t max_new = tl::checked_max_new_tokens(max_new_arg, tl::Gemma4Config::load(model), config_file);
    tl::CpuOps ops(tl::DType::F32);
    tl::EvalModel m = tl::load_eval_model(model, adapter, nf4, ops);
    s.dry_breakers = breakers;
    if (breakers.empty())
      if (auto nl = m.tokenizer->find_token("<0x0A>")) s.dry_breakers.push_back(*nl);
    Session session{m, ops, s, max_new, raw, config_file};
    auto with_system = [&](std::vector<tl::ChatMessage> msgs) {
      if (!system.empty()) msgs.insert(msgs.begin(), {"system", system, ""});
      return msgs;
    };
    if (!prompt.empty()) {
      const auto ids = session.encode(with_system({{"user", prompt, ""}}), prompt);
      session.check(ids, "--prompt");
      std::cout << session.run(ids).first << "\n";
    } else if (!prompts.empty()) {
      if (std::filesystem::is_directory(prompts)) throw tl::Error(prompts + ": is a directory, not a prompts file");
      std::ifstream in(prompts);
      if (!in) throw tl::Error(prompts + ": cannot open the prompts file");
      // Every line is checked before any generation, so a bad line costs nothing.
      std::vector<std::pair<std::string, std::vector<int32_t>>> todo;
      std::string line;
      for (int64_t no = 1; std::getline(in, line); ++no) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        const std::string at = fmt::format("{}:{}", prompts, no);
        if (const auto bad = tl::invalid_utf8_at(line))
          throw tl::Error(fmt::format("{}: invalid UTF-8 at byte {} of the line", at, *bad + 1));
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
          throw tl::Error(fmt::format("{}: not valid JSON ({})", at, e.what()));
        }
        if (!j.is_object() ||
            !((j.contains("prompt") && j["prompt"].is_string()) || (j.contains("messages") && j["messages"].is_array())))
          throw tl::Error(at + ": not a JSON object with a 'prompt' string or a 'messages' list");
        if (j.contains("prompt")) {
          const std::string p = j["prompt"].get<std::string>();
          todo.push_back({p, session.encode(with_system({{"user", p, ""}}), p)});
        } else {
          if (raw) throw tl::Error(at + ": 'messages' needs the chat format (drop --raw)");
          const auto msgs = tl::chat_from_json(j["messages"], at);
          todo.push_back({tl::render_chat(msgs), session.encode(with_system(msgs), "")});
        }
        session.check(todo.back().second, at);
      }
      std::string body;
      for (const auto& [text, ids] : todo) {
        const auto [completion, g] = session.run(ids);
        const std::string rec = dump({{"prompt", text}, {"completion", completion}, {"tokens", g.tokens.size()},
                                      {"stopped", g.stopped}}) + "\n";
        if (out.empty()) std::cout << rec << std::flush;
        body += rec;
      }
      if (!out.empty()) tl::write_file_atomic(out, body);
    } else {
      std::vector<tl::ChatMessage> history = with_system({});
      std::string text;
      while (std::cout << "> " << std::flush, std::getline(std::cin, text) && !text.empty() && text != "/exit") {
        history.push_back({"user", text, ""});
        const auto ids = session.encode(history, text);
        session.check(ids, "the chat so far");
        const auto [reply, g] = session.run(ids);
        std::cout << reply << "\n";
        history.push_back({"assistant", reply, ""});
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "torchless-generate: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
