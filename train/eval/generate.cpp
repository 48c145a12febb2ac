#include "train/eval/generate.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

namespace tl {

namespace {
int32_t argmax(const std::vector<double>& x) {
  int32_t best = 0;
  for (size_t v = 1; v < x.size(); ++v)
    if (x[v] > x[size_t(best)]) best = int32_t(v);
  return best;
}

std::vector<double> last_logits(Gemma4Model& model, Ops& ops, const Tensor& hidden) {
  const int64_t last = hidden.dim(0) - 1;
  const Tensor logits = ops.download(model.logits(hidden.slice_rows(last, last + 1))).to(DType::F64);
  std::vector<double> out(logits.data<double>(), logits.data<double>() + logits.numel());
  // A NaN in the weights (or an adapter) makes every logit NaN, and argmax of NaNs is id 0:
  // "<pad><pad>…" that looks like a generation. Say so instead.
  for (size_t v = 0; v < out.size(); ++v)
    if (!std::isfinite(out[v]))
      throw Error(fmt::format("generation: the model's logit for token {} is {} (a weight or the adapter holds a "
                              "NaN or infinity?)",
                              v, out[v]));
  return out;
}

bool is_stop(std::span<const int32_t> stop, int32_t t) { return std::find(stop.begin(), stop.end(), t) != stop.end(); }
}  // namespace

GreedyResult generate(Gemma4Model& model, Ops& ops, std::span<const int32_t> prompt, int64_t max_new_tokens,
                      const SamplingOptions& o, std::span<const int32_t> stop_tokens) {
  if (prompt.empty()) throw Error("generate: empty prompt");
  std::vector<int32_t> context(prompt.begin(), prompt.end());
  std::mt19937_64 rng(o.seed);
  KvCache cache = model.make_cache();
  GreedyResult r;
  Tensor hidden = model.forward_cached(prompt, cache);
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    std::vector<double> logits = last_logits(model, ops, hidden);
    if (o.repetition_penalty != 1.0) apply_repetition_penalty(logits, context, o.repetition_penalty);
    if (o.dry_multiplier > 0) apply_dry(logits, context, o);
    int32_t next = 0;
    if (o.temperature <= 0) {
      next = argmax(logits);
    } else {
      const std::vector<double> p = sampling_distribution(logits, o);
      next = int32_t(std::discrete_distribution<int64_t>(p.begin(), p.end())(rng));
    }
    context.push_back(next);
    r.tokens.push_back(next);
    if (is_stop(stop_tokens, next)) {
      r.stopped = true;
      break;
    }
    if (step + 1 < max_new_tokens) hidden = model.forward_cached(std::span<const int32_t>(&next, 1), cache);
  }
  return r;
}

GreedyResult greedy_generate(Gemma4Model& model, Ops& ops, std::span<const int32_t> prompt, int64_t max_new_tokens,
                             std::span<const int32_t> stop_tokens) {
  return generate(model, ops, prompt, max_new_tokens, SamplingOptions{}, stop_tokens);
}

GreedyResult greedy_generate_uncached(Gemma4Model& model, Ops& ops, std::span<const int32_t> prompt,
                                      int64_t max_new_tokens, std::span<const int32_t> stop_tokens) {
  if (prompt.empty()) throw Error("greedy_generate: empty prompt");
  std::vector<int32_t> seq(prompt.begin(), prompt.end());
  GreedyResult r;
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    Tensor ids = Tensor::zeros({1, int64_t(seq.size())}, DType::I32);
    std::copy(seq.begin(), seq.end(), ids.data<int32_t>());
    const int32_t best = argmax(last_logits(model, ops, model.forward_hidden(Batch{ids, {}, {}})));
    seq.push_back(best);
    r.tokens.push_back(best);
    if (is_stop(stop_tokens, best)) {
      r.stopped = true;
      break;
    }
  }
  return r;
}

void apply_repetition_penalty(std::vector<double>& logits, std::span<const int32_t> context, double penalty) {
  if (penalty <= 0) throw Error("repetition_penalty must be positive");
  std::set<int32_t> seen(context.begin(), context.end());
  for (int32_t t : seen) {
    if (t < 0 || size_t(t) >= logits.size()) continue;
    double& x = logits[size_t(t)];
    x = x > 0 ? x / penalty : x * penalty;
  }
}

void apply_dry(std::vector<double>& logits, std::span<const int32_t> c, const SamplingOptions& o) {
  const int64_t n = int64_t(c.size());
  if (n < 2) return;
  std::vector<int64_t> longest(logits.size(), 0);
  auto breaker = [&](int32_t t) {
    return std::find(o.dry_breakers.begin(), o.dry_breakers.end(), t) != o.dry_breakers.end();
  };
  // c[i] followed an earlier copy of the suffix: c[i−k, i) = c[n−k, n). Emitting c[i] now
  // would make that repeat k + 1 long.
  for (int64_t i = 1; i < n; ++i) {
    const int32_t follower = c[size_t(i)];
    if (breaker(follower) || follower < 0 || size_t(follower) >= logits.size()) continue;
    int64_t k = 0;
    while (k < i && !breaker(c[size_t(n - 1 - k)]) && c[size_t(i - 1 - k)] == c[size_t(n - 1 - k)]) ++k;
    longest[size_t(follower)] = std::max(longest[size_t(follower)], k);
  }
  for (size_t t = 0; t < logits.size(); ++t)
    if (longest[t] > 0 && longest[t] >= o.dry_allowed_length)
      logits[t] -= o.dry_multiplier * std::pow(o.dry_base, double(longest[t] - o.dry_allowed_length));
}

std::vector<double> sampling_distribution(const std::vector<double>& logits, const SamplingOptions& o) {
  const size_t V = logits.size();
  const double temp = o.temperature > 0 ? o.temperature : 1.0;
  std::vector<size_t> order(V);
  for (size_t i = 0; i < V; ++i) order[i] = i;
  // Most likely first; ties to the lower id.
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return logits[a] > logits[b]; });
  size_t keep = V;
  if (o.top_k > 0) keep = std::min(keep, size_t(o.top_k));
  std::vector<double> p(V, 0.0);
  // softmax(logits / T) over the `count` most likely tokens.
  auto normalise = [&](size_t count) {
    std::fill(p.begin(), p.end(), 0.0);
    const double top = logits[order[0]] / temp;
    double sum = 0;
    for (size_t j = 0; j < count; ++j) sum += p[order[j]] = std::exp(logits[order[j]] / temp - top);
    for (size_t j = 0; j < count; ++j) p[order[j]] /= sum;
  };
  normalise(keep);
  if (o.top_p < 1.0) {
    double cum = 0;
    size_t j = 0;
    while (j < keep && cum < o.top_p) cum += p[order[j++]];
    keep = std::max<size_t>(1, j);
    normalise(keep);
  }
  if (o.min_p > 0) {
    const double floor = o.min_p * p[order[0]];
    size_t j = 1;
    while (j < keep && p[order[j]] >= floor) ++j;
    keep = j;
    normalise(keep);
  }
  return p;
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
