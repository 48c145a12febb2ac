// Backend selection without a GPU (tools/backend.h) and the per-GPU memory plan of
// `torchless-train --dry-run` (train/step/memory_plan.h) on the released configs.
#include <gtest/gtest.h>

#include <algorithm>

#include <cstdlib>

#include "core/plan.h"
#include "tools/backend.h"
#include "train/step/memory_plan.h"

namespace tl {
namespace {

constexpr double kGiB = double(1ull << 30);

TEST(Backend, NamesAreAutoCpuCuda) {
  EXPECT_EQ(parse_backend("auto", "k"), BackendKind::Auto);
  EXPECT_EQ(parse_backend("cpu", "k"), BackendKind::Cpu);
  EXPECT_EQ(parse_backend("cuda", "k"), BackendKind::Cuda);
  try {
    parse_backend("gpu", "heal.yaml: backend");
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "heal.yaml: backend: 'gpu' is not a backend (auto, cpu, cuda)");
  }
}

TEST(Backend, WithoutAGpuAutoTakesTheCpuAndCudaFailsInOneLine) {
  if (cuda_available()) GTEST_SKIP() << "a GPU is present: this test is for machines without one";
  Backend b = make_backend(BackendKind::Auto, {DType::F32, false});
  EXPECT_EQ(b.kind, BackendKind::Cpu);
  EXPECT_EQ(b.ops->device(), Device::CPU);
  EXPECT_EQ(b.device, -1);
  EXPECT_TRUE(b.description.starts_with("cpu (auto: ")) << b.description;
  EXPECT_EQ(make_backend(BackendKind::Cpu, {DType::F64, false}).ops->act_dtype(), DType::F64);
  try {
    make_backend(BackendKind::Cuda);
    FAIL() << "cuda without a GPU was accepted";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_TRUE(m.starts_with("backend: cuda was asked for but ")) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos);
  }
}

TEST(Backend, LocalRankComesFromTheLauncher) {
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID",
                        "LOCAL_RANK"})
    unsetenv(v);
  EXPECT_EQ(local_rank(), 0);
  setenv("LOCAL_RANK", "3", 1);
  EXPECT_EQ(local_rank(), 3);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);  // Open MPI's variable wins
  EXPECT_EQ(local_rank(), 1);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "x1", 1);
  EXPECT_THROW(local_rank(), Error);
  unsetenv("OMPI_COMM_WORLD_LOCAL_RANK");
  unsetenv("LOCAL_RANK");
}

Gemma4Config released(const char* name) {
  return Gemma4Config::load(std::string(TL_MODELS_DIR) + "/" + name);
}

// The 31B at seq 2048, micro-batch 1, LoRA r16 on every projection, gradient checkpointing.
TEST(MemoryPlan, Gemma31BQloraFitsIn22GiBWithBf16Activations) {
  const Gemma4Config c = released("gemma-4-31B-it");
  LoraSpec spec;
  spec.r = 16;
  spec.alpha = 16;
  spec.target_modules = {"all-linear"};
  const int64_t lora = lora_param_count(c, spec, "model.language_model.");
  // By hand: r·(in + out) per projection. 50 sliding layers: q 5376→8192, k and v 5376→4096,
  // o 8192→5376, gate and up 5376→21504, down 21504→5376; 10 full layers (K=V: no v_proj):
  // q 5376→16384, k 5376→2048, o 16384→5376, the same MLP.
  const int64_t sliding = 16 * ((5376 + 8192) + 2 * (5376 + 4096) + (8192 + 5376) + 3 * (5376 + 21504));
  const int64_t full = 16 * ((5376 + 16384) + (5376 + 2048) + (16384 + 5376) + 3 * (5376 + 21504));
  EXPECT_EQ(lora, 50 * sliding + 10 * full);
  MemoryPlanInput in;
  in.sequence_len = 2048;
  in.micro_batch = 1;
  in.lora_params = lora;
  in.act_bytes = 2;
  const MemoryPlan p = plan_training_memory(c, in);
  EXPECT_DOUBLE_EQ(p.weights, plan_model(c).bytes_nf4);
  EXPECT_DOUBLE_EQ(p.trainable, 16.0 * double(lora));
  EXPECT_DOUBLE_EQ(p.checkpoints, 60.0 * 2048 * 5376 * 2);  // each layer's input, bf16
  EXPECT_DOUBLE_EQ(p.kv_kept, 0.0);                          // no KV-shared layers
  EXPECT_DOUBLE_EQ(p.cross_entropy, 2.0 * 256 * 262144 * 4);  // fp32 logits and gradient of one chunk
  EXPECT_DOUBLE_EQ(p.dequant, 2.0 * 21504 * 5376);            // the largest projection in bf16
  EXPECT_GT(p.working_set, 2048.0 * 3 * 21504 * 2);           // at least the MLP's gate, up, h
  EXPECT_LE(p.total() / kGiB, 22.0) << format_memory_plan(c, in);
  EXPECT_GT(p.total() / kGiB, 18.0);  // weights and LoRA state alone are 18.5 GiB
  // The same run storing fp32 activations (today's backends) does not fit, and says so.
  in.act_bytes = 4;
  EXPECT_GT(plan_training_memory(c, in).total() / kGiB, 22.0);
  EXPECT_NE(format_memory_plan(c, in).find("with bf16 activation storage"), std::string::npos);
}

