// Distillation from the parent (issue 24):
//  - the loss ((1 − α)·Σ CE + α·T²·Σ KL)/N and every student LoRA gradient against PyTorch +
//    PEFT (tests/golden/distill, scripts/golden/make_distill_golden.py) for the whole
//    vocabulary and the parent's top k, with temperature and soft-cap, in fp64 (1e-10) and
//    fp32 (loss 1e-5, gradients 2e-5 relative: see the test), with the teacher over the
//    student's base and loaded on its own;
//  - the shared-weight teacher's logits equal, bit for bit in fp32 on the CPU, those of the
//    parent loaded on its own, for upscale and expand maps, dense and NF4;
//  - the KL op's gradient is the derivative of its sum (finite differences);
//  - the surgery record, the parent's layer order and the config keys.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "core/cpu/cpu_ops.h"
#include "core/weights.h"
#include "golden_util.h"
#include "train/model/peft_adapter.h"
#include "train/step/train_step.h"
#include "train/surgery/surgery.h"
#include "train/train_config.h"

namespace tl {
namespace {

namespace fs = std::filesystem;

// A directory removed at the end of the test.
struct TempDir {
  fs::path p;
  explicit TempDir(const std::string& name)
      : p(fs::temp_directory_path() / (name + "_" + std::to_string(::getpid()))) {
    fs::remove_all(p);
    fs::create_directories(p);
  }
  ~TempDir() { fs::remove_all(p); }
};

std::vector<int> order_of(const LayerMap& map, int parent_layers) {
  std::string why;
  auto order = parent_layer_order(map, parent_layers, {}, why);
  EXPECT_TRUE(order.has_value()) << why;
  return order.value_or(std::vector<int>{});
}

// ---- the PyTorch fixture -------------------------------------------------------------------

struct GoldenCase {
  std::string name;
  DType dtype;
  bool shared;  // teacher over the student's base (parent_view), else the parent loaded alone
};
// How ctest and gtest name a case (its bytes otherwise).
void PrintTo(const GoldenCase& c, std::ostream* os) {
  *os << c.name << ' ' << dtype_name(c.dtype) << (c.shared ? " shared" : " loaded");
}

class DistillGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(DistillGolden, LossAndLoraGradientsMatchPytorch) {
  const GoldenCase& gc = GetParam();
  const fs::path parent_dir = test::golden("e4b"), fixture = test::golden("distill");
  const auto cases = nlohmann::json::parse(std::ifstream(fixture / "cases.json"));
  const auto& c = cases["cases"][gc.name];
  const double alpha = c["alpha"], T = c["temperature"];
  const int64_t top_k = c["top_k"];
  TempDir tmp("tl_distill_golden");
  const Gemma4Config pc = Gemma4Config::load(parent_dir);
  const LayerMap map = slices_map(int(pc.num_hidden_layers), cases["slices"]);
  apply_layer_map(parent_dir, tmp.p / "student", map, IdentityMode::None, false, true);

  CpuOps ops(gc.dtype);
  Gemma4Model student(Gemma4Config::load(tmp.p / "student"), ops);
  Checkpoint ckpt = Checkpoint::open(tmp.p / "student");
  student.load(ckpt);
  const std::string prefix = decoder_prefix(ckpt);
  PeftAdapter ad = read_peft_adapter(fixture / "adapter");
  for (const auto& a : ad.adapters)
    student.attach_lora(a.weight, a.A, a.B, ad.spec.scaling_for(prefix + a.weight.substr(0, a.weight.size() - 7)));

