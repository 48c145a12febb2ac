// Surgery: identity expansion leaves the logits bit for bit unchanged on every variant in
// both identity modes; maps that break KV sharing or leave the model are refused.
#include "core/cpu/cpu_ops.h"
#include "train/surgery/surgery.h"
#include "golden_util.h"
#include "train/model/gemma4_model.h"
#include "train/surgery/inspect.h"

namespace tl {
namespace {

namespace fs = std::filesystem;
const fs::path kPeftRoundTrip = fs::path(TL_SOURCE_DIR) / "tests/golden/peft_roundtrip";

Tensor logits_of(const fs::path& dir, CpuMatmul matmul) {
  CpuOps ops(DType::F32, matmul);
  ops.set_bf16_min_multiply_adds(0);  // every product of the tiny model in bf16
  Gemma4Model m(Gemma4Config::load(dir), ops);
  m.load(Checkpoint::open(dir));
  auto rec = SafetensorsFile::open(test::golden("e2b/forward.safetensors"));
  return m.logits(m.forward_hidden({rec.get("input_ids"), {}, {}}));
}

struct Case {
  std::string variant;
  int begin, end;  // the duplicated block, before each KV producer
};

// Exact on every CPU, in fp32 and with bf16 products (whichever bf16 kernel this CPU runs):
// an inserted identity layer adds exactly zero, and no product of an original layer changes
// shape (the per-layer-embedding projection is computed a layer's slice at a time).
class Expand : public ::testing::TestWithParam<std::tuple<Case, IdentityMode, CpuMatmul>> {};

TEST_P(Expand, IdentityLayersLeaveLogitsBitIdentical) {
  const auto& [c, mode, matmul] = GetParam();
  const fs::path src = test::golden(c.variant);
  const fs::path out = fs::temp_directory_path() / ("tl_expand_" + std::to_string(::getpid()));
  fs::remove_all(out);
  auto cfg = Gemma4Config::load(src);
  auto r = apply_layer_map(src, out, duplicate_block(int(cfg.num_hidden_layers), c.begin, c.end, true), mode, true, false);
  EXPECT_EQ(r.layers_out, r.layers_in + (c.end - c.begin));
  auto ncfg = Gemma4Config::load(out);
  EXPECT_EQ(ncfg.num_hidden_layers, r.layers_out);
  EXPECT_EQ(ncfg.num_kv_shared_layers, cfg.num_kv_shared_layers);
  auto d = test::compare(logits_of(out, matmul), logits_of(src, matmul));
  EXPECT_EQ(d.max_abs, 0.0);
  fs::remove_all(out);
}

INSTANTIATE_TEST_SUITE_P(
    Variants, Expand,
    ::testing::Combine(::testing::Values(Case{"dense_kv", 1, 3}, Case{"e2b", 1, 4}, Case{"e4b", 2, 5}, Case{"moe", 2, 4}),
                       ::testing::Values(IdentityMode::ZeroOut, IdentityMode::ZeroPostnorm),
                       ::testing::Values(CpuMatmul::F32, CpuMatmul::Bf16)),
    [](const auto& info) {
      return std::get<0>(info.param).variant +
             (std::get<1>(info.param) == IdentityMode::ZeroOut ? "_zero_out" : "_zero_postnorm") +
             (std::get<2>(info.param) == CpuMatmul::F32 ? "_fp32" : "_bf16");
    });

TEST(Upscale, MatchesPythonResequencing) {
  // tests/golden/upscale: the same slices applied independently in Python and run by
  // transformers (scripts/golden/make_upscale_golden.py).
  const fs::path out = fs::temp_directory_path() / ("tl_upscale_" + std::to_string(::getpid()));
  fs::remove_all(out);
  apply_layer_map(test::golden("e4b"), out, slices_map(12, "0:6,2:8,8:12"), IdentityMode::None, false, false);
  auto cfg = Gemma4Config::load(out);
  EXPECT_EQ(cfg.num_hidden_layers, 16);
  EXPECT_EQ(cfg.num_kv_shared_layers, 4);
  CpuOps ops(DType::F32);
  Gemma4Model m(cfg, ops);
  m.load(Checkpoint::open(out));
  auto rec = SafetensorsFile::open(test::golden("upscale/logits.safetensors"));
  auto d = test::compare(m.logits(m.forward_hidden({rec.get("input_ids"), {}, {}})), rec.get("logits"));
  EXPECT_LE(d.max_abs, 1e-5 * d.max_ref) << "max|diff| " << d.max_abs;
  fs::remove_all(out);
}

TEST(Inspect, MarksInsertedIdentityLayersAndMeasuresTheirContribution) {
  const fs::path base = fs::path(TL_SOURCE_DIR) / "models/tiny";
  const fs::path out = fs::temp_directory_path() / ("tl_inspect_" + std::to_string(::getpid()));
  fs::remove_all(out);
  apply_layer_map(base, out, duplicate_block(6, 0, 2, true), IdentityMode::ZeroOut, true, false);  // new layers 2, 3
  auto layers = inspect_model(out, kPeftRoundTrip, {{2, 300, 301, 302, 303, 304, 305, 306}});
  ASSERT_EQ(layers.size(), 8u);
  for (const auto& l : layers) {
    const bool inserted = l.layer == 2 || l.layer == 3;
    EXPECT_EQ(l.inserted, inserted) << l.layer;
    if (inserted) {
      EXPECT_EQ(l.o_proj_norm, 0.0);
      EXPECT_EQ(l.down_proj_norm, 0.0);
      EXPECT_EQ(l.residual_contribution, 0.0) << "an identity layer changes nothing";
    } else {
      EXPECT_GT(l.o_proj_norm, 0.0);
      EXPECT_GT(l.residual_contribution, 1e-4) << l.layer;
    }
  }
  fs::remove_all(out);
}

using test::expect_error;

TEST(SurgeryErrors, SlicesOutOfRangeAndMapsThatBreakKvSharing) {
  auto e2b = Gemma4Config::load(test::golden("e2b"));  // 10 layers; 6–9 KV-shared; producers 4 (full), 5 (sliding)
  expect_error([&] { slices_map(10, "0:6,4:12"); }, "4:12 is outside the model's 10 layers");
  expect_error([&] { slices_map(10, "0:6,x"); }, "'x' is not BEGIN:END");
  // A shared layer moved in front of non-shared ones.
  expect_error([&] { map_config(e2b, slices_map(10, "0:4,6:8,4:6,8:10"), false); }, "would need K/V weights that do not exist; put every slice of layers");
  // An identity copy of layer 5 after layer 5 would become the sliding producer.
  expect_error([&] { map_config(e2b, duplicate_block(10, 5, 6, true), true); }, "would become the last sliding_attention layer");
  expect_error([&] { duplicate_block(10, 8, 12, true); }, "outside the model's 10 layers");
}

}  // namespace
}  // namespace tl