TEST(MemoryPlan, Gemma26BExpertsAreCountedInNf4) {
  const Gemma4Config c = released("gemma-4-26B-A4B-it");
  MemoryPlanInput in;
  in.lora_params = 1;
  const MemoryPlan p = plan_training_memory(c, in);
  const ModelPlan mp = plan_model(c);
  EXPECT_DOUBLE_EQ(p.weights, mp.bytes_nf4);
  // Experts are most of the 26B: in bf16 they alone would be 2 bytes per parameter.
  const double experts = double(mp.params_by_component.at(Component::Experts));
  EXPECT_GT(experts, 0.8 * double(mp.total_params));
  EXPECT_LT(p.weights, 0.6 * experts + 2.0 * double(mp.total_params - int64_t(experts)));
  in.load_in_4bit = false;
  EXPECT_DOUBLE_EQ(plan_training_memory(c, in).weights, mp.bytes_bf16);
}

// `gradient_checkpointing: auto` on the 31B (seq 2048, r16 everywhere, bf16 activations): on an
// 80 GiB card every layer keeps its tape (60 × ~138k values a token: 32 GiB) and the plan stays
// under 78 GiB; at 22 GiB every layer is recomputed and the plan fits; in between the fewest
// layers are recomputed (one fewer would not fit).
TEST(MemoryPlan, AutoCheckpointingRecomputesTheFewestLayersThatFit) {
  const Gemma4Config c = released("gemma-4-31B-it");
  LoraSpec spec;
  spec.r = 16;
  spec.alpha = 16;
  MemoryPlanInput in;
  in.sequence_len = 2048;
  in.micro_batch = 1;
  in.lora_params = lora_param_count(c, spec, "model.language_model.");
  in.act_bytes = 2;
  const double GiB = double(1ull << 30);
  auto count = [](const std::vector<bool>& v) { return std::count(v.begin(), v.end(), true); };
  const std::vector<bool> all_kept = checkpointed_layers(c, in, 80 * GiB);
  EXPECT_EQ(count(all_kept), 0);
  in.checkpointed = all_kept;
  EXPECT_LT(plan_training_memory(c, in).total(), 78 * GiB);
  EXPECT_GT(plan_training_memory(c, in).checkpoints, 60.0 * 2048 * 130000 * 2);  // every tape, ~138k a token
  const std::vector<bool> tight = checkpointed_layers(c, in, 22 * GiB);
  EXPECT_EQ(count(tight), 60);  // at 22 GiB every layer is recomputed
  in.checkpointed = tight;
  EXPECT_LE(plan_training_memory(c, in).total(), 22 * GiB);
  for (double budget : {30.0, 40.0, 50.0}) {
    const std::vector<bool> some = checkpointed_layers(c, in, budget * GiB);
    in.checkpointed = some;
    EXPECT_LE(plan_training_memory(c, in).total(), budget * GiB) << budget;
    EXPECT_GT(count(some), 0) << budget;
    EXPECT_LT(count(some), 60) << budget;
    // Fewest: keeping any one recomputed layer's tape would exceed the budget.
    for (size_t i = 0; i < some.size(); ++i) {
      if (!some[i]) continue;
      std::vector<bool> fewer = some;
      fewer[i] = false;
      in.checkpointed = fewer;
      EXPECT_GT(plan_training_memory(c, in).total(), budget * GiB) << budget << " layer " << i;
    }
  }
}

}  // namespace
}  // namespace tl