  std::unique_ptr<Gemma4Model> teacher;
  if (gc.shared) {
    teacher = student.parent_view(pc, order_of(map, int(pc.num_hidden_layers)));
  } else {
    teacher = std::make_unique<Gemma4Model>(pc, ops);
    teacher->load(Checkpoint::open(parent_dir));
  }
  student.set_distillation({teacher.get(), alpha, T, top_k});
  auto rec = SafetensorsFile::open((parent_dir / "forward.safetensors").string());
  auto ref = SafetensorsFile::open((fixture / (gc.name + ".safetensors")).string());
  const Tensor labels = rec.get("labels");
  const int64_t N = count_targets(labels);
  ASSERT_EQ(N, cases["N"].get<int64_t>());
  Gemma4Grads none = student.no_grads();
  const auto l = student.forward_backward({rec.get("input_ids"), {}, {}}, labels, 1.0 / double(N), none);
  // fp64: the loss and every gradient tensor to 1e-10 of its largest entry. fp32: the loss to
  // 1e-5 relative (measured 2e-8 to 3e-8); the gradients of the whole-vocabulary and top-k
  // cases to 1e-5 relative, both as the largest error over the largest entry and as the norm
  // of the error over the norm of the reference (measured 5.6e-6 to 6.6e-6 full, 7.6e-6 to
  // 8.5e-6 top-k, with 1 or 2 threads), each tensor within 1e-4 of its own largest entry.
  // The pure case (α 1, T 1, no cross-entropy: sharper distributions, so the same logit
  // noise moves q − p more) measures 9.8e-6 to 1.08e-5 by the norm and up to 1.7e-5 by the
  // largest entry, and is held to 1.5e-5 and 2e-5: this 16-layer student's fp32 backward with
  // cross-entropy alone is already 1.8e-5 from its fp64 one by the per-tensor measure, and
  // computing the KL rows in double changes none of the figures: the noise is the model's
  // fp32 arithmetic, not the KL term's.
  const bool f64 = gc.dtype == DType::F64, pure = gc.name == "pure";
  const double tol = f64 ? 1e-10 : 1e-5, grad_tol = f64 ? 1e-10 : pure ? 2e-5 : 1e-5,
               tensor_tol = f64 ? 1e-10 : 1e-4, norm_tol = f64 ? 1e-10 : pure ? 1.5e-5 : 1e-5;
  const double loss = ((1 - alpha) * l.sum + alpha * T * T * l.kl_sum) / double(N);
  EXPECT_NEAR(loss, ref.get("loss").get(0), tol * std::abs(ref.get("loss").get(0)));
  EXPECT_NEAR(l.sum, ref.get("ce_sum").get(0), tol * std::abs(ref.get("ce_sum").get(0)));
  EXPECT_NEAR(l.kl_sum, ref.get("kl_sum").get(0), tol * std::abs(ref.get("kl_sum").get(0)));
  EXPECT_EQ(l.count, N);
  int checked = 0;
  test::Diff all;
  double sq_diff = 0, sq_ref = 0;  // the Frobenius norms of the error and of the reference
  for (ParamSlot& p : lora_param_slots(student, prefix)) {
    const Tensor want = ref.get(p.name);
    for (int64_t i = 0; i < want.numel() && i < p.grad->numel(); ++i) {
      const double r = want.get(i), e = p.grad->get(i) - r;
      sq_diff += e * e;
      sq_ref += r * r;
    }
    const auto d = test::compare(*p.grad, want);
    EXPECT_LE(d.rel(), tensor_tol) << p.name;
    all.max_abs = std::max(all.max_abs, d.max_abs);
    all.max_ref = std::max(all.max_ref, d.max_ref);
    ++checked;
  }
  EXPECT_EQ(size_t(checked), ref.entries().size() - 4);  // less loss, ce_sum, kl_sum, count
  EXPECT_LE(all.rel(), grad_tol);
  EXPECT_LE(std::sqrt(sq_diff / sq_ref), norm_tol) << "‖g − g_ref‖ / ‖g_ref‖ over every LoRA gradient";
}

INSTANTIATE_TEST_SUITE_P(
    Cases, DistillGolden,
    ::testing::Values(GoldenCase{"full", DType::F64, true}, GoldenCase{"topk", DType::F64, true},
                      GoldenCase{"pure", DType::F64, true}, GoldenCase{"full", DType::F64, false},
                      GoldenCase{"topk", DType::F64, false}, GoldenCase{"full", DType::F32, true},
                      GoldenCase{"topk", DType::F32, true}, GoldenCase{"pure", DType::F32, false}),
    [](const auto& info) {
      return info.param.name + "_" + (info.param.dtype == DType::F64 ? "f64" : "f32") + "_" +
             (info.param.shared ? "shared" : "loaded");
    });

// ---- the shared-weight teacher, bit for bit --------------------------------------------------

// Logits of `m` for a fixed batch (two rows of 40 tokens, the second packed from two documents).
Tensor logits_of(Gemma4Model& m, Ops& ops) {
  const int64_t B = 2, S = 40, V = m.config().vocab_size;
  Tensor ids = Tensor::zeros({B, S}, DType::I32), doc = Tensor::zeros({B, S}, DType::I32);
  std::mt19937 rng(5);
  for (int64_t i = 0; i < B * S; ++i) {
    ids.data<int32_t>()[i] = int32_t(3 + rng() % uint32_t(V - 3));
    doc.data<int32_t>()[i] = i >= S + 25 ? 1 : 0;
  }
  Tensor positions = Tensor::zeros({B, S}, DType::I32);
  for (int64_t i = 0; i < B * S; ++i) positions.data<int32_t>()[i] = int32_t(i >= S + 25 ? i - S - 25 : i % S);
  return ops.download(m.logits(m.forward_hidden({ids, positions, doc})));
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

struct ViewCase {
  std::string label, parent;  // golden-relative or source-relative parent directory
  LayerMap (*map)(int layers);
  IdentityMode mode;
  bool nf4;
  bool keep_kv_producers;
};

// NF4 of every projection and expert, except per_layer_model_projection: the student's is one
// tensor over all its layers' rows, and NF4's double quantization takes the mean of a whole
// tensor's block scales, so the student's NF4 of it is not the parent's NF4 of its smaller one
// (every other projection is its own tensor in both, and quantizes to the same bytes).
Gemma4LoadOptions nf4_options() {
  Gemma4LoadOptions o = Gemma4LoadOptions::nf4(true);
  auto all = o.quantize;
  o.quantize = [all](const WeightSpec& s) { return s.name != "per_layer_model_projection.weight" && all(s); };
  return o;
}

class ParentView : public ::testing::TestWithParam<ViewCase> {};

TEST_P(ParentView, LogitsEqualTheParentLoadedAloneBitwise) {
  const ViewCase& vc = GetParam();
  const fs::path parent_dir = vc.parent.starts_with("models/") ? fs::path(test::source_dir()) / vc.parent
                                                               : fs::path(test::golden(vc.parent));
  TempDir tmp("tl_parent_view");
  const Gemma4Config pc = Gemma4Config::load(parent_dir);
  const LayerMap map = vc.map(int(pc.num_hidden_layers));
  apply_layer_map(parent_dir, tmp.p / "student", map, vc.mode, vc.keep_kv_producers, true);
  // The record names the parent and the map the trainer reads back.
  const auto record = read_surgery_record(tmp.p / "student");
  ASSERT_TRUE(record.has_value());
  EXPECT_EQ(record->source, fs::absolute(parent_dir).lexically_normal());
  ASSERT_EQ(record->map.size(), map.size());
  for (size_t i = 0; i < map.size(); ++i) {
    EXPECT_EQ(record->map[i].source, map[i].source);
    EXPECT_EQ(record->map[i].identity, map[i].identity);
  }

  CpuOps ops(DType::F32);
  const Gemma4LoadOptions opts = vc.nf4 ? nf4_options() : Gemma4LoadOptions{};
  Gemma4Model parent(pc, ops), student(Gemma4Config::load(tmp.p / "student"), ops);
  parent.load(Checkpoint::open(parent_dir), opts);
  student.load(Checkpoint::open(tmp.p / "student"), opts);
  if (vc.nf4) ASSERT_NE(student.nf4("layers.0.self_attn.q_proj.weight"), nullptr);
  // A LoRA with B ≠ 0 on every projection of the student: the view runs without it.
  std::mt19937 rng(3);
  std::normal_distribution<double> nd(0.0, 0.05);
  for (const std::string& name : select_lora_targets(student.config(), LoraSpec{}, "model.")) {
    const Shape w = weight_slot(student.mutable_weights(), name)->shape();
    Tensor A = Tensor::zeros({2, w[1]}, DType::F32), B = Tensor::zeros({w[0], 2}, DType::F32);
    for (Tensor* t : {&A, &B})
      for (int64_t i = 0; i < t->numel(); ++i) t->data<float>()[i] = float(nd(rng));
    student.attach_lora(name, A, B, 2.0);
  }
  auto view = student.parent_view(pc, order_of(record->map, int(pc.num_hidden_layers)));
  const Tensor want = logits_of(parent, ops), got = logits_of(*view, ops);
  EXPECT_TRUE(bitwise_equal(got, want)) << vc.label << ": max |Δ| " << test::compare(got, want).max_abs;
  // The comparison can fail: the student itself (more layers, LoRA on) gives other logits.
  const Tensor own = logits_of(student, ops);
  EXPECT_GT(test::compare(own, want).max_abs, 1e-3) << vc.label;
}

LayerMap tiny_upscale(int n) { return slices_map(n, "0:4,0:4,4:6"); }
LayerMap tiny_expand(int n) { return duplicate_block(n, 0, 2, /*identity=*/true); }
LayerMap tiny_duplicate(int n) { return duplicate_block(n, 0, 2, /*identity=*/false); }
LayerMap dense_upscale(int n) { return slices_map(n, "0:3,1:6"); }
LayerMap dense_expand(int n) { return insert_identity_every(n, 2); }

INSTANTIATE_TEST_SUITE_P(
    Maps, ParentView,
    ::testing::Values(ViewCase{"tiny_upscale_dense", "models/tiny", tiny_upscale, IdentityMode::None, false, false},
                      ViewCase{"tiny_upscale_nf4", "models/tiny", tiny_upscale, IdentityMode::None, true, false},
                      ViewCase{"tiny_expand_dense", "models/tiny", tiny_expand, IdentityMode::ZeroOut, false, true},
                      ViewCase{"tiny_expand_nf4", "models/tiny", tiny_expand, IdentityMode::ZeroOut, true, true},
                      ViewCase{"tiny_duplicate_dense", "models/tiny", tiny_duplicate, IdentityMode::None, false, true},
                      ViewCase{"dense_kv_upscale_nf4", "dense_kv", dense_upscale, IdentityMode::None, true, false},
                      ViewCase{"dense_kv_expand_dense", "dense_kv", dense_expand, IdentityMode::ZeroPostnorm, false, true},
                      ViewCase{"dense_kv_expand_nf4", "dense_kv", dense_expand, IdentityMode::ZeroOut, true, true},
                      ViewCase{"moe_upscale_nf4", "moe", dense_upscale, IdentityMode::None, true, false}),
    [](const auto& info) { return info.param.label; });

TEST(ParentView, RefusesAnOrderWhoseLayersDoNotFit) {
  CpuOps ops(DType::F32);
  const fs::path dir = fs::path(test::source_dir()) / "models/tiny";
  const Gemma4Config pc = Gemma4Config::load(dir);
  Gemma4Model m(pc, ops);
  m.load(Checkpoint::open(dir));
  // Parent layer 3 (full attention) from layer 2 (sliding).
  test::expect_error([&] { (void)m.parent_view(pc, std::vector<int>{0, 1, 2, 2, 4, 5}); },
                     "parent layer 3 (full_attention");
  test::expect_error([&] { (void)m.parent_view(pc, std::vector<int>{0, 1, 2, 3}); }, "names 4 layers but the parent has 6");
  test::expect_error([&] { (void)m.parent_view(pc, std::vector<int>{0, 1, 2, 3, 4, 9}); }, "outside this model's 6");
  Gemma4Config other = pc;
  other.vocab_size = 100;
  test::expect_error([&] { (void)m.parent_view(other, std::vector<int>{0, 1, 2, 3, 4, 5}); }, "vocab_size");
}

TEST(ParentLayerOrder, SkipsIdentityAndTrainedLayersAndSaysWhichParentLayerIsMissing) {
  const LayerMap map = {{0, false}, {1, false}, {1, true}, {0, false}, {2, false}};
  std::string why;
  auto o = parent_layer_order(map, 3, {}, why);
  ASSERT_TRUE(o.has_value());
  EXPECT_EQ(*o, (std::vector<int>{0, 1, 4}));
  o = parent_layer_order(map, 3, {0}, why);  // layer 0 trained: the other copy of parent layer 0
  ASSERT_TRUE(o.has_value());
  EXPECT_EQ(*o, (std::vector<int>{3, 1, 4}));
  EXPECT_FALSE(parent_layer_order(map, 3, {1}, why).has_value());  // parent layer 1's only copy is trained
  EXPECT_EQ(why, "parent layer 1 has no frozen copy in the layer map");
  EXPECT_FALSE(parent_layer_order(map, 4, {}, why).has_value());
  EXPECT_EQ(why, "parent layer 3 has no frozen copy in the layer map");
}

// ---- the op: its gradient is the derivative of its sum ---------------------------------------

// With s = cap·tanh(z/cap), d(weight·T²·Σ kl)/dz from distill_kl_backward against central
// differences of distill_kl_sum in fp64, whole vocabulary and top k.
TEST(DistillKl, GradientIsTheDerivativeOfTheSum) {
  CpuOps ops(DType::F64);
  const int64_t n = 3, v = 37;
  const double cap = 30.0, T = 1.7, weight = 0.4;
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> u(-6, 6);
  Tensor z = Tensor::zeros({n, v}, DType::F64), t = Tensor::zeros({n, v}, DType::F64);
  for (int64_t i = 0; i < n * v; ++i) z.data<double>()[i] = u(rng), t.data<double>()[i] = u(rng);
  Tensor labels = Tensor::zeros({n}, DType::I32);
  labels.data<int32_t>()[1] = -100;  // an ignored row: no KL, no gradient
  auto capped = [&](const Tensor& x) {
    Tensor s = x.clone();
    ops.softcap_forward(s, cap);
    return s;
  };
  for (int64_t top_k : {int64_t(0), int64_t(6)}) {
    SCOPED_TRACE("top_k " + std::to_string(top_k));
    const Tensor s = capped(z);
    Tensor g = Tensor::zeros({n, v}, DType::F64);
    Tensor sums = Tensor::zeros({1}, DType::F64);
    ops.distill_kl_backward(s, t, labels, T, top_k, weight, cap, g, sums);
    EXPECT_EQ(ops.distill_kl_sum(s, t, labels, T, top_k).count, 2);
    EXPECT_NEAR(sums.data<double>()[0], ops.distill_kl_sum(s, t, labels, T, top_k).kl, 1e-13);
    const double h = 1e-6;
    double worst = 0;
    for (int64_t i = 0; i < n * v; ++i) {
      Tensor zp = z.clone(), zm = z.clone();
      zp.data<double>()[i] += h;
      zm.data<double>()[i] -= h;
      const double fp = ops.distill_kl_sum(capped(zp), t, labels, T, top_k).kl;
      const double fm = ops.distill_kl_sum(capped(zm), t, labels, T, top_k).kl;
      const double numeric = weight * T * T * (fp - fm) / (2 * h);
      worst = std::max(worst, std::abs(numeric - g.data<double>()[i]));
      if (i / v == 1) EXPECT_EQ(g.data<double>()[i], 0.0);
    }
    EXPECT_LT(worst, 1e-8);
  }
}

// The same logits for student and teacher: KL 0, every argmax agrees, no gradient; different
// ones: KL > 0.
TEST(DistillKl, IsZeroForIdenticalDistributions) {
  CpuOps ops(DType::F32);
  std::mt19937 rng(12);
  std::uniform_real_distribution<float> u(-5, 5);
  Tensor s = Tensor::zeros({4, 300}, DType::F32);
  for (int64_t i = 0; i < s.numel(); ++i) s.data<float>()[i] = u(rng);
  Tensor labels = Tensor::zeros({4}, DType::I32);
  const Ops::DistillSums same = ops.distill_kl_sum(s, s, labels, 2.0, 0);
  EXPECT_NEAR(same.kl, 0.0, 1e-6);
  EXPECT_EQ(same.agree, 4);
  Tensor g = Tensor::zeros({4, 300}, DType::F32);
  Tensor sums = Tensor::zeros({1}, DType::F64);
  ops.distill_kl_backward(s, s, labels, 2.0, 0, 1.0, 0.0, g, sums);
  for (int64_t i = 0; i < g.numel(); ++i) ASSERT_NEAR(g.data<float>()[i], 0.0f, 1e-8f);
  Tensor t = s.clone();
  for (int64_t i = 0; i < t.numel(); i += 7) t.data<float>()[i] += 1.0f;
  EXPECT_GT(ops.distill_kl_sum(s, t, labels, 2.0, 0).kl, 1e-3);
}

// ---- keys ----------------------------------------------------------------------------------

TrainConfig load_with(const std::vector<std::string>& overrides) {
  return TrainConfig::load(fs::path(test::source_dir()) / "configs/demo-heal.yaml", overrides);
}

TEST(DistillConfig, KeysAreReadAndRangeChecked) {
  const TrainConfig c = load_with({"distill_from=auto", "distill_alpha=0.8", "distill_temperature=2",
                                   "distill_top_k=16"});
  EXPECT_EQ(c.distill_from, "auto");
  EXPECT_EQ(c.distill_alpha, 0.8);
  EXPECT_EQ(c.distill_temperature, 2.0);
  EXPECT_EQ(c.distill_top_k, 16);
  // A relative distill_from is taken from the yaml's folder (configs/), as base_model is.
  EXPECT_EQ(fs::weakly_canonical(load_with({"distill_from=../models/tiny"}).distill_from),
            fs::weakly_canonical(fs::path(test::source_dir()) / "models/tiny"));
  test::expect_error([] { load_with({"distill_from=auto", "distill_alpha=1.5"}); }, "distill_alpha must be in [0, 1]");
  test::expect_error([] { load_with({"distill_from=auto", "distill_alpha=-0.1"}); }, "distill_alpha must be in [0, 1]");
  test::expect_error([] { load_with({"distill_from=auto", "distill_temperature=0"}); },
                     "distill_temperature must be in (0, inf)");
  test::expect_error([] { load_with({"distill_from=auto", "distill_temperature=.nan"}); },
                     "distill_temperature must be in (0, inf)");
  test::expect_error([] { load_with({"distill_from=auto", "distill_top_k=-1"}); }, "distill_top_k must be at least 0");
  test::expect_error([] { load_with({"distill_from=", "distill_alpha=0.5"}); },
                     "distill_alpha has no effect without distill_from");
  test::expect_error([] { load_with({"distil_from=auto"}); }, "did you mean 'distill_from'");
}

}  // namespace
}  // namespace tl
