// Streaming QLoRA load (issue 10): each tensor is read and, when it is to be NF4, quantized on
// the host right there and never uploaded in full precision; the MoE experts are NF4 too (one
// Nf4Tensor per expert slice). References: nf4_quantize of the checkpoint's own tensors (its
// bytes are pinned to bitsandbytes by test_nf4.cpp), and the old path, which uploaded every
// weight and then quantized it with quantize_nf4.
#include <fmt/format.h>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/strict_ops.h"
#include "core/plan.h"
#include "core/weights.h"
#include "golden_util.h"
#include "nf4_test_util.h"
#include "train/model/peft_adapter.h"
#include "train/step/train_step.h"

namespace tl {
namespace {

// The old path: everything uploaded in the activation dtype, then each projection quantized.
std::unique_ptr<Gemma4Model> load_then_quantize(const std::string& dir, Ops& ops) {
  auto m = std::make_unique<Gemma4Model>(Gemma4Config::load(dir), ops);
  Checkpoint ckpt = Checkpoint::open(dir);
  m->load(ckpt);
  const std::string prefix = decoder_prefix(ckpt);
  for (const WeightSpec& s : text_decoder_weights(m->config()))
    if (s.is_linear) m->quantize_nf4(s.name, ckpt.entry(prefix + s.name).dtype, true);
  return m;
}

std::unique_ptr<Gemma4Model> load_streaming(const std::string& dir, Ops& ops, const Gemma4LoadOptions& options) {
  auto m = std::make_unique<Gemma4Model>(Gemma4Config::load(dir), ops);
  m->load(Checkpoint::open(dir), options);
  return m;
}

TEST(StreamingLoad, QuantizesWhileReadingAndNeverUploadsProjectionsOrExperts) {
  const std::string dir = test::golden("moe");
  StrictOps strict(DType::F32);
  auto m = load_streaming(dir, strict, Gemma4LoadOptions::nf4(true));
  Checkpoint ckpt = Checkpoint::open(dir);
  const std::string prefix = decoder_prefix(ckpt);
  // What must have been uploaded: the tensors that stay dense (embeddings, norms, router
  // scales), in F32, and nothing else.
  int64_t dense_bytes = 0, quantized_bytes = 0;
  // The memory plan's NF4 footprint: what the loaded tensors hold (codes, 16-float NF4 map,
  // nested codes, nested absmax, 256-float dynamic map), the dense ones counted in bf16.
  double held_bytes = 0;
  auto nf4_held = [](const Nf4Tensor& t) {
    return double(t.packed.size() + 16 * 4 + t.absmax_q.size() + 4 * (t.nested_absmax.size() + t.nested_map.size()));
  };
  int projections = 0, experts = 0;
  for (const WeightSpec& s : text_decoder_weights(m->config())) {
    if (s.component == Component::LayerScalar) continue;
    const bool q = s.is_linear || s.component == Component::Experts;
    (q ? quantized_bytes : dense_bytes) += 4 * shape_numel(s.shape);
    if (!q) held_bytes += 2.0 * double(shape_numel(s.shape));
    if (!q) continue;
    const Tensor w = ckpt.get(prefix + s.name);
    if (s.is_linear) {
      ASSERT_NE(m->nf4(s.name), nullptr) << s.name;
      test::expect_same_nf4(*m->nf4(s.name), nf4_quantize(w, true), s.name);
      held_bytes += nf4_held(*m->nf4(s.name));
      ++projections;
    } else {
      ASSERT_EQ(m->nf4(s.name), nullptr);
      for (int64_t e = 0; e < s.shape[0]; ++e) {
        const Nf4Tensor* got = m->expert_nf4(s.name, e);
        ASSERT_NE(got, nullptr) << s.name << " expert " << e;
        const Tensor slice = w.slice_rows(e, e + 1).view({s.shape[1], s.shape[2]});
        test::expect_same_nf4(*got, nf4_quantize(slice, true), fmt::format("{} expert {}", s.name, e));
        held_bytes += nf4_held(*got);
        // The values the expert GEMMs multiply by: the slice's own NF4 dequantization.
        EXPECT_EQ(test::compare(nf4_dequantize(*got, DType::F32), nf4_dequantize(nf4_quantize(slice, true), DType::F32))
                      .max_abs,
                  0.0);
        ++experts;
      }
      EXPECT_EQ(m->expert_nf4(s.name, s.shape[0]), nullptr);
    }
  }
  EXPECT_EQ(projections, 6 * 7 + 4);  // q k o gate up down router per layer; v on the 4 sliding (K=V full)
  EXPECT_EQ(experts, 6 * 2 * 8);
  EXPECT_EQ(held_bytes, plan_model(m->config()).bytes_nf4);  // the plan counts experts as they are held
  // Besides the dense tensors, each layer's RoPE table goes up once, at load (F64 [head_dim/2]).
  for (const LayerGeometry& g : m->config().layers()) dense_bytes += 8 * (g.head_dim / 2);
  const TransferStats& t = strict.transfers();
  EXPECT_EQ(t.upload_bytes, dense_bytes) << "uploaded " << t.uploads << " tensors";
  EXPECT_LT(t.upload_bytes, quantized_bytes / 4);  // measured: 144832 B dense vs 1757184 B quantized, in F32
  EXPECT_EQ(t.download_bytes, 0);
  std::printf("moe streaming load: %lld bytes uploaded (dense tensors); projections + experts in F32 would be %lld\n",
              (long long)t.upload_bytes, (long long)quantized_bytes);
}

// 3 QLoRA steps from PEFT's initial adapter on the golden batch; returns the forward loss
// before training and each step's loss.
std::vector<double> qlora_losses(Gemma4Model& m, Ops& ops, const std::string& golden_dir, int steps = 3) {
  const Checkpoint ckpt = Checkpoint::open(golden_dir);
  const std::string prefix = decoder_prefix(ckpt);
  PeftAdapter ad = read_peft_adapter(golden_dir + "/lora/initial");
  for (const auto& a : ad.adapters)
    m.attach_lora(a.weight, a.A, a.B, ad.spec.scaling_for(prefix + a.weight.substr(0, a.weight.size() - 7)));
  auto rec = SafetensorsFile::open(golden_dir + "/forward.safetensors");
  std::vector<double> out{m.loss(m.forward_hidden({rec.get("input_ids"), {}, {}}), rec.get("labels")).mean()};
  std::vector<MicroBatch> micro{{{rec.get("input_ids"), {}, {}}, rec.get("labels")}};
  AdamW opt({2e-2, 0.9, 0.999, 1e-8, 0.0}, lora_param_slots(m, prefix), ops);
  Gemma4Grads none = m.no_grads();
  for (int k = 0; k < steps; ++k) out.push_back(train_step(m, none, opt, ops, micro, 2e-2, 1.0).loss);
  return out;
}

TEST(StreamingLoad, SameNf4BytesAndLossesAsUploadingThenQuantizing) {
  for (const char* variant : {"e2b", "dense_kv"}) {
    const std::string dir = test::golden(variant);
    CpuOps cpu(DType::F32);
    StrictOps strict(DType::F32);
    auto old_path = load_then_quantize(dir, cpu);
    auto streamed = load_streaming(dir, strict, Gemma4LoadOptions::nf4(true));
    for (const WeightSpec& s : text_decoder_weights(old_path->config())) {
      if (!s.is_linear) continue;
      ASSERT_NE(streamed->nf4(s.name), nullptr) << s.name;
      test::expect_same_nf4(*streamed->nf4(s.name), *old_path->nf4(s.name), s.name);
    }
    const std::vector<double> a = qlora_losses(*old_path, cpu, dir), b = qlora_losses(*streamed, strict, dir);
    ASSERT_EQ(a.size(), b.size());
    for (size_t k = 0; k < a.size(); ++k) EXPECT_EQ(a[k], b[k]) << variant << " loss " << k;
    EXPECT_LT(a.back(), a.front() - 1e-3) << variant << ": the adapter trained";
  }
}

// The NF4 experts' path against a dense model whose experts hold the NF4 dequantized values
// (uploaded as plain weights): the same computation through the dense GEMMs, so any
// difference is a wiring error, not quantization. Against the fp32 experts, the difference is
// the quantization error itself: nonzero, and a few percent of the loss at most.
TEST(MoeNf4, ExpertsInNf4TrainAsTheirDequantizedValues) {
  const std::string dir = test::golden("moe");
  CpuOps ops(DType::F32);
  auto nf4_experts = load_streaming(dir, ops, Gemma4LoadOptions::nf4(true));
  Gemma4LoadOptions projections_only;
  projections_only.quantize = [](const WeightSpec& s) { return s.is_linear; };
  auto fp32_experts = load_streaming(dir, ops, projections_only);
  auto dequantized = load_streaming(dir, ops, projections_only);
  ASSERT_EQ(fp32_experts->expert_nf4("layers.0.experts.gate_up_proj", 0), nullptr);
  for (const WeightSpec& s : text_decoder_weights(nf4_experts->config())) {
    if (s.component != Component::Experts) continue;
    const int64_t E = s.shape[0], per = s.shape[1] * s.shape[2];
    Tensor host = Tensor::zeros(s.shape, DType::F32);
    for (int64_t e = 0; e < E; ++e) {
      const Tensor d = nf4_dequantize(*nf4_experts->expert_nf4(s.name, e), DType::F32);
      std::copy(d.data<float>(), d.data<float>() + per, host.data<float>() + e * per);
    }
    *weight_slot(dequantized->mutable_weights(), s.name) = ops.upload(host, DType::F32);
  }
  const std::vector<double> q = qlora_losses(*nf4_experts, ops, dir), f = qlora_losses(*fp32_experts, ops, dir),
                            d = qlora_losses(*dequantized, ops, dir);
  double vs_dequantized = 0, vs_fp32 = 0;
  for (size_t k = 0; k < q.size(); ++k) {
    vs_dequantized = std::max(vs_dequantized, std::abs(q[k] - d[k]) / d[k]);
    vs_fp32 = std::max(vs_fp32, std::abs(q[k] - f[k]) / f[k]);
    std::printf("moe loss %zu: %.9f NF4 experts, %.9f dequantized dense experts, %.9f fp32 experts\n", k, q[k], d[k],
                f[k]);
  }
  std::printf("moe: max relative loss difference %.3g vs dequantized, %.3g vs fp32 experts\n", vs_dequantized, vs_fp32);
  EXPECT_LT(vs_dequantized, 1e-6);
  EXPECT_GT(vs_fp32, 1e-4);   // the experts really are quantized
  EXPECT_LT(vs_fp32, 5e-2);   // and only by NF4's error (measured 1% at step 0, 3.8% after 3 steps)
  EXPECT_LT(q.back(), q.front() - 1.0) << "the adapter trained over NF4 experts";
}

TEST(MoeNf4, FullTrainLayersKeepTheirExpertsAndProjectionsDense) {
  const std::string dir = test::golden("moe");
  CpuOps ops(DType::F32);
  auto m = load_streaming(dir, ops, Gemma4LoadOptions::nf4(true, {1}));
  EXPECT_NE(m->expert_nf4("layers.0.experts.down_proj", 3), nullptr);
  EXPECT_NE(m->nf4("layers.0.mlp.up_proj.weight"), nullptr);
  EXPECT_EQ(m->expert_nf4("layers.1.experts.down_proj", 3), nullptr);
  EXPECT_EQ(m->nf4("layers.1.mlp.up_proj.weight"), nullptr);
  EXPECT_NE(m->weights().layers[1].experts_down.data<float>(), nullptr);  // dense, uploaded
}

TEST(MoeNf4, ExpertGradientsOfNf4ExpertsAreRefused) {
  const std::string dir = test::golden("moe");
  CpuOps ops(DType::F32);
  auto m = load_streaming(dir, ops, Gemma4LoadOptions::nf4(true));
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  Gemma4Grads g = m->no_grads();
  g.w.layers[0].experts_down = ops.zeros({8, 64, 32});
  test::expect_error([&] { m->forward_backward({rec.get("input_ids"), {}, {}}, rec.get("labels"), 1.0, g); },
                     "NF4");
}

}  // namespace
}  // namespace tl
