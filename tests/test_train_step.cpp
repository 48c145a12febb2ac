// The optimizer step (train/step/train_step.h) beyond the golden PEFT steps: a non-finite
// step is skipped and leaves nothing behind, so the steps after it train as if it had not
// happened, on the CPU backend and in strict-device mode.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/strict_ops.h"
#include "golden_util.h"
#include "train/model/peft_adapter.h"
#include "train/step/train_step.h"

namespace tl {
namespace {

enum class Backend { Cpu, Strict };

std::unique_ptr<Ops> make_ops(Backend b) {
  if (b == Backend::Cpu) return std::make_unique<CpuOps>(DType::F32);
  return std::make_unique<StrictOps>(DType::F32);
}

struct StepLog {
  std::vector<double> losses;
  std::vector<bool> skipped;
};

// QLoRA on the dense_kv golden model from PEFT's initial adapter, `steps` steps on the golden
// batch. With `poison` ≥ 0, the first adapter's A holds a NaN during that step (restored after
// it), which makes its loss and gradients non-finite.
StepLog qlora_run(Backend backend, int steps, int poison) {
  auto ops_ptr = make_ops(backend);
  Ops& ops = *ops_ptr;
  const std::string dir = test::golden("dense_kv");
  Gemma4Model m(Gemma4Config::load(dir), ops);
  m.load(Checkpoint::open(dir), Gemma4LoadOptions::nf4(true));
  const std::string prefix = decoder_prefix(Checkpoint::open(dir));
  PeftAdapter ad = read_peft_adapter(dir + "/lora/initial");
  for (const auto& a : ad.adapters)
    m.attach_lora(a.weight, a.A, a.B, ad.spec.scaling_for(prefix + a.weight.substr(0, a.weight.size() - 7)));
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  std::vector<MicroBatch> micro{{{rec.get("input_ids"), {}, {}}, rec.get("labels")}};
  AdamW opt({1e-2, 0.9, 0.999, 1e-8, 0.0}, lora_param_slots(m, prefix), ops);
  Gemma4Grads none = m.no_grads();
  LoraAdapter& first = *m.adapters().front();
  StepLog run;
  for (int k = 0; k < steps; ++k) {
    Tensor saved;
    if (k == poison) {
      saved = ops.download(first.A);
      Tensor bad = saved.clone();
      bad.data<float>()[0] = NAN;
      assign(ops, first.A, bad);  // in place: A is a view into the optimizer's flat buffer
    }
    const StepResult r = train_step(m, none, opt, ops, micro, 1e-2, 1.0);
    if (k == poison) assign(ops, first.A, saved);
    run.losses.push_back(r.loss);
    run.skipped.push_back(r.skipped);
  }
  return run;
}

class StepAfterNonFinite : public ::testing::TestWithParam<Backend> {};

// Steps: 0 normal, 1 poisoned (skipped: no update, Adam's t unchanged), 2 and 3 normal. The
// skipped step must leave no trace: steps 2 and 3 equal, bit for bit, steps 1 and 2 of a run
// that never had it. (Zeroing gradients by multiplying by 0 kept the NaN: NaN · 0 = NaN, and
// every later step was skipped.)
TEST_P(StepAfterNonFinite, LaterStepsTrainAsIfItNeverHappened) {
  const StepLog poisoned = qlora_run(GetParam(), 4, 1), clean = qlora_run(GetParam(), 3, -1);
  EXPECT_FALSE(poisoned.skipped[0]);
  EXPECT_TRUE(poisoned.skipped[1]);
  EXPECT_FALSE(std::isfinite(poisoned.losses[1]));
  for (int k : {2, 3}) {
    EXPECT_FALSE(poisoned.skipped[size_t(k)]) << "step " << k;
    EXPECT_EQ(poisoned.losses[size_t(k)], clean.losses[size_t(k - 1)]) << "step " << k;
  }
  EXPECT_EQ(poisoned.losses[0], clean.losses[0]);
  EXPECT_LT(clean.losses[2], clean.losses[0]);  // and it trains
}

INSTANTIATE_TEST_SUITE_P(Backends, StepAfterNonFinite, ::testing::Values(Backend::Cpu, Backend::Strict),
                         [](const auto& info) { return info.param == Backend::Cpu ? "Cpu" : "Strict"; });

// Recomputing some, all or none of the layers changes memory, never numbers: three QLoRA
// steps of the e2b golden model (10 layers, KV sharing, per-layer embeddings) give bit for bit
// the same losses and adapter whatever is recomputed; and the recomputation happens (a
// recomputed layer's forward runs its attention again, so more scores are counted).
struct Steps {
  std::vector<double> losses;
  Tensor B;
  int64_t attention_scores = 0;
};
Steps steps_with(const std::vector<bool>& checkpointed) {
  CpuOps ops(DType::F32);
  const std::string dir = test::golden("e2b");
  Gemma4Model m(Gemma4Config::load(dir), ops);
  m.load(Checkpoint::open(dir), Gemma4LoadOptions::nf4(true));
  m.set_checkpointed_layers(checkpointed);
  const std::string prefix = decoder_prefix(Checkpoint::open(dir));
  PeftAdapter ad = read_peft_adapter(dir + "/lora/initial");
  for (const auto& a : ad.adapters)
    m.attach_lora(a.weight, a.A, a.B, ad.spec.scaling_for(prefix + a.weight.substr(0, a.weight.size() - 7)), 0.1, 7);
  m.set_training(true);
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  std::vector<MicroBatch> micro{{{rec.get("input_ids"), {}, {}}, rec.get("labels")}};
  AdamW opt({1e-2}, lora_param_slots(m, prefix), ops);
  Gemma4Grads none = m.no_grads();
  std::vector<double> losses;
  for (int k = 0; k < 3; ++k) {
    m.set_training(true, uint64_t(k));
    losses.push_back(train_step(m, none, opt, ops, micro, 1e-2, 1.0).loss);
  }
  return {losses, m.adapters().back()->B.clone(), ops.attention_scores()};
}

TEST(Recompute, SomeAllOrNoLayersGiveTheSameSteps) {
  const size_t L = 10;
  const auto none = steps_with(std::vector<bool>(L, false)), all = steps_with(std::vector<bool>(L, true));
  std::vector<bool> some(L, false);
  for (size_t i : {1u, 4u, 5u, 8u}) some[i] = true;  // a KV source (4, 5) and a reader (8) among them
  const auto partial = steps_with(some);
  for (const auto* other : {&all, &partial}) {
    ASSERT_EQ(other->losses.size(), none.losses.size());
    for (size_t k = 0; k < none.losses.size(); ++k) EXPECT_EQ(other->losses[k], none.losses[k]) << "step " << k;
    EXPECT_EQ(test::compare(other->B, none.B).max_abs, 0.0);
  }
  EXPECT_GT(all.attention_scores, partial.attention_scores);
  EXPECT_GT(partial.attention_scores, none.attention_scores);
}

}  // namespace
}  // namespace tl
