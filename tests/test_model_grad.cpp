// The whole model's backward against finite differences of its forward, in fp64: for each
// weight tensor W and a random unit direction V (zero on the embedding's pad row, which
// PyTorch leaves without a lookup gradient), the derivative of L along V (central
// differences, Richardson-extrapolated) must equal ⟨∂L/∂W, V⟩ within 1e-6 relative.
#include <fmt/format.h>

#include <random>

#include "core/cpu/cpu_ops.h"
#include "golden_util.h"
#include "train/gemma4_model.h"

namespace tl {
namespace {

std::vector<std::pair<std::string, std::pair<Tensor*, Tensor*>>> pairs(Gemma4Weights& w, Gemma4Weights& g) {
  std::vector<std::pair<std::string, std::pair<Tensor*, Tensor*>>> out;
  auto add = [&](std::string n, Tensor& a, Tensor& b) {
    if (a.defined()) out.push_back({std::move(n), {&a, &b}});
  };
  add("embed_tokens", w.embed_tokens, g.embed_tokens);
  add("embed_tokens_per_layer", w.embed_tokens_per_layer, g.embed_tokens_per_layer);
  add("per_layer_model_projection", w.per_layer_model_projection, g.per_layer_model_projection);
  add("per_layer_projection_norm", w.per_layer_projection_norm, g.per_layer_projection_norm);
  add("norm", w.norm, g.norm);
  for (size_t i = 0; i < w.layers.size(); ++i) {
    auto& a = w.layers[i];
    auto& b = g.layers[i];
    auto L = [&](const char* n) { return fmt::format("layers.{}.{}", i, n); };
    add(L("input_layernorm"), a.input_layernorm, b.input_layernorm);
    add(L("q_proj"), a.q_proj, b.q_proj);
    add(L("q_norm"), a.q_norm, b.q_norm);
    add(L("k_proj"), a.k_proj, b.k_proj);
    add(L("v_proj"), a.v_proj, b.v_proj);
    add(L("k_norm"), a.k_norm, b.k_norm);
    add(L("o_proj"), a.o_proj, b.o_proj);
    add(L("post_attention_layernorm"), a.post_attention_layernorm, b.post_attention_layernorm);
    add(L("pre_feedforward_layernorm"), a.pre_feedforward_layernorm, b.pre_feedforward_layernorm);
    add(L("gate_proj"), a.gate_proj, b.gate_proj);
    add(L("up_proj"), a.up_proj, b.up_proj);
    add(L("down_proj"), a.down_proj, b.down_proj);
    add(L("post_feedforward_layernorm"), a.post_feedforward_layernorm, b.post_feedforward_layernorm);
    add(L("router_proj"), a.router_proj, b.router_proj);
    add(L("router_scale"), a.router_scale, b.router_scale);
    add(L("per_expert_scale"), a.per_expert_scale, b.per_expert_scale);
    add(L("experts_gate_up"), a.experts_gate_up, b.experts_gate_up);
    add(L("experts_down"), a.experts_down, b.experts_down);
    add(L("pre_feedforward_layernorm_2"), a.pre_feedforward_layernorm_2, b.pre_feedforward_layernorm_2);
    add(L("post_feedforward_layernorm_1"), a.post_feedforward_layernorm_1, b.post_feedforward_layernorm_1);
    add(L("post_feedforward_layernorm_2"), a.post_feedforward_layernorm_2, b.post_feedforward_layernorm_2);
    add(L("per_layer_input_gate"), a.per_layer_input_gate, b.per_layer_input_gate);
    add(L("per_layer_projection"), a.per_layer_projection, b.per_layer_projection);
    add(L("post_per_layer_input_norm"), a.post_per_layer_input_norm, b.post_per_layer_input_norm);
  }
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
  for (auto& [name, wg] : pairs(model.mutable_weights(), grads.w)) {
    Tensor& w = *wg.first;
    const Tensor& g = *wg.second;
    Tensor dir_v = Tensor::zeros(w.shape(), DType::F64);
    for (int64_t i = 0; i < w.numel(); ++i) dir_v.data<double>()[i] = normal(rng);
    if (name.starts_with("embed_tokens"))
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
