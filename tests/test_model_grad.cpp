// The whole model's backward against finite differences of its forward, in fp64: for each
// weight tensor W and a random unit direction V (zero on the embedding's pad row, which
// PyTorch leaves without a lookup gradient), the derivative of L along V (central
// differences, Richardson-extrapolated) must equal ⟨∂L/∂W, V⟩ within 1e-6 relative.
#include <fmt/format.h>

#include <random>

#include "core/cpu/cpu_ops.h"
#include "core/weights.h"
#include "golden_util.h"
#include "train/model/gemma4_model.h"

namespace tl {
namespace {

// Every parameter of the decoder with its gradient slot, by HF name (the model's own weight
// table, so no tensor can be left out).
std::vector<std::pair<std::string, std::pair<Tensor*, Tensor*>>> pairs(const Gemma4Config& c, Gemma4Weights& w,
                                                                        Gemma4Weights& g) {
  std::vector<std::pair<std::string, std::pair<Tensor*, Tensor*>>> out;
  for (const WeightSpec& s : text_decoder_weights(c))
    if (s.is_parameter) out.push_back({s.name, {weight_slot(w, s.name), weight_slot(g, s.name)}});
  return out;
}

class ModelGrad : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelGrad, EveryWeightGradientMatchesFiniteDifferences) {
  const std::string dir = test::golden(GetParam());
  CpuOps ops(DType::F64);
  Gemma4Model model(Gemma4Config::load(dir), ops);
  model.load(Checkpoint::open(dir));
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  // A shorter batch keeps the many forward passes quick; still longer than the window (8).
  Tensor ids = rec.get("input_ids").to(DType::I32).view({48}).slice_rows(0, 12).view({1, 12});
  Tensor labels = rec.get("labels").to(DType::I32).view({48}).slice_rows(0, 12).view({1, 12});
  Batch batch{ids, {}, {}};
  auto loss = [&] { return model.loss(model.forward_hidden(batch), labels).mean(); };

  Gemma4Grads grads = model.zero_grads();
  auto l = model.forward_backward(batch, labels, 1.0, grads);
  const double mean = l.sum / double(l.count);
  EXPECT_NEAR(mean, loss(), 1e-12);
  // forward_backward was given grad_scale 1 (sum); compare the mean: divide by count.
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  for (auto& [name, wg] : pairs(model.config(), model.mutable_weights(), grads.w)) {
    Tensor& w = *wg.first;
    const Tensor& g = *wg.second;
    Tensor dir_v = Tensor::zeros(w.shape(), DType::F64);
    for (int64_t i = 0; i < w.numel(); ++i) dir_v.data<double>()[i] = normal(rng);
    if (name.starts_with("embed_tokens"))  // both lookup tables
      for (int64_t j = 0; j < w.dim(1); ++j) dir_v.data<double>()[j] = 0.0;  // pad row 0
    double norm = 0;
    for (int64_t i = 0; i < w.numel(); ++i) norm += dir_v.data<double>()[i] * dir_v.data<double>()[i];
    for (int64_t i = 0; i < w.numel(); ++i) dir_v.data<double>()[i] /= std::sqrt(norm);  // unit direction
    double analytic = 0;
    for (int64_t i = 0; i < w.numel(); ++i) analytic += g.data<double>()[i] * dir_v.data<double>()[i];
    analytic /= double(l.count);
    Tensor w0 = w.clone();
    auto loss_at = [&](double s) {
      for (int64_t i = 0; i < w.numel(); ++i) w.data<double>()[i] = w0.data<double>()[i] + s * dir_v.data<double>()[i];
      return loss();
    };
    // Central differences at h and h/2, Richardson-combined to cancel the O(h²) error.
    const double h = 1e-3;
    const double d1 = (loss_at(h) - loss_at(-h)) / (2 * h);
    const double d2 = (loss_at(h / 2) - loss_at(-h / 2)) / h;
    loss_at(0);
    const double numeric = (4 * d2 - d1) / 3;
    EXPECT_NEAR(analytic, numeric, 1e-6 * std::max(1e-3, std::abs(numeric))) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, ModelGrad, ::testing::Values("dense_kv", "e2b", "e4b", "moe"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace tl
