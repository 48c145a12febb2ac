// The CPU backend's bf16 products (oneDNN, inputs rounded to bf16, fp32 sums; what
// torchless-train runs with `bf16: true` on a CPU with bf16 instructions) train the demo the
// way the exact fp32 path does: the logged loss of the first 10 demo-heal steps agrees to 1e-2.
// Where this CPU has no bf16 instructions the trainer keeps fp32 (tools/backend.cpp), so this
// test of the heal it would run skips there; the bf16 kernels themselves are tested everywhere
// (test_gemm_bf16.cpp).
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <sstream>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/gemm_bf16.h"
#include "tests/metrics_util.h"
#include "train/trainer.h"

namespace tl {
namespace {

namespace fs = std::filesystem;

// configs/demo-heal.yaml for 10 steps, a loss logged every step, no evaluation or checkpoint;
// returns the logged losses.
std::vector<double> demo_losses(CpuMatmul matmul, const fs::path& dir) {
  const fs::path cfg = fs::path(TL_SOURCE_DIR) / "configs/demo-heal.yaml";
  fs::create_directories(dir);
  CpuOps ops(DType::F32, matmul);
  std::ostringstream log;
  Trainer t(TrainConfig::load(cfg, {"max_steps=10", "logging_steps=1", "eval_steps=1000", "save_steps=1000",
                                    "output_dir=" + (dir / "out").string(),
                                    "base_model=" + (dir / "upscaled").string()}),
            ops, log);
  t.run();
  return logged_values(dir / "out/metrics.jsonl", "loss");
}

TEST(Bf16Heal, DemoLossCurveMatchesFp32) {
  if (!cpu::native_bf16())
    GTEST_SKIP() << "this CPU (" << cpu::cpu_isa_name()
                 << ") has no bf16 instructions, so torchless-train heals in fp32 here and never runs this path";
  const fs::path dir = fs::temp_directory_path() / fmt::format("tl_bf16_heal_{}", ::getpid());
  fs::remove_all(dir);
  const std::vector<double> f32 = demo_losses(CpuMatmul::F32, dir / "f32"),
                            bf16 = demo_losses(CpuMatmul::Bf16, dir / "bf16");
  fs::remove_all(dir);
  ASSERT_EQ(f32.size(), 10u);
  ASSERT_EQ(bf16.size(), 10u);
  double worst = 0;
  for (size_t i = 0; i < f32.size(); ++i) {
    EXPECT_NEAR(bf16[i], f32[i], 1e-2) << "step " << i + 1;
    worst = std::max(worst, std::abs(bf16[i] - f32[i]));
  }
  EXPECT_GT(worst, 0.0);  // the bf16 products did run: rounding shows in the loss
  EXPECT_LT(f32.back(), f32.front());
  std::cout << fmt::format("bf16 vs fp32 demo loss, 10 steps: largest difference {:.2e} (loss {:.4f} -> {:.4f})\n",
                           worst, f32.front(), f32.back());
}

}  // namespace
}  // namespace tl
