// LoRA against PEFT on each tiny model, float64 (tests/golden/<variant>/lora, made by
// scripts/golden/make_train_golden.py): the adapter PEFT saved loads, every lora_A/lora_B
// gradient matches PEFT's autograd, and 3 AdamW steps with warmup, clipping and gradient
// accumulation (normalised by the targets of both micro-batches) give PEFT's weights.
#include <nlohmann/json.hpp>

#include <fstream>

#include "core/cpu/cpu_ops.h"
#include "core/weights.h"
#include "golden_util.h"
#include "train/model/peft_adapter.h"
#include "train/step/train_step.h"

namespace tl {
namespace {

struct LoraModel {
  CpuOps ops{DType::F64};
  std::unique_ptr<Gemma4Model> model;
  std::string prefix;
  explicit LoraModel(const std::string& dir) {
    model = std::make_unique<Gemma4Model>(Gemma4Config::load(dir), ops);
    Checkpoint ckpt = Checkpoint::open(dir);
    model->load(ckpt);
    prefix = decoder_prefix(ckpt);
    PeftAdapter ad = read_peft_adapter(dir + "/lora/initial");
    // PEFT's all-linear chose exactly what ours chooses.
    std::vector<std::string> ours = select_lora_targets(model->config(), LoraSpec{}, prefix);
    std::vector<std::string> theirs;
    for (const auto& a : ad.adapters) theirs.push_back(a.weight);
    std::sort(ours.begin(), ours.end());
    std::sort(theirs.begin(), theirs.end());
    EXPECT_EQ(ours, theirs);
    for (const auto& a : ad.adapters)
      model->attach_lora(a.weight, a.A, a.B, ad.spec.scaling_for(prefix + a.weight.substr(0, a.weight.size() - 7)));
  }
};

class PeftGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(PeftGolden, LoraGradientsMatchPeft) {
  const std::string dir = test::golden(GetParam());
  LoraModel s(dir);
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  auto ref = SafetensorsFile::open(dir + "/lora/grads.safetensors");
  Tensor labels = rec.get("labels");
  Gemma4Grads none = s.model->no_grads();
  auto l = s.model->forward_backward({rec.get("input_ids"), {}, {}}, labels, 1.0 / double(count_targets(labels)), none);
  EXPECT_NEAR(l.mean(), ref.get("loss").get(0), 1e-12);
  int checked = 0;
  for (ParamSlot& p : lora_param_slots(*s.model, s.prefix)) {
    auto d = test::compare(*p.grad, ref.get(p.name));
    EXPECT_LE(d.rel(), 1e-9) << p.name;
    ++checked;
  }
  EXPECT_EQ(size_t(checked), ref.entries().size() - 1);
}

TEST_P(PeftGolden, ThreeStepsWithWarmupClippingAndAccumulationMatchPeft) {
  const std::string dir = test::golden(GetParam());
  LoraModel s(dir);
  std::ifstream in(dir + "/lora/train.json");
  auto train = nlohmann::json::parse(in);
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  std::vector<MicroBatch> micro;
  for (int64_t b = 0; b < 2; ++b) {
    Tensor ids = rec.get("input_ids").slice_rows(b, b + 1), labels = rec.get("labels").slice_rows(b, b + 1);
    micro.push_back({{ids, {}, {}}, labels});
  }
  AdamW opt({1e-3, 0.9, 0.999, 1e-8, 0.01}, lora_param_slots(*s.model, s.prefix), s.ops);
  Schedule sched{"cosine", 3, 1};
  Gemma4Grads none = s.model->no_grads();
  const double C = train["max_grad_norm_C"];
  for (int k = 0; k < 3; ++k) {
    auto r = train_step(*s.model, none, opt, s.ops, micro, 1e-3 * sched.factor(k), C);
    const auto& want = train["steps"][size_t(k)];
    EXPECT_NEAR(r.loss, want["loss"].get<double>(), 1e-12) << "step " << k;
    EXPECT_NEAR(r.grad_norm, want["pre_clip_norm"].get<double>(), 1e-9 * r.grad_norm) << "step " << k;
    EXPECT_EQ(r.targets, train["num_items_in_batch_N"].get<int64_t>());
  }
  auto after = SafetensorsFile::open(dir + "/lora/after_3_steps.safetensors");
  for (ParamSlot& p : opt.params()) {
    auto d = test::compare(*p.value, after.get(p.name));
    EXPECT_LE(d.rel(), 1e-4) << p.name;  // the acceptance bound; we see ~1e-12
    EXPECT_LE(d.max_abs, 1e-9) << p.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, PeftGolden, ::testing::Values("dense_kv", "e2b", "e4b", "moe"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace tl
