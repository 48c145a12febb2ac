// torchless-merge against PEFT's merge_and_unload (tests/golden/merge, made by
// scripts/golden/make_merge_golden.py from the torchless-written adapter of
// tests/golden/peft_roundtrip on models/tiny), and its refusals.
#include <nlohmann/json.hpp>

#include <fstream>

#include "core/checkpoint_dir.h"
#include "golden_util.h"
#include "train/surgery/merge.h"
#include "core/safetensors.h"

namespace tl {
namespace {

namespace fs = std::filesystem;

const fs::path kBase = fs::path(TL_SOURCE_DIR) / "models/tiny";
const fs::path kAdapter = fs::path(TL_SOURCE_DIR) / "tests/golden/peft_roundtrip";

struct Tmp {
  fs::path dir = fs::temp_directory_path() / ("tl_merge_" + std::to_string(::getpid()));
  Tmp() { fs::remove_all(dir), fs::create_directories(dir); }
  ~Tmp() { fs::remove_all(dir); }
};

std::array<double, 3> probes(const Tensor& t) {
  std::array<double, 3> p{0, 0, 0};
  for (int64_t i = 0; i < t.numel(); ++i) {
    double v = t.get(i);
    p[0] += v, p[1] += v * v, p[2] += v * std::cos(0.37 * double(i));
  }
  return p;
}

void expect_matches_peft(const fs::path& out, const std::string& which) {
  std::ifstream in(test::golden("merge/probes.json"));
  auto ref = nlohmann::json::parse(in)[which];
  Checkpoint merged = Checkpoint::open(out);
  size_t n = 0;
  for (const auto& [name, want] : ref.items()) {
    if (name.ends_with("layer_scalar")) continue;  // a buffer: copied, not merged
    ASSERT_TRUE(merged.contains(name)) << name;
    auto got = probes(merged.get(name));
    for (int k = 0; k < 3; ++k)
      EXPECT_NEAR(got[size_t(k)], want[k].get<double>(), 1e-12 * std::max(1.0, std::abs(want[k].get<double>())))
          << which << " " << name << " probe " << k;
    ++n;
  }
  EXPECT_GT(n, 50u);
  auto full = SafetensorsFile::open(test::golden("merge/full.safetensors"));
  for (const auto& e : full.entries()) {
    if (!e.name.starts_with(which + "/")) continue;
    auto d = test::compare(merged.get(e.name.substr(which.size() + 1)), full.get(e.name));
    EXPECT_EQ(d.max_abs, 0.0) << e.name << " differs from PEFT's merge";
  }
}

TEST(Merge, Bf16EqualsPeftMergeAndUnload) {
  Tmp t;
  auto r = merge_adapter(kBase, kAdapter, t.dir / "out", {});
  EXPECT_GT(r.merged_modules, 20);
  expect_matches_peft(t.dir / "out", "bf16");
  EXPECT_TRUE(fs::exists(t.dir / "out/tokenizer.json"));
  EXPECT_TRUE(fs::exists(t.dir / "out/config.json"));
}

TEST(Merge, Fp32EqualsPeftMergeAndUnload) {
  Tmp t;
  merge_adapter(kBase, kAdapter, t.dir / "out", {DType::F32, false});
  expect_matches_peft(t.dir / "out", "f32");
}

using test::expect_error;

TEST(MergeErrors, AdapterForAnotherBaseOrShapes) {
  Tmp t;
  // An adapter whose module the base lacks, and one whose shapes do not fit.
  auto copy_adapter = [&](const fs::path& dir, const std::function<void(std::vector<NamedTensor>&)>& edit) {
    fs::create_directories(dir);
    fs::copy_file(kAdapter / "adapter_config.json", dir / "adapter_config.json");
    auto f = SafetensorsFile::open(kAdapter / "adapter_model.safetensors");
    std::vector<NamedTensor> ts;
    for (const auto& e : f.entries()) ts.push_back({e.name, f.get(e.name).clone()});
    edit(ts);
    write_safetensors(dir / "adapter_model.safetensors", ts);
  };
  copy_adapter(t.dir / "renamed", [](auto& ts) {
    for (auto& n : ts)
      if (n.name.find("layers.0.self_attn.q_proj") != std::string::npos)
        n.name.replace(n.name.find("layers.0."), 9, "layers.40.");
  });
  expect_error([&] { merge_adapter(kBase, t.dir / "renamed", t.dir / "o1", {}); },
               "model.layers.40.self_attn.q_proj");  // outside target_modules, and not in the base
  copy_adapter(t.dir / "reshaped", [](auto& ts) {
    for (auto& n : ts)
      if (n.name.find("layers.1.mlp.up_proj.lora_A") != std::string::npos) n.tensor = Tensor::zeros({n.tensor.dim(0), 7}, DType::F32);
  });
  expect_error([&] { merge_adapter(kBase, t.dir / "reshaped", t.dir / "o2", {}); }, "do not fit the base weight");
  EXPECT_FALSE(fs::exists(t.dir / "o1"));
  EXPECT_FALSE(fs::exists(t.dir / "o2"));
}

TEST(MergeErrors, ExistingOutputCorruptedShardAndInterruptedWrite) {
  Tmp t;
  fs::create_directories(t.dir / "exists");
  expect_error([&] { merge_adapter(kBase, kAdapter, t.dir / "exists", {}); }, "output directory exists");
  // A corrupted (truncated) shard of the base.
  fs::copy(kBase, t.dir / "base");
  fs::resize_file(t.dir / "base/model.safetensors", fs::file_size(t.dir / "base/model.safetensors") - 100);
  expect_error([&] { merge_adapter(t.dir / "base", kAdapter, t.dir / "o3", {}); }, "model.safetensors");
  EXPECT_FALSE(fs::exists(t.dir / "o3"));
  // An interrupted write leaves no output directory and no partial one beside it.
  EXPECT_THROW(write_checkpoint_dir(t.dir / "o4", {}, false, [](const fs::path&) { throw Error("killed"); }), Error);
  for (auto& e : fs::directory_iterator(t.dir))
    EXPECT_EQ(e.path().filename().string().find(".partial"), std::string::npos) << e.path();
}

}  // namespace
}  // namespace tl
