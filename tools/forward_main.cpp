// torchless-forward: run the Gemma 4 text decoder on the CPU and print the loss (and, given
// a reference record, how far the logits are from it); with --output, write what it computed
// so that other engines (transformers, llama.cpp) can be compared without a program.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "core/chat_template.h"
#include "core/output_dir.h"
#include "core/cpu/cpu_ops.h"
#include "core/tokenizer.h"
#include "core/safetensors.h"
#include "tools/backend.h"
#include "train/model/gemma4_model.h"
#include "train/model/preflight.h"
#include "core/cpu/thread_policy.h"

namespace {

// logprobs[b, t] = logits[b, t, x] − log Σ_v exp(logits[b, t, v]) with x = input_ids[b, t+1]:
// the log-probability the model gives the token that follows, summed in double with the max
// subtracted first (log-sum-exp), so −mean over a row's targets is the causal-LM loss.
void write_output(const std::string& path, const tl::Tensor& ids, const tl::Tensor& logits, tl::DType dt,
                  const std::map<std::string, std::string>& metadata) {
  const int64_t B = ids.dim(0), S = ids.dim(1), V = logits.dim(1);
  tl::Tensor lp = tl::Tensor::zeros({B, S > 0 ? S - 1 : 0}, tl::DType::F64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < S; ++t) {
      const int64_t row = (b * S + t) * V, next = int64_t(ids.get(b * S + t + 1));
      if (next < 0 || next >= V)
        throw tl::Error(fmt::format("{}: input_ids[{}, {}] = {} is outside the vocabulary of {}", path, b, t + 1,
                                    next, V));
      double mx = -INFINITY, sum = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, logits.get(row + v));
      for (int64_t v = 0; v < V; ++v) sum += std::exp(logits.get(row + v) - mx);
      lp.data<double>()[b * (S - 1) + t] = logits.get(row + next) - mx - std::log(sum);
    }
  tl::write_safetensors(path, {{"input_ids", ids.to(tl::DType::I64)},
                               {"logits", logits.view({B, S, V}).to(dt)},
                               {"logprobs", lp.to(dt)}},
                        metadata);
}

