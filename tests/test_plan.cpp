// Parameter counts from the config alone against what transformers instantiates
// (tests/golden/param_counts.json, recorded on the meta device by scripts/golden).
#include <nlohmann/json.hpp>

#include <fstream>

#include "core/plan.h"
#include "golden_util.h"

namespace tl {
namespace {

nlohmann::json counts() {
  std::ifstream in(test::golden("param_counts.json"));
  return nlohmann::json::parse(in);
}

void expect_counts(const Gemma4Config& c, const nlohmann::json& ref) {
  ModelPlan p = plan_model(c);
  EXPECT_EQ(p.total_params, ref["total"].get<int64_t>());
  EXPECT_EQ(p.buffers, ref["layer_scalar_buffers"].get<int64_t>());
  const auto& comp = ref["components"];
  auto get = [&](const char* k) { return comp.contains(k) ? comp[k].get<int64_t>() : int64_t(0); };
  auto mine = [&](Component k) { return p.params_by_component.count(k) ? p.params_by_component.at(k) : 0; };
  EXPECT_EQ(mine(Component::Embeddings), get("embed_tokens"));
  EXPECT_EQ(mine(Component::Attention), get("attention"));
  EXPECT_EQ(mine(Component::MLP), get("mlp"));
  EXPECT_EQ(mine(Component::Experts), get("experts"));
  EXPECT_EQ(mine(Component::Router), get("router"));
  EXPECT_EQ(mine(Component::Norms), get("norms"));
  EXPECT_EQ(mine(Component::PLE), get("ple_global") + get("ple_per_layer"));
}

class ReleasedPlan : public ::testing::TestWithParam<std::string> {};

TEST_P(ReleasedPlan, ParameterCountsMatchTransformers) {
  auto c = Gemma4Config::load(std::string(TL_MODELS_DIR) + "/" + GetParam() + "/config.json");
  expect_counts(c, counts()[GetParam()]);
}

INSTANTIATE_TEST_SUITE_P(Released, ReleasedPlan,
                         ::testing::Values("gemma-4-E2B-it", "gemma-4-E4B-it", "gemma-4-31B-it",
                                           "gemma-4-26B-A4B-it"),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (char& ch : s) if (!isalnum(ch)) ch = '_';
                           return s;
                         });

class TinyPlan : public ::testing::TestWithParam<std::string> {};

TEST_P(TinyPlan, ParameterCountsMatchTransformers) {
  expect_counts(Gemma4Config::load(test::golden(GetParam())), counts()[GetParam()]);
}

INSTANTIATE_TEST_SUITE_P(Tiny, TinyPlan, ::testing::Values("dense_kv", "e2b", "e4b", "moe"),
                         [](const auto& info) { return info.param; });

TEST(Plan, Nf4BytesCountNibblesAbsmaxAndMaps) {
  // 4096×4096: 8 MiB of nibbles; 262144 blocks → 262144 u8 codes + 1024 fp32 nested absmax
  // + 256-entry fp32 nested map + 16-entry fp32 NF4 map.
  EXPECT_DOUBLE_EQ(nf4_bytes(4096 * 4096, true), 8388608.0 + 262144 + 1024 * 4 + 1024 + 64);
  EXPECT_DOUBLE_EQ(nf4_bytes(4096 * 4096, false), 8388608.0 + 262144 * 4 + 64);
}

}  // namespace
}  // namespace tl
