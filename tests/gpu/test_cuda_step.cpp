// Whole training steps of the four golden variants (tests/golden/<variant>) on the GPU:
//   * F64 LoRA: three AdamW steps with warmup, clipping and accumulation equal PEFT's
//     recorded losses, norms and weights (the independent reference, as tests/test_peft_golden);
//   * the QLoRA step as torchless-train runs it (NF4 double-quantized bases and MoE experts on the device,
//     LoRA dropout 0.1 masks made on the device, bf16 projections, fp32 master weights):
//     CUDA against CPU with the same settings;
//   * the same step with bf16 activations (torchless-train's GPU numerics, issue 10) against the
//     CPU's fp32 step, with bf16 tolerances.
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <optional>

#include "core/weights.h"
#include "tests/golden_util.h"
#include "tests/gpu/gpu_test_util.h"
#include "train/model/peft_adapter.h"
#include "train/step/train_step.h"

namespace tl {
namespace {

struct StepModel {
  std::unique_ptr<Gemma4Model> model;
  std::string prefix;
  // With load_in_4bit both backends quantize the checkpoint's stored values while reading
  // them (the streaming load), so their NF4 bytes are the same whatever the activations.
  StepModel(const std::string& dir, Ops& ops, bool qlora, double dropout) {
    model = std::make_unique<Gemma4Model>(Gemma4Config::load(dir), ops);
    Checkpoint ckpt = Checkpoint::open(dir);
    // QLoRA as torchless-train loads it: streamed, projections and MoE experts in NF4.
    model->load(ckpt, qlora ? Gemma4LoadOptions::nf4(true) : Gemma4LoadOptions{});
    prefix = decoder_prefix(ckpt);
    PeftAdapter ad = read_peft_adapter(dir + "/lora/initial");
    uint64_t seed = 7;
    for (const auto& a : ad.adapters)
      model->attach_lora(a.weight, a.A, a.B, ad.spec.scaling_for(prefix + a.weight.substr(0, a.weight.size() - 7)),
                         dropout, seed++);
  }
};

std::vector<MicroBatch> two_micro_batches(const std::string& dir) {
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  std::vector<MicroBatch> micro;
  for (int64_t b = 0; b < 2; ++b)
    micro.push_back({{rec.get("input_ids").slice_rows(b, b + 1), {}, {}}, rec.get("labels").slice_rows(b, b + 1)});
  return micro;
}

class CudaStep : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaStep, ThreeLoraStepsMatchPeftInF64) {
  TL_REQUIRE_GPU();
  const std::string dir = test::golden(GetParam());
  CudaOps ops(DType::F64);
  StepModel s(dir, ops, false, 0.0);
  std::ifstream in(dir + "/lora/train.json");
  auto train = nlohmann::json::parse(in);
  auto micro = two_micro_batches(dir);
  AdamW opt({1e-3, 0.9, 0.999, 1e-8, 0.01}, lora_param_slots(*s.model, s.prefix), ops);
  Schedule sched{"cosine", 3, 1};
  Gemma4Grads none = s.model->no_grads();
  const double C = train["max_grad_norm_C"];
  for (int k = 0; k < 3; ++k) {
    auto r = train_step(*s.model, none, opt, ops, micro, 1e-3 * sched.factor(k), C);
    const auto& want = train["steps"][size_t(k)];
    EXPECT_NEAR(r.loss, want["loss"].get<double>(), 1e-11) << "step " << k;
    EXPECT_NEAR(r.grad_norm, want["pre_clip_norm"].get<double>(), 1e-9 * r.grad_norm) << "step " << k;
    EXPECT_EQ(r.targets, train["num_items_in_batch_N"].get<int64_t>());
  }
  auto after = SafetensorsFile::open(dir + "/lora/after_3_steps.safetensors");
  for (ParamSlot& p : opt.params()) {
    auto d = test::compare(ops.download(*p.value), after.get(p.name));
    EXPECT_LE(d.rel(), 1e-4) << p.name;
    EXPECT_LE(d.max_abs, 1e-9) << p.name;
  }
}

TEST_P(CudaStep, QloraStepMatchesCpu) {
  TL_REQUIRE_GPU();
  const std::string dir = test::golden(GetParam());
  CpuOps cpu(DType::F32, CpuMatmul::Bf16);
  CudaOps gpu(DType::F32, CudaMatmul::Bf16);
  StepModel sc(dir, cpu, true, 0.1), sg(dir, gpu, true, 0.1);
  auto micro = two_micro_batches(dir);
  AdamW oc({1e-3, 0.9, 0.999, 1e-8, 0.01}, lora_param_slots(*sc.model, sc.prefix), cpu);
  AdamW og({1e-3, 0.9, 0.999, 1e-8, 0.01}, lora_param_slots(*sg.model, sg.prefix), gpu);
  Gemma4Grads nc = sc.model->no_grads(), ng = sg.model->no_grads();
  for (int k = 0; k < 2; ++k) {
    sc.model->set_training(true, uint64_t(k));
    sg.model->set_training(true, uint64_t(k));
    auto rc = train_step(*sc.model, nc, oc, cpu, micro, 1e-3, 1.0);
    auto rg = train_step(*sg.model, ng, og, gpu, micro, 1e-3, 1.0);
    // fp32 with bf16 products summed in different orders: 1e-5 relative on the loss.
    EXPECT_NEAR(rg.loss, rc.loss, 1e-5 * rc.loss) << "step " << k;
    EXPECT_NEAR(rg.grad_norm, rc.grad_norm, 1e-3 * rc.grad_norm) << "step " << k;
    EXPECT_EQ(rg.targets, rc.targets);
    EXPECT_NEAR(double(rg.correct), double(rc.correct), 1.0) << "an argmax near a tie may flip";
  }
  for (size_t i = 0; i < oc.params().size(); ++i) {
    auto d = test::compare(gpu.download(*og.params()[i].value), *oc.params()[i].value);
    EXPECT_LE(d.rel(), 1e-3) << oc.params()[i].name;
  }
}

// ‖a − b‖₂ / ‖b‖₂ over host copies (any float dtypes).
double rel_l2(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  double num = 0, den = 0;
  for (int64_t i = 0; i < std::min(a.numel(), b.numel()); ++i) {
    const double d = a.get(i) - b.get(i);
    num += d * d;
    den += b.get(i) * b.get(i);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The QLoRA step with bf16 activations against the CPU's fp32 one. Both quantize the same
// bf16-rounded bases (the fixtures are fp32: the GPU holds its weights in bf16), so the NF4
// bytes agree and what differs is the bf16 storage of activations, norms and embeddings. That
// storage rounds each value to 2^-9 relative, so the bounds are bf16's, not fp32's: the loss
// within 1% relative, each adapter gradient within 5% (relative L2) of the CPU's, the
// gradient norm within 5%; the masters, their gradients and Adam's moments stay F32.
TEST_P(CudaStep, QloraStepWithBf16ActivationsTracksCpu) {
  TL_REQUIRE_GPU();
  const std::string dir = test::golden(GetParam());
  CpuOps cpu(DType::F32, CpuMatmul::Bf16);
  CudaOps gpu(DType::BF16, CudaMatmul::Bf16);
  StepModel sc(dir, cpu, true, 0.1), sg(dir, gpu, true, 0.1);
  auto micro = two_micro_batches(dir);
  {  // One forward and backward: the loss and every adapter gradient.
    sc.model->set_training(true, 0);
    sg.model->set_training(true, 0);
    Gemma4Grads nc = sc.model->no_grads(), ng = sg.model->no_grads();
    const auto lc = sc.model->forward_backward(micro[0].batch, micro[0].labels, 1.0 / 16, nc);
    const auto lg = sg.model->forward_backward(micro[0].batch, micro[0].labels, 1.0 / 16, ng);
    EXPECT_EQ(lg.count, lc.count);
    EXPECT_NEAR(lg.sum, lc.sum, 1e-2 * std::abs(lc.sum));
    const auto ac = sc.model->adapters(), ag = sg.model->adapters();
    ASSERT_EQ(ac.size(), ag.size());
    for (size_t i = 0; i < ac.size(); ++i) {
      ASSERT_EQ(ag[i]->A.dtype(), DType::F32) << ag[i]->name;
      ASSERT_EQ(ag[i]->dA.dtype(), DType::F32) << ag[i]->name;
      ASSERT_EQ(ag[i]->dB.dtype(), DType::F32) << ag[i]->name;
      EXPECT_LE(rel_l2(gpu.download(ag[i]->dA), ac[i]->dA), 5e-2) << ag[i]->name << " dA";
      EXPECT_LE(rel_l2(gpu.download(ag[i]->dB), ac[i]->dB), 5e-2) << ag[i]->name << " dB";
    }
  }
  StepModel tc(dir, cpu, true, 0.1), tg(dir, gpu, true, 0.1);
  AdamW oc({1e-3, 0.9, 0.999, 1e-8, 0.01}, lora_param_slots(*tc.model, tc.prefix), cpu);
  AdamW og({1e-3, 0.9, 0.999, 1e-8, 0.01}, lora_param_slots(*tg.model, tg.prefix), gpu);
  Gemma4Grads nc = tc.model->no_grads(), ng = tg.model->no_grads();
  for (int k = 0; k < 2; ++k) {
    tc.model->set_training(true, uint64_t(k));
    tg.model->set_training(true, uint64_t(k));
    auto rc = train_step(*tc.model, nc, oc, cpu, micro, 1e-3, 1.0);
    auto rg = train_step(*tg.model, ng, og, gpu, micro, 1e-3, 1.0);
    EXPECT_NEAR(rg.loss, rc.loss, 1e-2 * rc.loss) << "step " << k;
    EXPECT_NEAR(rg.grad_norm, rc.grad_norm, 5e-2 * rc.grad_norm) << "step " << k;
    EXPECT_EQ(rg.targets, rc.targets);
  }
  for (const ParamSlot& p : og.params()) {
    EXPECT_EQ(p.value->dtype(), DType::F32) << p.name;
    EXPECT_EQ(p.m.dtype(), DType::F32) << p.name;
    EXPECT_EQ(p.v.dtype(), DType::F32) << p.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, CudaStep, ::testing::Values("dense_kv", "e2b", "e4b", "moe"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace tl
