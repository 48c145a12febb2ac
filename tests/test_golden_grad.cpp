// Gradients of the token-mean loss for every weight against transformers' autograd in fp64
// (fp32 islands lifted; scripts/golden/make_golden.py save_grad_probes). Each gradient is
// pinned by three probes: Σg, Σg², Σ g_i·cos(0.37·i).
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>

#include "core/cpu/cpu_ops.h"
#include "golden_util.h"
#include "train/model/gemma4_model.h"

namespace tl {
namespace {

std::array<double, 3> probes(const Tensor& g) {
  std::array<double, 3> p{0, 0, 0};
  for (int64_t i = 0; i < g.numel(); ++i) {
    double v = g.get(i);
    p[0] += v;
    p[1] += v * v;
    p[2] += v * std::cos(0.37 * double(i));
  }
  return p;
}

class GoldenGrad : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenGrad, EveryWeightGradientMatchesTransformersAutograd) {
  const std::string dir = test::golden(GetParam());
  std::ifstream in(dir + "/grad_probes.json");
  auto ref = nlohmann::json::parse(in);
  CpuOps ops(DType::F64);
  Gemma4Model model(Gemma4Config::load(dir), ops);
  model.load(Checkpoint::open(dir));
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  Tensor labels = rec.get("labels");
  // Count targets first so the gradient is that of the token mean, as HF's loss.
  Tensor targets = shift_labels(labels);
  int64_t count = 0;
  for (int64_t i = 0; i < targets.numel(); ++i) count += targets.data<int32_t>()[i] != -100;
  Gemma4Grads grads = model.zero_grads();
  auto loss = model.forward_backward({rec.get("input_ids"), {}, {}}, labels, 1.0 / double(count), grads);
  EXPECT_NEAR(loss.mean(), ref["loss"].get<double>(), 1e-12);

  size_t checked = 0;
  for (const auto& [name, want] : ref["grads"].items()) {
    Tensor* g = weight_slot(grads.w, name);
    ASSERT_NE(g, nullptr) << "no gradient for " << name;
    auto got = probes(*g);
    for (int k = 0; k < 3; ++k) {
      double w = want[k].get<double>();
      EXPECT_NEAR(got[size_t(k)], w, 1e-9 * std::max(1.0, std::abs(w))) << name << " probe " << k;
    }
    ++checked;
  }
  // Every parameter HF has (tied lm_head counted once) was checked.
  EXPECT_EQ(checked, ref["grads"].size());
  EXPECT_GT(checked, 50u);
}

INSTANTIATE_TEST_SUITE_P(Variants, GoldenGrad, ::testing::Values("dense_kv", "e2b", "e4b", "moe"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace tl
