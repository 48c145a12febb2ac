// Expert pruning on the tiny MoE model: tokens whose routing avoided the pruned experts give
// the same outputs, the drop map matches what was sliced, and reruns are byte-identical.
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/cpu/cpu_ops.h"
#include "golden_util.h"
#include "train/model/gemma4_model.h"
#include "train/surgery/prune.h"

namespace tl {
namespace {

namespace fs = std::filesystem;

using test::slurp;

Tensor logits(const fs::path& dir, const Tensor& ids) {
  CpuOps ops(DType::F32);
  Gemma4Model m(Gemma4Config::load(dir), ops);
  m.load(Checkpoint::open(dir));
  return m.logits(m.forward_hidden({ids, {}, {}}));
}

TEST(Prune, CalibratedTokensKeepTheirOutputsAndRerunsAreByteIdentical) {
  const fs::path src = test::golden("moe"), tmp = fs::temp_directory_path() / ("tl_prune_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  // A short calibration sequence routes to few experts per layer: keeping 6 of 8 keeps all of them.
  auto rec = SafetensorsFile::open(test::golden("moe/forward.safetensors"));
  Tensor ids = rec.get("input_ids").to(DType::I32).view({48}).slice_rows(0, 3).view({1, 3});
  std::vector<std::vector<int32_t>> calib{{ids.data<int32_t>(), ids.data<int32_t>() + 3}};
  PruneOptions o{6, 8, "coverage", false};
  auto r = prune_experts(src, tmp / "a", calib, o);
  prune_experts(src, tmp / "b", calib, o);

  auto cfg = Gemma4Config::load(tmp / "a");
  EXPECT_EQ(cfg.num_experts, 6);
  EXPECT_EQ(r.samples, 1);
  EXPECT_GT(r.routed_tokens, 0);
  auto pruned = Checkpoint::open(tmp / "a");
  EXPECT_EQ(pruned.get("model.layers.0.experts.down_proj").dim(0), 6);
  EXPECT_EQ(pruned.get("model.layers.0.router.proj.weight").dim(0), 6);
  // The drop map names what was kept, and the kept slices are the original experts.
  std::ifstream in(tmp / "a/expert_drop_map.json");
  auto drop = nlohmann::json::parse(in);
  auto kept0 = drop["layers"]["0"]["kept"].get<std::vector<int64_t>>();
  ASSERT_EQ(kept0, r.kept[0]);
  auto orig = Checkpoint::open(src);
  Tensor a = pruned.get("model.layers.0.experts.down_proj"), b = orig.get("model.layers.0.experts.down_proj");
  for (size_t k = 0; k < kept0.size(); ++k)
    EXPECT_EQ(test::compare(a.slice_rows(int64_t(k), int64_t(k) + 1), b.slice_rows(kept0[k], kept0[k] + 1)).max_abs, 0.0);

  // The calibration tokens routed only to kept experts: their outputs are unchanged (up to the
  // rounding of the softmax over fewer experts before renormalisation).
  auto d = test::compare(logits(tmp / "a", ids), logits(src, ids));
  EXPECT_LE(d.max_abs, 1e-5 * d.max_ref);
  // ...while the whole row, whose later tokens did use the dropped experts, changes.
  Tensor row = rec.get("input_ids").to(DType::I32).slice_rows(0, 1);
  auto changed = test::compare(logits(tmp / "a", row), logits(src, row));
  EXPECT_GT(changed.max_abs, 1e-3 * changed.max_ref);

  for (auto& e : fs::directory_iterator(tmp / "a"))
    EXPECT_EQ(slurp(e.path()), slurp(tmp / "b" / e.path().filename())) << e.path().filename() << " differs between runs";
  fs::remove_all(tmp);
}

TEST(Prune, RefusesBadKeepAndDenseModels) {
  const fs::path tmp = fs::temp_directory_path() / ("tl_prune_bad_" + std::to_string(::getpid()));
  test::expect_error([&] { prune_experts(test::golden("moe"), tmp, {{2, 3}}, {1, 8, "coverage", false}); },
                     "--keep 1: must be at least top_k_experts (2)");
  test::expect_error([&] { prune_experts(test::golden("e2b"), tmp, {{2, 3}}, {2, 8, "coverage", false}); },
                     "not a MoE model");
  EXPECT_FALSE(fs::exists(tmp));
}

}  // namespace
}  // namespace tl
