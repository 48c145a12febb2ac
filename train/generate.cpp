#include "train/generate.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

namespace tl {

GreedyResult greedy_generate(Gemma4Model& model, Ops& ops, std::span<const int32_t> prompt, int64_t max_new_tokens,
                             std::span<const int32_t> stop_tokens) {
  if (prompt.empty()) throw Error("greedy_generate: empty prompt");
  std::vector<int32_t> seq(prompt.begin(), prompt.end());
  GreedyResult r;
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    Tensor ids = Tensor::zeros({1, int64_t(seq.size())}, DType::I32);
    std::copy(seq.begin(), seq.end(), ids.data<int32_t>());
    const Tensor hidden = model.forward_hidden(Batch{ids, {}, {}});
    const int64_t last = hidden.dim(0) - 1;
    const Tensor logits = ops.download(model.logits(hidden.slice_rows(last, last + 1)));
    int32_t best = 0;
    double best_value = logits.get(0);
    for (int64_t v = 1; v < logits.numel(); ++v)
      if (const double x = logits.get(v); x > best_value) best_value = x, best = int32_t(v);
    seq.push_back(best);
    r.tokens.push_back(best);
    if (std::find(stop_tokens.begin(), stop_tokens.end(), best) != stop_tokens.end()) {
      r.stopped = true;
      break;
    }
  }
  return r;
}

double repetition_rate(std::span<const int32_t> tokens, int n) {
  if (n < 1) throw Error("repetition_rate: n must be at least 1");
  if (int64_t(tokens.size()) < n) return 0.0;
  std::set<std::vector<int32_t>> seen;
  const size_t total = tokens.size() - size_t(n) + 1;
  for (size_t i = 0; i < total; ++i) seen.emplace(tokens.begin() + i, tokens.begin() + i + n);
  return 1.0 - double(seen.size()) / double(total);
}

std::vector<int32_t> generation_prompt(const Example& e, int64_t max_len) {
  const int64_t n = int64_t(e.ids.size());
  if (n < 2 || max_len < 1) return {};
  int64_t end = 0;
  while (end < n && e.labels[size_t(end)] == -100) ++end;
  if (end == 0) end = std::min<int64_t>(64, n / 2);  // nothing masked: continue the text's first half
  if (end == n) return {};                          // nothing trained: no reference continuation
  const int64_t begin = std::max<int64_t>(0, end - max_len);
  return {e.ids.begin() + begin, e.ids.begin() + end};
}

std::vector<int32_t> stop_tokens_for(const std::filesystem::path& model_dir, const Tokenizer& tok) {
  std::vector<int32_t> out;
  auto add = [&](int64_t id) {
    if (id >= 0 && id < tok.vocab_size() && std::find(out.begin(), out.end(), id) == out.end())
      out.push_back(int32_t(id));
  };
  for (const char* file : {"generation_config.json", "config.json"}) {
    const auto path = model_dir / file;
    if (!std::filesystem::exists(path)) continue;
    std::ifstream in(path);
    const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) throw Error(path.string() + ": not valid JSON");
    const auto eos = j.value("eos_token_id", nlohmann::json());
    if (eos.is_number_integer()) add(eos.get<int64_t>());
    if (eos.is_array())
      for (const auto& id : eos)
        if (id.is_number_integer()) add(id.get<int64_t>());
  }
  for (const char* name : {"<eos>", "<turn|>"})
    if (auto id = tok.find_token(name)) add(*id);
  return out;
}

}  // namespace tl
