// TimedOps over the CPU backend: a whole QLoRA training step of a golden model on it gives
// bit for bit the bare backend's losses and gradients, and its table counts every call by
// op family, the families' times adding up to the total.
#include <gtest/gtest.h>

#include "core/cpu/cpu_ops.h"
#include "core/timed_ops.h"
#include "golden_util.h"
#include "train/model/gemma4_model.h"
#include "train/model/peft_adapter.h"
#include "train/step/train_step.h"

namespace tl {
namespace {

// Two optimizer steps of QLoRA (r 4 on every projection) of the e2b golden model on `ops`;
// returns the losses and the first adapter's B after them.
std::pair<std::vector<double>, Tensor> qlora_steps(Ops& ops) {
  const std::string dir = test::golden("e2b");
  Gemma4Model model(Gemma4Config::load(dir), ops);
  model.load(Checkpoint::open(dir), Gemma4LoadOptions::nf4(true));
  const std::string prefix = "model.language_model.";
  LoraSpec spec;
  spec.r = 4;
  spec.alpha = 8;
  uint64_t seed = 3;
  for (const auto& name : select_lora_targets(model.config(), spec, prefix)) {
    const Tensor* w = weight_slot(model.mutable_weights(), name);
    Tensor A = Tensor::zeros({4, w->dim(1)}, DType::F32), B = Tensor::zeros({w->dim(0), 4}, DType::F32);
    lora_init(A, B, seed++);
    for (int64_t i = 0; i < B.numel(); ++i) B.data<float>()[i] = 0.01f * float((i * 37) % 11 - 5);
    model.attach_lora(name, A, B, 2.0);
  }
  AdamW opt({1e-3}, lora_param_slots(model, prefix), ops);
  Gemma4Grads none = model.no_grads();
  auto rec = SafetensorsFile::open(test::golden("e2b/forward.safetensors"));
  const Tensor ids = rec.get("input_ids");
  std::vector<MicroBatch> micro{{{ids, {}, {}}, ids}};
  std::vector<double> losses;
  for (int s = 0; s < 2; ++s) losses.push_back(train_step(model, none, opt, ops, micro, 1e-3, 1.0).loss);
  return {losses, ops.download(model.adapters().front()->B)};
}

TEST(TimedOps, CpuStepIsUnchangedAndEveryCallIsCountedByFamily) {
  CpuOps bare_ops(DType::F32), inner(DType::F32);
  TimedOps timed(inner);
  const auto [want_losses, want_b] = qlora_steps(bare_ops);
  const auto [losses, b] = qlora_steps(timed);
  ASSERT_EQ(losses.size(), want_losses.size());
  for (size_t i = 0; i < losses.size(); ++i) EXPECT_EQ(losses[i], want_losses[i]) << "step " << i;
  ASSERT_EQ(b.numel(), want_b.numel());
  for (int64_t i = 0; i < b.numel(); ++i) ASSERT_EQ(b.get(i), want_b.get(i)) << i;

  const TimedOps::Times t = timed.collect();
  int64_t calls = 0;
  double seconds = 0;
  std::map<std::string, int64_t> family_calls;
  for (const OpTime& f : t.by_family) {
    calls += f.calls;
    seconds += f.seconds;
    family_calls[f.family] = f.calls;
    EXPECT_GE(f.seconds, 0.0);
  }
  EXPECT_EQ(calls, t.calls);
  EXPECT_NEAR(seconds, t.seconds, 1e-9);
  for (const char* f : {"matmul", "nf4 matmul", "attention", "norm", "rope", "loss", "optimizer", "elementwise"})
    EXPECT_GT(family_calls[f], 0) << f << "\n" << t.table();
  EXPECT_NE(t.table().find("nf4 matmul"), std::string::npos);
  EXPECT_EQ(t.to_json()["calls"].get<int64_t>(), t.calls);
}

}  // namespace
}  // namespace tl
