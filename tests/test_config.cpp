// Gemma4Config: both config.json forms, derived per-layer geometry, and clear errors.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/tensor.h"
#include "golden_util.h"

namespace tl {
namespace {

using nlohmann::json;

Gemma4Config released(const std::string& name) {
  return Gemma4Config::load(std::string(TL_MODELS_DIR) + "/" + name + "/config.json");
}

TEST(Config, E2BGeometryFollowsKvSharingAndDoubleWideMlp) {
  auto c = released("gemma-4-E2B-it");
  EXPECT_TRUE(c.nested);
  EXPECT_EQ(c.first_kv_shared_layer(), 15);
  EXPECT_EQ(c.layer(4).type, LayerType::Full);
  EXPECT_EQ(c.layer(4).head_dim, 512);
  EXPECT_EQ(c.layer(3).head_dim, 256);
  EXPECT_EQ(c.layer(14).kv_source, -1);
  EXPECT_EQ(c.layer(15).kv_source, 13);  // sliding consumers read layer 13
  EXPECT_EQ(c.layer(19).kv_source, 14);  // full consumers read layer 14
  EXPECT_EQ(c.layer(34).kv_source, 14);
  EXPECT_EQ(c.layer(14).mlp_width, 6144);
  EXPECT_EQ(c.layer(15).mlp_width, 12288);
  EXPECT_FALSE(c.layer(4).k_eq_v);
  EXPECT_EQ(c.layer(4).num_kv_heads, 1);
  EXPECT_EQ(c.layer(4).rope.type, "proportional");
  EXPECT_DOUBLE_EQ(*c.final_logit_softcapping, 30.0);
}

TEST(Config, LargeModelsUseKEqVWithGlobalKvHeadsOnFullLayers) {
  auto c = released("gemma-4-31B-it");
  EXPECT_TRUE(c.layer(5).k_eq_v);
  EXPECT_EQ(c.layer(5).num_kv_heads, 4);
  EXPECT_EQ(c.layer(4).num_kv_heads, 16);
  EXPECT_FALSE(c.layer(4).k_eq_v);
  auto m = released("gemma-4-26B-A4B-it");
  EXPECT_TRUE(m.enable_moe_block);
  EXPECT_EQ(m.num_experts, 128);
  EXPECT_EQ(m.top_k_experts, 8);
  EXPECT_EQ(m.moe_intermediate_size, 704);
  EXPECT_EQ(m.layer(29).num_kv_heads, 2);
}

TEST(Config, PerLayerConfigFormOfNewerTransformers) {
  auto c = Gemma4Config::load(test::golden("moe"));  // written by transformers 5.x
  ASSERT_TRUE(c.per_layer_config.has_value());
  EXPECT_FALSE(c.nested);
  EXPECT_EQ(c.layer(2).head_dim, 32);
  EXPECT_EQ(c.layer(2).num_kv_heads, 1);
  EXPECT_TRUE(c.layer(2).k_eq_v);
  EXPECT_EQ(c.layer(1).head_dim, 16);
  EXPECT_EQ(c.layer(1).num_kv_heads, 2);
}

TEST(Config, TextJsonRoundTripKeepsGeometry) {
  for (auto name : {"gemma-4-E2B-it", "gemma-4-26B-A4B-it"}) {
    auto c = released(name);
    auto back = Gemma4Config::from_json(c.to_text_json(), "roundtrip");
    ASSERT_EQ(back.layers().size(), c.layers().size());
    for (size_t i = 0; i < c.layers().size(); ++i) {
      EXPECT_EQ(back.layers()[i].head_dim, c.layers()[i].head_dim);
      EXPECT_EQ(back.layers()[i].num_kv_heads, c.layers()[i].num_kv_heads);
      EXPECT_EQ(back.layers()[i].kv_source, c.layers()[i].kv_source);
      EXPECT_EQ(back.layers()[i].mlp_width, c.layers()[i].mlp_width);
    }
  }
}

// Each malformed config is refused with one line naming the file and the key at fault.
json base_text() {
  return json::parse(R"({"model_type":"gemma4_text","hidden_size":64,"intermediate_size":128,
    "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
    "global_head_dim":32,"layer_types":["sliding_attention","sliding_attention","full_attention"]})");
}

void expect_error(const json& j, const std::string& needle) {
  try {
    Gemma4Config::from_json(j, "bad/config.json");
    ADD_FAILURE() << "accepted a config that should fail with: " << needle;
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("bad/config.json"), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "error must be one line: " << msg;
  }
}

TEST(ConfigErrors, Malformed) {
  EXPECT_NO_THROW(Gemma4Config::from_json(base_text(), "ok"));
  auto j = base_text();
  j["layer_types"].push_back("full_attention");
  expect_error(j, "layer_types has 4 entries but num_hidden_layers is 3");
  j = base_text();
  j.erase("hidden_size");
  expect_error(j, "missing required key 'hidden_size'");
  j = base_text();
  j["hidden_size"] = "big";
  expect_error(j, "key 'hidden_size' has the wrong type");
  j = base_text();
  j["layer_types"][1] = "local_attention";
  expect_error(j, "layer_types[1] is 'local_attention'");
  j = base_text();
  j["rope_parameters"] = {{"full_attention", {{"rope_type", "yarn"}}}};
  expect_error(j, "rope_type 'yarn' is not supported");
  j = base_text();
  j["num_kv_shared_layers"] = 3;
  expect_error(j, "num_kv_shared_layers 3 must be in [0, num_hidden_layers=3)");
  j = base_text();
  j["num_kv_shared_layers"] = 2;  // consumers: layers 1 (sliding) and 2 (full); only layer 0 produces
  expect_error(j, "layer 2 (full_attention) shares K/V but no earlier non-shared layer of that type");
  j = base_text();
  j["per_layer_config"] = {{"7", {{"head_dim", 32}}}};
  expect_error(j, "per_layer_config names layer 7");
  j = base_text();
  j["per_layer_config"] = {{"2", {{"intermediate_size", 32}}}};
  expect_error(j, "per_layer_config['2'].intermediate_size");
  j = base_text();
  j["model_type"] = "llama";
  expect_error(j, "model_type 'llama' is not a Gemma 4 model");
  j = base_text();
  j["num_key_value_heads"] = 3;
  expect_error(j, "not a multiple of the 3 KV heads");
  j = base_text();
  j["enable_moe_block"] = true;
  expect_error(j, "num_experts must be positive");
}

// Each rule Gemma4TextConfig.__post_init__ and Gemma4TextAttention apply while loading
// (transformers 5.x, models/gemma4), applied or refused the same way here.
TEST(Config, LastLayerIsForcedToFullAttentionAsTransformersDoes) {
  auto j = base_text();
  j["layer_types"] = {"full_attention", "full_attention", "sliding_attention"};
  const Gemma4Config c = Gemma4Config::from_json(j, "ok");
  EXPECT_TRUE(c.forced_full_last_layer);
  EXPECT_EQ(c.layer(2).type, LayerType::Full);
  EXPECT_EQ(c.layer(2).head_dim, 32);  // global_head_dim, as transformers' per_layer_config override
  EXPECT_FALSE(Gemma4Config::from_json(base_text(), "ok").forced_full_last_layer);
}

TEST(Config, KEqVWithoutGlobalKvHeadsKeepsNumKeyValueHeads) {
  // transformers: num_key_value_heads override only when num_global_key_value_heads is set.
  auto j = base_text();
  j["attention_k_eq_v"] = true;
  const Gemma4Config c = Gemma4Config::from_json(j, "ok");
  EXPECT_TRUE(c.layer(2).k_eq_v);
  EXPECT_EQ(c.layer(2).num_kv_heads, 2);
  j["num_global_key_value_heads"] = 1;
  EXPECT_EQ(Gemma4Config::from_json(j, "ok").layer(2).num_kv_heads, 1);
}

TEST(Config, RopeParametersNeedBothLayerTypes) {
  auto j = base_text();
  j["rope_parameters"] = {{"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 10000.0}}}};
  expect_error(j, "rope_parameters has no 'full_attention' entry");
}

TEST(Config, AttentionBiasIsRefused) {
  auto j = base_text();
  j["attention_bias"] = true;
  expect_error(j, "attention_bias true");
}

}  // namespace
}  // namespace tl
