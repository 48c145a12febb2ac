// The CPU forward pass against transformers (fp32, eager attention) on tiny random
// checkpoints shaped like each released Gemma 4 variant (fixtures: scripts/golden/).
#include <fmt/format.h>

#include "core/cpu/cpu_ops.h"
#include "golden_util.h"
#include "train/model/gemma4_model.h"

namespace tl {
namespace {

class GoldenForward : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenForward, LogitsAndLossMatchTransformers) {
  const std::string dir = test::golden(GetParam());
  CpuOps ops(DType::F32);
  Gemma4Model model(Gemma4Config::load(dir), ops);
  model.load(Checkpoint::open(dir));
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");

  std::vector<Tensor> layers;
  Tensor hidden = model.forward_hidden({rec.get("input_ids"), {}, {}}, &layers);

  // Layer by layer first, so a failure says where the computation departs from HF.
  Tensor hs = rec.get("hidden_states");  // [L+1, B, S, H]: input of each layer, then final
  const int L = model.config().num_hidden_layers;
  const int64_t per = hs.numel() / hs.dim(0);
  for (int i = 0; i < L; ++i) {
    auto d = test::compare(layers[size_t(i)], hs.view({hs.dim(0), per}).slice_rows(i, i + 1));
    EXPECT_LE(d.rel(), 1e-5) << "input of layer " << i << ": max|diff| " << d.max_abs;
  }
  auto last = test::compare(layers[size_t(L)], rec.get("last_layer_output"));
  EXPECT_LE(last.rel(), 1e-5) << "output of the last layer";

  Tensor logits = model.logits(hidden);
  auto d = test::compare(logits, rec.get("logits"));
  EXPECT_LE(d.max_abs, 1e-5 * d.max_ref) << fmt::format("logits max|diff| {} max|ref| {}", d.max_abs, d.max_ref);

  auto loss = model.loss(hidden, rec.get("labels"));
  double ref = rec.get("loss").get(0);
  EXPECT_NEAR(loss.mean(), ref, 1e-5 * std::abs(ref));
  RecordProperty("logits_rel_diff", fmt::format("{:.3g}", d.rel()));
}

// Our F64 mode against transformers run in float64: no rounding noise to hide behind, so
// the bound is tight and any departure from HF's math shows.
TEST_P(GoldenForward, Float64LogitsMatchTransformersFloat64) {
  const std::string dir = test::golden(GetParam());
  CpuOps ops(DType::F64);
  Gemma4Model model(Gemma4Config::load(dir), ops);
  model.load(Checkpoint::open(dir));
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  Tensor hidden = model.forward_hidden({rec.get("input_ids"), {}, {}});
  auto d = test::compare(model.logits(hidden), rec.get("logits_fp64"));
  EXPECT_LE(d.rel(), 1e-10) << "max|diff| " << d.max_abs;
  double ref = rec.get("loss_fp64").get(0);
  EXPECT_NEAR(model.loss(hidden, rec.get("labels")).mean(), ref, 1e-11 * std::abs(ref));
}

INSTANTIATE_TEST_SUITE_P(Variants, GoldenForward,
                         ::testing::Values("dense_kv", "e2b", "e4b", "moe"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace tl
