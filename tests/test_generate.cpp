// KV-cached greedy decoding against transformers' generate(do_sample=False) on the tiny golden
// checkpoints (fixture: scripts/golden/make_generate_golden.py) and against step-by-step full
// forwards, the cached prefill against transformers' logits (make_mc_golden.py), and the
// sampling filters against hand-computed distributions.
#include <cmath>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/cpu/cpu_ops.h"
#include "golden_util.h"
#include "train/eval/generate.h"
#include "train/eval/text_measures.h"

namespace tl {
namespace {

nlohmann::json greedy_record() { return nlohmann::json::parse(test::slurp(test::golden("generate/greedy.json"))); }

std::unique_ptr<Gemma4Model> golden_model(const std::string& variant, Ops& ops) {
  const std::string dir = test::golden(variant);
  auto model = std::make_unique<Gemma4Model>(Gemma4Config::load(dir), ops);
  model->load(Checkpoint::open(dir));
  return model;
}

class GreedyGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(GreedyGolden, TokensMatchTransformersGenerate) {
  const auto record = greedy_record();
  CpuOps ops(DType::F32);
  const auto model = golden_model(GetParam(), ops);
  const auto& cases = record.at("variants").at(GetParam());
  ASSERT_FALSE(cases.empty());
  for (const auto& c : cases) {
    const auto prompt = c.at("prompt").get<std::vector<int32_t>>();
    const auto want = c.at("generated").get<std::vector<int32_t>>();
    GreedyResult r = greedy_generate(*model, ops, prompt, int64_t(want.size()));
    EXPECT_EQ(r.tokens, want) << "prompt of " << prompt.size() << " tokens";
    EXPECT_FALSE(r.stopped);
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, GreedyGolden, ::testing::Values("dense_kv", "e2b", "e4b", "moe"));

TEST(Greedy, StopsOnAStopToken) {
  const auto record = greedy_record();
  const auto& c = record.at("variants").at("e4b").at(0);
  const auto prompt = c.at("prompt").get<std::vector<int32_t>>();
  const auto want = c.at("generated").get<std::vector<int32_t>>();
  CpuOps ops(DType::F32);
  const auto model = golden_model("e4b", ops);
  // Stop on the third token HF produced: generation ends there, the stop token included.
  const std::vector<int32_t> stop{want[2]};
  const size_t first = size_t(std::find(want.begin(), want.end(), want[2]) - want.begin());
  GreedyResult r = greedy_generate(*model, ops, prompt, 16, stop);
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.tokens, std::vector<int32_t>(want.begin(), want.begin() + long(first) + 1));
  EXPECT_THROW(greedy_generate(*model, ops, {}, 4), Error);
}

Tensor last_row_logits(Gemma4Model& model, Ops& ops, const Tensor& hidden) {
  const int64_t last = hidden.dim(0) - 1;
  return ops.download(model.logits(hidden.slice_rows(last, last + 1)));
}

// The cache against full forwards step by step: every step's logits, and the tokens. With the
// sliding window cut to 3 the ring wraps many times within the generation.
class CacheVsFull : public ::testing::TestWithParam<std::tuple<std::string, int64_t>> {};

TEST_P(CacheVsFull, SameLogitsEveryStep) {
  const auto [variant, window] = GetParam();
  CpuOps ops(DType::F32);
  Gemma4Config config = Gemma4Config::load(test::golden(variant));
  if (window > 0) config.sliding_window = window;
  Gemma4Model model(config, ops);
  model.load(Checkpoint::open(test::golden(variant)));
  const auto record = greedy_record();
  for (const auto& c : record.at("variants").at(variant)) {
    std::vector<int32_t> seq = c.at("prompt").get<std::vector<int32_t>>();
    KvCache cache = model.make_cache();
    Tensor hidden = model.forward_cached(seq, cache);
    for (int step = 0; step < 24; ++step) {
      Tensor ids = Tensor::zeros({1, int64_t(seq.size())}, DType::I32);
      std::copy(seq.begin(), seq.end(), ids.data<int32_t>());
      const Tensor full = last_row_logits(model, ops, model.forward_hidden(Batch{ids, {}, {}}));
      const Tensor cached = last_row_logits(model, ops, hidden);
      const auto d = test::compare(cached, full);
      ASSERT_LE(d.max_abs, 1e-5 * d.max_ref) << variant << " window " << config.sliding_window << " step " << step;
      int32_t next = 0;
      for (int64_t v = 1; v < full.numel(); ++v)
        if (full.get(v) > full.get(next)) next = int32_t(v);
      seq.push_back(next);
      hidden = model.forward_cached(std::span<const int32_t>(&next, 1), cache);
    }
    EXPECT_EQ(cache.length, int64_t(seq.size()));
    const auto prompt = c.at("prompt").get<std::vector<int32_t>>();
    EXPECT_EQ(greedy_generate(model, ops, prompt, 24).tokens, greedy_generate_uncached(model, ops, prompt, 24).tokens);
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, CacheVsFull,
                         ::testing::Combine(::testing::Values("dense_kv", "e2b", "e4b", "moe"),
                                            ::testing::Values(int64_t(0), int64_t(3))));

// The first step's logits (the cached prefill) against transformers, whole and in two pieces.
TEST_P(GreedyGolden, CachedPrefillMatchesTransformersLogits) {
  const auto record = nlohmann::json::parse(test::slurp(test::golden("mc/options.json")));
  CpuOps ops(DType::F32);
  const auto model = golden_model(GetParam(), ops);
  for (const auto& item : record.at("variants").at(GetParam())) {
    const auto context = item.at("context").get<std::vector<int32_t>>();
    const auto want = item.at("last_logits_fp32").get<std::vector<double>>();
    Tensor ref = Tensor::zeros({int64_t(want.size())}, DType::F64);
    std::copy(want.begin(), want.end(), ref.data<double>());
    KvCache whole = model->make_cache();
    auto d = test::compare(last_row_logits(*model, ops, model->forward_cached(context, whole)), ref);
    EXPECT_LE(d.max_abs, 1e-5 * d.max_ref) << "context of " << context.size();
    KvCache split = model->make_cache();
    const size_t half = context.size() / 2;
    model->forward_cached(std::span<const int32_t>(context).first(half), split);
    d = test::compare(last_row_logits(*model, ops, model->forward_cached(std::span<const int32_t>(context).subspan(half), split)), ref);
    EXPECT_LE(d.max_abs, 1e-5 * d.max_ref) << "context of " << context.size() << " in two pieces";
  }
}

TEST(Sampling, FiltersMatchHandComputedDistributions) {
  // logits ln 4, ln 3, ln 2, ln 1: softmax 0.4, 0.3, 0.2, 0.1.
  const std::vector<double> logits{std::log(4.0), std::log(3.0), std::log(2.0), 0.0};
  SamplingOptions o;
  o.temperature = 1.0;
  auto near = [](const std::vector<double>& got, const std::vector<double>& want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-12) << "token " << i;
  };
  near(sampling_distribution(logits, o), {0.4, 0.3, 0.2, 0.1});
  o.top_k = 2;  // 0.4 : 0.3 renormalised
  near(sampling_distribution(logits, o), {4.0 / 7, 3.0 / 7, 0, 0});
  o.top_k = 0, o.top_p = 0.75;  // 0.4 + 0.3 < 0.75, + 0.2 reaches it
  near(sampling_distribution(logits, o), {4.0 / 9, 3.0 / 9, 2.0 / 9, 0});
  o.top_p = 1.0, o.min_p = 0.6;  // keep p ≥ 0.6 · 0.4 = 0.24
  near(sampling_distribution(logits, o), {4.0 / 7, 3.0 / 7, 0, 0});
  o.min_p = 0, o.temperature = 0.5;  // p ∝ x²: 16, 9, 4, 1
  near(sampling_distribution(logits, o), {16.0 / 30, 9.0 / 30, 4.0 / 30, 1.0 / 30});
}

TEST(Sampling, RepetitionPenaltyAndDry) {
  std::vector<double> x{2.0, -2.0, 1.0, 0.5};
  apply_repetition_penalty(x, std::vector<int32_t>{0, 1, 1}, 2.0);  // positive ÷ 2, negative × 2
  EXPECT_EQ(x, (std::vector<double>{1.0, -4.0, 1.0, 0.5}));
  // Context 5 6 7 1 5 6: the suffix "5 6" occurred before, followed by 7, so 7 would extend a
  // repeat of 2 (penalty 0.8 · 1.75^0); with allowed_length 2 nothing else is penalised.
  SamplingOptions o;
  o.dry_multiplier = 0.8;
  std::vector<double> y(8, 0.0);
  apply_dry(y, std::vector<int32_t>{5, 6, 7, 1, 5, 6}, o);
  EXPECT_EQ(y, (std::vector<double>{0, 0, 0, 0, 0, 0, 0, -0.8}));
  // 1 2 3 1 2 3 1 2: "3 1 2" … the repeat before 3 is 5 long (1 2 3 1 2), penalty 0.8·1.75³.
  std::vector<double> z(4, 0.0);
  apply_dry(z, std::vector<int32_t>{1, 2, 3, 1, 2, 3, 1, 2}, o);
  EXPECT_NEAR(z[3], -0.8 * std::pow(1.75, 3), 1e-12);
  EXPECT_EQ(z[1], 0.0);
  // A breaker in the suffix stops the match: nothing reaches allowed_length.
  o.dry_breakers = {6};
  std::vector<double> w(8, 0.0);
  apply_dry(w, std::vector<int32_t>{5, 6, 7, 1, 5, 6}, o);
  EXPECT_EQ(w, std::vector<double>(8, 0.0));
}

TEST(Sampling, SeededDrawsRepeatAndTopKOneIsGreedy) {
  const auto record = greedy_record();
  const auto& c = record.at("variants").at("e4b").at(1);
  const auto prompt = c.at("prompt").get<std::vector<int32_t>>();
  CpuOps ops(DType::F32);
  const auto model = golden_model("e4b", ops);
  SamplingOptions o;
  o.temperature = 1.0, o.seed = 11;
  EXPECT_EQ(generate(*model, ops, prompt, 12, o).tokens, generate(*model, ops, prompt, 12, o).tokens);
  o.top_k = 1;  // one candidate left: the argmax
  EXPECT_EQ(generate(*model, ops, prompt, 16, o).tokens, c.at("generated").get<std::vector<int32_t>>());
}

}  // namespace
}  // namespace tl
