// Checkpoint directories: what torchless writes (bytes pinned after transformers loaded
// them), HF name prefixes, and loader errors that name the tensor at fault.
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "core/checkpoint_dir.h"
#include "core/cpu/cpu_ops.h"
#include "golden_util.h"
#include "train/model/gemma4_model.h"

namespace tl {
namespace {

using test::slurp;

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("tl_test_" + std::to_string(::getpid()) + "_" +
                                        std::to_string(counter()++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  static int& counter() {
    static int c = 0;
    return c;
  }
};

TEST(Checkpoints, ConvertWritesTheBytesPythonVerified) {
  // tests/golden/torchless_written holds this very conversion, loaded and checked by the
  // Python safetensors library and transformers (scripts/golden/check_torchless_writes.py).
  TempDir tmp;
  fs::path out = tmp.path / "e4b_bf16";
  convert_checkpoint(test::golden("e4b"), out, DType::BF16, parse_size("300KB"), false);
  fs::path ref = test::golden("torchless_written");
  std::vector<std::string> want, got;
  for (auto& e : fs::directory_iterator(ref)) want.push_back(e.path().filename().string());
  for (auto& e : fs::directory_iterator(out))
    if (e.path().filename() != "torchless_convert.json") got.push_back(e.path().filename().string());
  EXPECT_TRUE(fs::exists(out / "torchless_convert.json"));  // our record, which --force looks for
  std::sort(want.begin(), want.end());
  std::sort(got.begin(), got.end());
  ASSERT_EQ(got, want);
  for (const auto& f : want) EXPECT_EQ(slurp(out / f), slurp(ref / f)) << f << " differs";
}

TEST(Checkpoints, OutputDirectoryIsNeverHalfWritten) {
  TempDir tmp;
  fs::path out = tmp.path / "out";
  fs::create_directory(out);
  try {
    convert_checkpoint(test::golden("dense_kv"), out, std::nullopt, parse_size("5GB"), false);
    FAIL() << "overwrote an existing directory without --force";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("output directory exists"), std::string::npos);
  }
  // A failure inside the write leaves neither the output nor a temporary directory.
  fs::remove(out);
  EXPECT_THROW(write_checkpoint_dir(out, {}, false, [](const fs::path&) { throw Error("disk full"); }), Error);
  EXPECT_FALSE(fs::exists(out));
  for (auto& e : fs::directory_iterator(tmp.path)) ADD_FAILURE() << "left behind: " << e.path();
}

TEST(Checkpoints, ParseSizeIsDecimalLikeHuggingFace) {
  EXPECT_EQ(parse_size("5GB"), 5000000000ull);
  EXPECT_EQ(parse_size("200KB"), 200000ull);
  EXPECT_EQ(parse_size("2GiB"), 2147483648ull);
  EXPECT_EQ(parse_size("123"), 123ull);
  EXPECT_THROW(parse_size("5 parsecs"), Error);
  EXPECT_THROW(parse_size("GB"), Error);
}

// Rewrites the dense_kv checkpoint under the multimodal wrapper's prefix, with a vision
// tensor beside it, as the released checkpoints are laid out.
fs::path nested_copy(const fs::path& dir, const std::function<void(std::vector<NamedTensor>&)>& edit = {}) {
  Checkpoint src = Checkpoint::open(test::golden("dense_kv"));
  std::vector<NamedTensor> tensors;
  for (const auto& name : src.names())
    tensors.push_back({"model.language_model." + name.substr(6), src.get(name)});
  tensors.push_back({"model.vision_tower.patch_embedder.weight", Tensor::zeros({4, 4}, DType::BF16)});
  if (edit) edit(tensors);
  write_checkpoint(dir, tensors, parse_size("5GB"));
  std::ifstream in(test::golden("dense_kv/config.json"));
  auto text = nlohmann::json::parse(in);
  nlohmann::json top = {{"model_type", "gemma4"}, {"text_config", text}};
  std::ofstream(dir / "config.json") << top.dump(2);
  return dir;
}

TEST(Checkpoints, NestedLanguageModelPrefixGivesTheSameLogits) {
  TempDir tmp;
  fs::path dir = nested_copy(tmp.path);
  auto cfg = Gemma4Config::load(dir);
  EXPECT_TRUE(cfg.nested);
  CpuOps ops;
  Gemma4Model nested(cfg, ops), plain(Gemma4Config::load(test::golden("dense_kv")), ops);
  nested.load(Checkpoint::open(dir));
  plain.load(Checkpoint::open(test::golden("dense_kv")));
  auto rec = SafetensorsFile::open(test::golden("dense_kv/forward.safetensors"));
  Batch b{rec.get("input_ids"), {}, {}};
  auto d = test::compare(nested.logits(nested.forward_hidden(b)), plain.logits(plain.forward_hidden(b)));
  EXPECT_EQ(d.max_abs, 0.0);
}

void expect_load_error(const fs::path& dir, const std::string& needle) {
  CpuOps ops;
  Gemma4Model m(Gemma4Config::load(dir), ops);
  try {
    m.load(Checkpoint::open(dir));
    ADD_FAILURE() << "loaded a checkpoint that should fail with: " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Checkpoints, MissingTensorIsNamedWithItsShape) {
  TempDir tmp;
  nested_copy(tmp.path, [](auto& t) {
    std::erase_if(t, [](const NamedTensor& n) { return n.name == "model.language_model.layers.2.self_attn.k_proj.weight"; });
  });
  expect_load_error(tmp.path, "missing tensor 'model.language_model.layers.2.self_attn.k_proj.weight' (expected shape [32, 64])");
}

TEST(Checkpoints, MisShapedTensorIsNamedWithBothShapes) {
  TempDir tmp;
  nested_copy(tmp.path, [](auto& t) {
    for (auto& n : t)
      if (n.name == "model.language_model.layers.1.mlp.up_proj.weight") n.tensor = Tensor::zeros({64, 64}, DType::F32);
  });
  expect_load_error(tmp.path, "tensor 'model.language_model.layers.1.mlp.up_proj.weight' has shape [64, 64] but the config implies [128, 64]");
}

TEST(Checkpoints, NoDecoderTensorsAtAll) {
  TempDir tmp;
  nested_copy(tmp.path, [](auto& t) {
    std::erase_if(t, [](const NamedTensor& n) { return n.name.find("embed_tokens") != std::string::npos; });
  });
  expect_load_error(tmp.path, "no Gemma 4 text decoder found");
}

TEST(Checkpoints, Bf16CheckpointRunsCloseToFp32) {
  // The transformers-made bf16 shards of e4b: weights rounded to bf16, computed in fp32.
  CpuOps ops;
  Gemma4Model m(Gemma4Config::load(test::golden("e4b_sharded")), ops);
  m.load(Checkpoint::open(test::golden("e4b_sharded")));
  auto rec = SafetensorsFile::open(test::golden("e4b/forward.safetensors"));
  auto d = test::compare(m.logits(m.forward_hidden({rec.get("input_ids"), {}, {}})), rec.get("logits"));
  EXPECT_GT(d.max_abs, 0.0);      // bf16 rounding must show ...
  EXPECT_LT(d.rel(), 0.05);       // ... but only as rounding
}

}  // namespace
}  // namespace tl
