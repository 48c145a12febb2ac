// Greedy decoding against transformers' generate(do_sample=False) on the tiny golden
// checkpoints (fixture: scripts/golden/make_generate_golden.py), and the repetition measure
// against hand-counted n-grams.
#include <memory>
#include <nlohmann/json.hpp>

#include "core/cpu/cpu_ops.h"
#include "golden_util.h"
#include "train/generate.h"

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

TEST(Repetition, CountsRepeatedNgrams) {
  // 1 2 3 1 2 3 1 2 3: seven 3-grams, three distinct → 4/7 repeat.
  const std::vector<int32_t> cycle{1, 2, 3, 1, 2, 3, 1, 2, 3};
  EXPECT_DOUBLE_EQ(repetition_rate(cycle, 3), 1.0 - 3.0 / 7.0);
  // Bigrams of the same: 12 23 31 12 23 31 12 23 → three distinct of eight.
  EXPECT_DOUBLE_EQ(repetition_rate(cycle, 2), 1.0 - 3.0 / 8.0);
  // One token sixteen times: thirteen 4-grams, one distinct.
  EXPECT_DOUBLE_EQ(repetition_rate(std::vector<int32_t>(16, 7), 4), 12.0 / 13.0);
  // No repeats, too short, and n = 1 (repeated tokens).
  EXPECT_DOUBLE_EQ(repetition_rate(std::vector<int32_t>{1, 2, 3, 4, 5, 6}, 4), 0.0);
  EXPECT_DOUBLE_EQ(repetition_rate(std::vector<int32_t>{1, 2, 3}, 4), 0.0);
  EXPECT_DOUBLE_EQ(repetition_rate(std::vector<int32_t>{5, 5, 6, 5}, 1), 0.5);
  EXPECT_THROW(repetition_rate(cycle, 0), Error);
}

}  // namespace
}  // namespace tl
