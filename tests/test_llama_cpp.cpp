// llama.cpp's KV-sharing rule (train/surgery/llama_cpp.h) on the released layouts and on layouts made
// to break it; expected layers worked out by hand from llama.cpp's reuse callback
// (n_layer_kv_from_start − (is_swa ? 2 : 1)) and transformers' "last own-K/V layer of the type".
#include <gtest/gtest.h>

#include "core/config.h"
#include "train/surgery/llama_cpp.h"
#include "golden_util.h"

namespace tl {
namespace {

Gemma4Config with_layers(const std::string& types, int shared) {  // "sssfsf": sliding/full
  Gemma4Config c = Gemma4Config::load(std::string(TL_SOURCE_DIR) + "/configs/demo-model.json");
  c.layer_types.clear();
  for (char t : types) c.layer_types.push_back(t == 's' ? LayerType::Sliding : LayerType::Full);
  c.num_hidden_layers = int64_t(types.size());
  c.num_kv_shared_layers = shared;
  c.finalize("test");
  return c;
}

TEST(LlamaCppLayout, ReleasedModelsAreRunnable) {
  for (const char* m : {"gemma-4-E2B-it", "gemma-4-E4B-it", "gemma-4-31B-it", "gemma-4-26B-A4B-it"}) {
    auto c = Gemma4Config::load(std::string(TL_MODELS_DIR) + "/" + m + "/config.json");
    EXPECT_EQ(llama_cpp_kv_problem(c), "") << m;
  }
  // E2B: 35 layers, 20 KV-shared, so layers 13 (sliding) and 14 (full) are the sources.
  auto e2b = Gemma4Config::load(std::string(TL_MODELS_DIR) + "/gemma-4-E2B-it/config.json");
  EXPECT_EQ(llama_cpp_kv_summary(e2b),
            "llama.cpp: KV-sharing layout runnable (layers 15-34 share K/V; layer 13 is sliding_attention, layer 14 "
            "is full_attention)");
}

TEST(LlamaCppLayout, FlagsLayoutsWhoseSourcesDiffer) {
  EXPECT_EQ(llama_cpp_kv_problem(with_layers("sssfsf", 2)), "");  // models/tiny
  EXPECT_EQ(llama_cpp_kv_problem(with_layers("sssfff", 2)), "");  // no shared sliding layer: N−2 is unused
  // The old tiny layout: own s,s,f,s. Shared layer 4 (sliding) reads 3; llama.cpp reads N−2 = 2 (full).
  auto p = llama_cpp_kv_problem(with_layers("ssfssf", 2));
  EXPECT_NE(p.find("KV-shared layer 4 (sliding_attention) reads layer 3 in transformers but layer 2 "
                   "(full_attention) in llama.cpp"), std::string::npos) << p;
  EXPECT_NE(p.find(kLlamaCppKvRule), std::string::npos);
  // Own s,f,s,s: sliding reads 3 in transformers, 2 in llama.cpp (same type, other layer: silent).
  p = llama_cpp_kv_problem(with_layers("sfsssf", 2));
  EXPECT_NE(p.find("KV-shared layer 4 (sliding_attention) reads layer 3 in transformers but layer 2 "
                   "(sliding_attention)"), std::string::npos) << p;
  // Own s,f,f: the full layers read 2 in both; the sliding layer reads 0, llama.cpp 1 (full).
  p = llama_cpp_kv_problem(with_layers("sffsf", 2));
  EXPECT_NE(p.find("KV-shared layer 3 (sliding_attention) reads layer 0 in transformers but layer 1"),
            std::string::npos) << p;
  // One own-K/V layer: llama.cpp asserts N ≥ 2.
  EXPECT_NE(llama_cpp_kv_problem(with_layers("fff", 2)).find("only 1 layer(s) own K/V"), std::string::npos);
  // The golden E2B-like fixture ends its own layers full, sliding: not runnable.
  EXPECT_NE(llama_cpp_kv_problem(Gemma4Config::load(test::golden("e2b"))), "");
}

}  // namespace
}  // namespace tl