// The input file as strictly as the loaders read checkpoints: input_ids [B, S] of an integer
// dtype with every id in the vocabulary; labels the same shape, ids or -100; reference
// logits exactly [B, S, vocab]; loss one float. Anything else would be truncated, compared
// as a flat prefix, or index out of range.
void check_record(const tl::SafetensorsFile& rec, const std::string& file, int64_t vocab) {
  auto fail = [&](const std::string& what) { throw tl::Error(file + ": " + what); };
  auto is_int = [](tl::DType d) { return d == tl::DType::I32 || d == tl::DType::I64; };
  if (!rec.contains("input_ids")) fail("no tensor 'input_ids'");
  const tl::TensorEntry& ids = rec.entry("input_ids");
  if (!is_int(ids.dtype))
    fail(fmt::format("tensor 'input_ids' has dtype {}, expected I64 or I32", tl::dtype_name(ids.dtype)));
  if (ids.shape.size() != 2 || ids.shape[0] < 1 || ids.shape[1] < 1)
    fail(fmt::format("tensor 'input_ids' has shape {}, expected [batch, sequence]", tl::shape_str(ids.shape)));
  auto check_ids = [&](const char* name, bool allow_ignore) {
    const tl::Tensor t = rec.get(name).to(tl::DType::I64);
    for (int64_t i = 0; i < t.numel(); ++i) {
      const int64_t v = t.data<int64_t>()[i];
      if ((v < 0 || v >= vocab) && !(allow_ignore && v == -100))
        fail(fmt::format("tensor '{}' holds {} at flat index {}, outside the vocabulary [0, {}){}", name, v, i, vocab,
                         allow_ignore ? " and not -100" : ""));
    }
  };
  check_ids("input_ids", false);
  if (rec.contains("labels")) {
    const tl::TensorEntry& l = rec.entry("labels");
    if (!is_int(l.dtype)) fail(fmt::format("tensor 'labels' has dtype {}, expected I64 or I32", tl::dtype_name(l.dtype)));
    if (l.shape != ids.shape)
      fail(fmt::format("tensor 'labels' has shape {} but input_ids {}", tl::shape_str(l.shape), tl::shape_str(ids.shape)));
    check_ids("labels", true);
  }
  if (rec.contains("logits")) {
    const tl::TensorEntry& g = rec.entry("logits");
    const tl::Shape want{ids.shape[0], ids.shape[1], vocab};
    if (!tl::dtype_is_float(g.dtype)) fail(fmt::format("tensor 'logits' has dtype {}, expected a float type", tl::dtype_name(g.dtype)));
    if (g.shape != want)
      fail(fmt::format("tensor 'logits' has shape {}, expected {} (input_ids and the vocabulary)", tl::shape_str(g.shape),
                       tl::shape_str(want)));
  }
  if (rec.contains("loss")) {
    const tl::TensorEntry& l = rec.entry("loss");
    if (!tl::dtype_is_float(l.dtype) || tl::shape_numel(l.shape) != 1)
      fail(fmt::format("tensor 'loss' is {} {}, expected one float", tl::dtype_name(l.dtype), tl::shape_str(l.shape)));
    if (!rec.contains("labels")) fail("tensor 'loss' given without 'labels'");
  }
}
}  // namespace

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);  // before any OpenMP region: see core/cpu/thread_policy.h
  CLI::App app{"torchless-forward: Gemma 4 forward pass and loss on the CPU"};
  std::string model_dir, input, text_file, chat_file, dtype = "f32", backend_name = "auto";
  app.add_option("--model", model_dir, "checkpoint directory (config.json + safetensors)")->required();
  auto* in_opt = app.add_option("--input", input,
                                "safetensors with input_ids [B,S] (and optionally labels, logits, loss to compare)");
  auto* text_opt = app.add_option("--text", text_file,
                                  "a text file, encoded with the model's tokenizer.json as it is (no <bos> added; "
                                  "special tokens written in the text are parsed)");
  auto* chat_opt = app.add_option("--chat", chat_file,
                                  "a JSON array of chat messages, rendered with the Gemma 4 chat template and a "
                                  "generation prompt, then encoded");
  in_opt->excludes(text_opt, chat_opt);
  text_opt->excludes(chat_opt);
  app.add_option("--dtype", dtype, "activation dtype: f32 or f64")->check(CLI::IsMember({"f32", "f64"}));
  app.add_option("--backend", backend_name, "where the model runs: auto (the GPU when there is one), cpu, cuda");
  std::string output;
  app.add_option("--output", output,
                 "write a safetensors file (atomically) with input_ids [B,S], logits [B,S,V] and logprobs "
                 "[B,S-1] (log-probability of each next input token), in the activation dtype; with --text "
                 "or --chat the encoded text is in its metadata under \"text\"");
  CLI11_PARSE(app, argc, argv);
  try {
    if (input.empty() && text_file.empty() && chat_file.empty())
      throw tl::Error("give one of --input, --text or --chat");
    auto t0 = std::chrono::steady_clock::now();
    const tl::DType act = dtype == "f64" ? tl::DType::F64 : tl::DType::F32;
    // The output is checked before any work: it must not be, or lie in, an input (the model's
    // weights or tokenizer, the input file, a symlink to either).
    if (!output.empty())
      output = tl::check_output_file(output, {model_dir, input, text_file, chat_file}, "--output").string();
    // fp32 products (no bf16): this tool checks logits against references to 1e-5.
    tl::Backend backend = tl::make_backend(tl::parse_backend(backend_name, "--backend"), {act, false});
    std::cout << fmt::format("backend {}\n", backend.description);
    tl::Ops& ops = *backend.ops;
    auto cfg = tl::Gemma4Config::load(model_dir);
    const std::string config_file = (std::filesystem::path(model_dir) / "config.json").string();
    std::optional<tl::SafetensorsFile> rec;
    std::string text, source;
    tl::Tensor ids;
    if (!input.empty()) {
      source = "--input " + input;
      rec = tl::SafetensorsFile::open(input);
      check_record(*rec, input, cfg.vocab_size);
      ids = rec->get("input_ids").to(tl::DType::I32);
    } else {
      const std::string& file = text_file.empty() ? chat_file : text_file;
      source = (text_file.empty() ? "--chat " : "--text ") + file;
      if (std::filesystem::is_directory(file)) throw tl::Error(file + ": is a directory, not a file");
      std::ifstream in(file, std::ios::binary);
      if (!in) throw tl::Error(file + ": cannot open");
      text.assign(std::istreambuf_iterator<char>(in), {});
      if (!chat_file.empty()) {
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(text);
        } catch (const std::exception& e) {
          throw tl::Error(fmt::format("{}: not JSON ({})", file, e.what()));
        }
        tl::ChatOptions opt;
        opt.add_generation_prompt = true;
        text = tl::render_chat(tl::chat_from_json(j, file), opt);
      }
      auto tok = tl::Tokenizer::load((std::filesystem::path(model_dir) / "tokenizer.json").string());
      auto v = tok.encode(text);
      if (v.empty()) throw tl::Error(file + ": encodes to no tokens");
      ids = tl::Tensor::zeros({1, int64_t(v.size())}, tl::DType::I64);
      for (size_t k = 0; k < v.size(); ++k) ids.data<int64_t>()[k] = v[k];
    }
    // Before the model and the pass allocate: the model's context, and the pass's memory (the
    // logits of every position, a converted copy with --output, the reference's with logits).
    const int64_t B = ids.dim(0), S = ids.dim(1);
    tl::refuse_over_context(cfg, config_file, S, source, "shorten the input");
    const int copies = 1 + int(!output.empty()) + int(rec && rec->contains("logits"));
    tl::refuse_over_memory(tl::forward_peak_bytes(cfg, B, S, int64_t(tl::dtype_size(act)), true, copies),
                           fmt::format("{}logits [{}, {}, {}] in {}, attention over {} positions",
                                       copies > 1 ? fmt::format("{} copies of the ", copies) : "", B, S, cfg.vocab_size,
                                       dtype, S),
                           source, "shorten the input");
    tl::Gemma4Model model(cfg, ops);
    model.load(tl::Checkpoint::open(model_dir));
    tl::Batch batch{ids, {}, {}};
    tl::Tensor hidden = model.forward_hidden(batch);
    tl::Tensor logits = model.logits(hidden);
    if (!output.empty())
      write_output(output, batch.ids, logits, act,
                   rec ? std::map<std::string, std::string>{{"format", "pt"}}
                       : std::map<std::string, std::string>{{"format", "pt"}, {"text", text}});
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << fmt::format("model {}: {} layers, batch {}x{}, {:.2f} s\n", model_dir,
                             cfg.num_hidden_layers, batch.ids.dim(0), batch.ids.dim(1), secs);
    if (rec && rec->contains("labels")) {
      auto loss = model.loss(hidden, rec->get("labels").to(tl::DType::I32));
      std::cout << fmt::format("loss {:.7f} over {} targets", loss.mean(), loss.count);
      if (rec->contains("loss")) std::cout << fmt::format("  (reference {:.7f})", rec->get("loss").get(0));
      std::cout << "\n";
    }
    if (rec && rec->contains("logits")) {
      tl::Tensor ref = rec->get("logits");
      double maxdiff = 0, maxref = 0;
      for (int64_t i = 0; i < ref.numel(); ++i) {
        maxdiff = std::max(maxdiff, std::abs(logits.get(i) - ref.get(i)));
        maxref = std::max(maxref, std::abs(ref.get(i)));
      }
      std::cout << fmt::format("logits max|diff| {:.3g} (max|ref| {:.3g}, relative {:.3g})\n", maxdiff,
                               maxref, maxdiff / maxref);
    }
  } catch (const std::exception& e) {
    std::cerr << "torchless-forward: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
