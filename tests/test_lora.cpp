// LoRA on every projection of each variant, in fp64: gradients of A and B (with dropout)
// against finite differences, and B = 0 leaving the model unchanged.
#include <random>

#include "core/cpu/cpu_ops.h"
#include "core/weights.h"
#include "golden_util.h"
#include "train/model/gemma4_model.h"

namespace tl {
namespace {

std::vector<std::string> linear_targets(const Gemma4Config& c) {
  std::vector<std::string> out;
  for (const auto& s : text_decoder_weights(c))
    if (s.is_linear) out.push_back(s.name);
  return out;
}

Tensor random(Shape s, uint64_t seed, double scale) {
  Tensor t = Tensor::zeros(std::move(s), DType::F64);
  for (int64_t i = 0; i < t.numel(); ++i)
    t.data<double>()[i] = (unit_double(splitmix64(seed * 7919 + uint64_t(i))) - 0.5) * 2 * scale;
  return t;
}

class Lora : public ::testing::TestWithParam<std::string> {};

TEST_P(Lora, ZeroBLeavesLogitsUnchanged) {
  const std::string dir = test::golden(GetParam());
  CpuOps ops(DType::F64);
  Gemma4Model model(Gemma4Config::load(dir), ops);
  model.load(Checkpoint::open(dir));
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  Batch b{rec.get("input_ids"), {}, {}};
  Tensor before = model.logits(model.forward_hidden(b));
  uint64_t seed = 1;
  for (const auto& name : linear_targets(model.config())) {
    Tensor* w = weight_slot(model.mutable_weights(), name);
    Tensor A = Tensor::zeros({4, w->dim(1)}, DType::F64), B = Tensor::zeros({w->dim(0), 4}, DType::F64);
    lora_init(A, B, seed++);
    model.attach_lora(name, A, B, lora_scaling(8, 4, false));
  }
  EXPECT_EQ(test::compare(model.logits(model.forward_hidden(b)), before).max_abs, 0.0);
}

TEST_P(Lora, AdapterGradientsMatchFiniteDifferences) {
  const std::string dir = test::golden(GetParam());
  CpuOps ops(DType::F64);
  Gemma4Model model(Gemma4Config::load(dir), ops);
  model.load(Checkpoint::open(dir));
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  Tensor ids = rec.get("input_ids").to(DType::I32).view({48}).slice_rows(0, 12).view({1, 12});
  Tensor labels = rec.get("labels").to(DType::I32).view({48}).slice_rows(0, 12).view({1, 12});
  Batch batch{ids, {}, {}};
  uint64_t seed = 100;
  for (const auto& name : linear_targets(model.config())) {
    Tensor* w = weight_slot(model.mutable_weights(), name);
    const int64_t r = 3;
    // B ≠ 0 (PEFT's init_lora_weights=False) so A's gradient is not zero; rsLoRA scaling;
    // dropout on, its masks fixed by (seed, step).
    model.attach_lora(name, random({r, w->dim(1)}, seed, 0.2), random({w->dim(0), r}, seed + 1, 0.2),
                      lora_scaling(6, r, true), 0.25, seed + 2);
    seed += 3;
  }
  model.set_training(true, 5);
  Gemma4Grads none = model.no_grads();
  auto l = model.forward_backward(batch, labels, 1.0, none);
  auto loss = [&] { return model.loss(model.forward_hidden(batch), labels).sum; };
  EXPECT_NEAR(l.sum, loss(), 1e-10);
  std::mt19937_64 rng(3);
  std::normal_distribution<double> normal;
  int checked = 0;
  for (LoraAdapter* a : model.adapters()) {
    for (auto [param, grad] : {std::pair{&a->A, &a->dA}, std::pair{&a->B, &a->dB}}) {
      Tensor v = Tensor::zeros(param->shape(), DType::F64);
      double norm = 0;
      for (int64_t i = 0; i < v.numel(); ++i) norm += std::pow(v.data<double>()[i] = normal(rng), 2);
      double analytic = 0;
      for (int64_t i = 0; i < v.numel(); ++i) {
        v.data<double>()[i] /= std::sqrt(norm);
        analytic += v.data<double>()[i] * grad->data<double>()[i];
      }
      Tensor p0 = param->clone();
      auto at = [&](double s) {
        for (int64_t i = 0; i < v.numel(); ++i) param->data<double>()[i] = p0.data<double>()[i] + s * v.data<double>()[i];
        return loss();
      };
      const double h = 1e-3;
      double d1 = (at(h) - at(-h)) / (2 * h), d2 = (at(h / 2) - at(-h / 2)) / h;
      at(0);
      double numeric = (4 * d2 - d1) / 3;
      EXPECT_NEAR(analytic, numeric, 1e-6 * std::max(1e-2, std::abs(numeric))) << a->name;
      ++checked;
    }
  }
  EXPECT_GT(checked, 20);
}

TEST_P(Lora, GradientCheckpointingGivesIdenticalGradients) {
  const std::string dir = test::golden(GetParam());
  auto run = [&](bool checkpointing) {
    CpuOps ops(DType::F32);
    Gemma4Model model(Gemma4Config::load(dir), ops);
    model.load(Checkpoint::open(dir));
    uint64_t seed = 7;
    for (const auto& name : linear_targets(model.config())) {
      Tensor* w = weight_slot(model.mutable_weights(), name);
      model.attach_lora(name, random({2, w->dim(1)}, seed, 0.2).to(DType::F32),
                        random({w->dim(0), 2}, seed + 1, 0.2).to(DType::F32), 2.0, 0.1, seed + 2);
      seed += 3;
    }
    model.set_gradient_checkpointing(checkpointing);
    model.set_training(true, 3);
    auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
    Gemma4Grads g = model.zero_grads();  // base weights too: every gradient path
    model.forward_backward({rec.get("input_ids"), {}, {}}, rec.get("labels"), 0.01, g);
    std::vector<Tensor> out;
    for (LoraAdapter* a : model.adapters()) out.push_back(a->dA.clone()), out.push_back(a->dB.clone());
    out.push_back(g.w.embed_tokens.clone());
    out.push_back(g.w.layers[0].q_proj.clone());
    return out;
  };
  auto plain = run(false), ckpt = run(true);
  ASSERT_EQ(plain.size(), ckpt.size());
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_EQ(test::compare(ckpt[i], plain[i]).max_abs, 0.0) << i;
}

TEST_P(Lora, QloraNf4TilesEqualTheDequantizedDenseWeights) {
  // Holding projections in NF4 and dequantizing by tiles computes the same thing as a dense
  // model whose projections hold the dequantized values (what bitsandbytes multiplies by).
  const std::string dir = test::golden(GetParam());
  CpuOps ops(DType::F64);
  Gemma4Model q(Gemma4Config::load(dir), ops), d(Gemma4Config::load(dir), ops);
  q.load(Checkpoint::open(dir));
  d.load(Checkpoint::open(dir));
  uint64_t seed = 11;
  size_t quantized = 0;
  for (const auto& name : linear_targets(q.config())) {
    Tensor* w = weight_slot(d.mutable_weights(), name);
    Tensor A = random({2, w->dim(1)}, seed, 0.3), B = random({w->dim(0), 2}, seed + 1, 0.3);
    seed += 2;
    q.quantize_nf4(name, DType::BF16, true);
    *w = ops.upload(nf4_dequantize(*q.nf4(name)), DType::F64);
    q.attach_lora(name, A, B, 1.5);
    d.attach_lora(name, A, B, 1.5);
    ++quantized;
  }
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  Batch b{rec.get("input_ids"), {}, {}};
  auto diff = test::compare(q.logits(q.forward_hidden(b)), d.logits(d.forward_hidden(b)));
  EXPECT_LE(diff.rel(), 1e-12);
  Gemma4Grads gq = q.no_grads(), gd = d.no_grads();
  q.forward_backward(b, rec.get("labels"), 0.02, gq);
  d.forward_backward(b, rec.get("labels"), 0.02, gd);
  auto aq = q.adapters(), ad = d.adapters();
  for (size_t i = 0; i < aq.size(); ++i) {
    EXPECT_LE(test::compare(aq[i]->dA, ad[i]->dA).rel(), 1e-10) << aq[i]->name;
    EXPECT_LE(test::compare(aq[i]->dB, ad[i]->dB).rel(), 1e-10) << aq[i]->name;
  }
  EXPECT_GT(quantized, 10u);
}

INSTANTIATE_TEST_SUITE_P(Variants, Lora, ::testing::Values("dense_kv", "e2b", "e4b", "moe"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace tl
