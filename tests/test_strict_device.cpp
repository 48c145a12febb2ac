// The CPU backend's strict-device mode (core/cpu/strict_ops.h): host code cannot touch
// device data, transfers are counted, and the whole demo heal runs under it with the CPU
// backend's losses and only the batch (plus a few scalars) crossing per step.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/cpu/strict_ops.h"
#include "core/math.h"
#include "tests/metrics_util.h"
#include "tools/backend.h"
#include "train/model/peft_adapter.h"
#include "train/step/train_step.h"
#include "train/trainer.h"
#include "golden_util.h"

namespace tl {
namespace {

namespace fs = std::filesystem;

TEST(StrictDevice, HostAccessToDeviceDataThrows) {
  StrictOps ops;
  Tensor host = Tensor::zeros({2, 3}, DType::F32);
  for (int i = 0; i < 6; ++i) host.data<float>()[i] = float(i);
  Tensor dev = ops.upload(host, DType::F32);
  EXPECT_EQ(dev.device(), Device::Strict);
  EXPECT_THROW(dev.data<float>(), std::logic_error);
  EXPECT_THROW(dev.raw(), std::logic_error);
  EXPECT_THROW(dev.get(0), std::logic_error);
  EXPECT_THROW(dev.to(DType::F64), std::logic_error);
  EXPECT_THROW(dev.slice_rows(1, 2).data<float>(), std::logic_error);  // views stay device memory
  EXPECT_THROW(ops.zeros({3}).data<float>(), std::logic_error);
  // A host tensor handed to a device op is refused, naming the op.
  Tensor out = ops.zeros({2, 3});
  try {
    ops.add(dev, host, out);
    FAIL() << "add accepted a host tensor";
  } catch (const std::logic_error& e) {
    EXPECT_NE(std::string(e.what()).find("add: argument 2"), std::string::npos) << e.what();
  }
  ops.add(dev, dev, out);  // through the backend it works: out = 2·x
  Tensor back = ops.download(out);
  EXPECT_EQ(back.device(), Device::CPU);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(back.data<float>()[i], 2.0f * float(i));
  EXPECT_EQ(ops.transfers().uploads, 1);
  EXPECT_EQ(ops.transfers().upload_bytes, 24);
  EXPECT_EQ(ops.transfers().downloads, 1);
  EXPECT_EQ(ops.transfers().download_bytes, 24);
  EXPECT_DOUBLE_EQ(ops.norm2(out), std::sqrt(4.0 * (0 + 1 + 4 + 9 + 16 + 25)));
  EXPECT_EQ(ops.transfers().scalar_reads, 1);
}

// The device-made dropout mask is the documented function of (seed, element): keep with
// value 1/(1−p) when unit_double(splitmix64(seed + i)) ≥ p.
TEST(StrictDevice, DropoutMaskIsMadeOnTheDevice) {
  StrictOps ops;
  const double p = 0.25;
  Tensor dev_mask = ops.zeros({64, 32}, ops.act_dtype());
  ops.dropout_mask(1234, p, dev_mask);
  Tensor mask = ops.download(dev_mask);
  EXPECT_EQ(ops.transfers().uploads, 0);
  int64_t kept = 0;
  for (int64_t i = 0; i < mask.numel(); ++i) {
    const bool keep = unit_double(splitmix64(1234 + uint64_t(i))) >= p;
    EXPECT_EQ(mask.data<float>()[i], keep ? float(1.0 / 0.75) : 0.0f) << i;
    kept += keep;
  }
  EXPECT_NEAR(double(kept) / double(mask.numel()), 0.75, 0.03);
}

// One QLoRA optimizer step (2 micro-batches of the golden batch, PEFT's initial adapter)
// of a golden model in strict-device mode: the traffic inside the second step (the first
// sets up descriptors and buffers).
TransferStats golden_step_traffic(const std::string& variant, int64_t& batch_bytes, double& loss) {
  StrictOps ops(DType::F32);
  const std::string dir = test::golden(variant);
  Gemma4Model m(Gemma4Config::load(dir), ops);
  m.load(Checkpoint::open(dir), Gemma4LoadOptions::nf4(true));
  const std::string prefix = decoder_prefix(Checkpoint::open(dir));
  PeftAdapter ad = read_peft_adapter(dir + "/lora/initial");
  for (const auto& a : ad.adapters)
    m.attach_lora(a.weight, a.A, a.B, ad.spec.scaling_for(prefix + a.weight.substr(0, a.weight.size() - 7)));
  auto rec = SafetensorsFile::open(dir + "/forward.safetensors");
  const Tensor ids = rec.get("input_ids"), labels = rec.get("labels");
  std::vector<MicroBatch> micro{{{ids, {}, {}}, labels}, {{ids, {}, {}}, labels}};
  AdamW opt({1e-3}, lora_param_slots(m, prefix), ops);
  Gemma4Grads none = m.no_grads();
  train_step(m, none, opt, ops, micro, 1e-3, 1.0);
  const TransferStats before = ops.transfers();
  loss = train_step(m, none, opt, ops, micro, 1e-3, 1.0).loss;
  const TransferStats& after = ops.transfers();
  // The batch: ids, positions and shifted labels (I32) of each micro-batch.
  batch_bytes = 2 * 3 * 4 * ids.numel();
  return {after.uploads - before.uploads, after.upload_bytes - before.upload_bytes, after.downloads - before.downloads,
          after.download_bytes - before.download_bytes, after.scalar_reads - before.scalar_reads,
          after.scalar_bytes - before.scalar_bytes};
}

class StrictGoldenStep : public ::testing::TestWithParam<std::string> {};

// A whole QLoRA step of a dense and an MoE model: the batch up, in one upload per tensor
// (ids, positions, labels of each micro-batch), and one read down (the step's loss, hits and
// gradient norm): no inv_freq table, label chunk, routing decision or per-tensor norm crosses.
TEST_P(StrictGoldenStep, OnlyTheBatchGoesUpAndOneReadComesDown) {
  int64_t batch_bytes = 0;
  double loss = 0;
  const TransferStats s = golden_step_traffic(GetParam(), batch_bytes, loss);
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_EQ(s.uploads, 2 * 3);
  EXPECT_EQ(s.upload_bytes, batch_bytes);
  EXPECT_EQ(s.downloads + s.scalar_reads, 1);
  std::cout << fmt::format("{}: {} uploads ({} bytes), {} downloads ({} bytes), {} scalar reads\n", GetParam(),
                           s.uploads, s.upload_bytes, s.downloads, s.download_bytes, s.scalar_reads);
}

INSTANTIATE_TEST_SUITE_P(Variants, StrictGoldenStep, ::testing::Values("dense_kv", "moe"));

struct HealRun {
  std::vector<double> cpu_loss, strict_loss, cpu_eval, strict_eval;
  std::vector<double> cpu_kl, strict_kl;  // the distillation term, logged beside the loss
  std::vector<TransferStats> steps;  // strict mode's traffic inside each optimizer step
};

// configs/demo-heal.yaml (models/tiny-chat upscaled, healed by distillation from it, chat data)
// with `overrides`, once on the CPU backend and once under strict-device mode, each in its own
// output directory.
HealRun run_demo_heal(const std::string& name, const std::vector<std::string>& overrides) {
  const fs::path cfg_path = fs::path(TL_SOURCE_DIR) / "configs/demo-heal.yaml";
  const fs::path dir = fs::temp_directory_path() / fmt::format("tl_strict_{}_{}", name, ::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  // The demo's products: bf16 where this CPU multiplies bf16 natively, as torchless-train does.
  const Backend ref = make_backend(BackendKind::Cpu, {DType::F32, TrainConfig::load(cfg_path, overrides).bf16});
  const CpuMatmul matmul = static_cast<CpuOps&>(*ref.ops).matmul();
  HealRun r;
  auto run = [&](Ops& ops, const std::string& sub) {
    std::vector<std::string> o = overrides;
    o.push_back("output_dir=" + (dir / sub).string());
    // Each run upscales models/tiny into its own base_model: the demo's default path is
    // shared with every other run of the demo (tests run in parallel).
    o.push_back("base_model=" + (dir / (sub + "-upscaled")).string());
    std::ostringstream log;
    Trainer t(TrainConfig::load(cfg_path, o), ops, log);
    TransferStats before;
    if (auto* strict = dynamic_cast<StrictOps*>(&ops))
      t.around_step = [&, strict](int64_t, bool after) {
        const TransferStats& now = strict->transfers();
        if (!after) {
          before = now;
          return;
        }
        r.steps.push_back({now.uploads - before.uploads, now.upload_bytes - before.upload_bytes,
                           now.downloads - before.downloads, now.download_bytes - before.download_bytes,
                           now.scalar_reads - before.scalar_reads, now.scalar_bytes - before.scalar_bytes});
      };
    t.run();
  };
  CpuOps cpu(DType::F32, matmul);
  StrictOps strict(DType::F32, matmul);
  run(cpu, "cpu");
  run(strict, "strict");
  r.cpu_loss = logged_values(dir / "cpu/metrics.jsonl", "loss");
  r.strict_loss = logged_values(dir / "strict/metrics.jsonl", "loss");
  r.cpu_kl = logged_values(dir / "cpu/metrics.jsonl", "distill_kl");
  r.strict_kl = logged_values(dir / "strict/metrics.jsonl", "distill_kl");
  r.cpu_eval = logged_values(dir / "cpu/metrics.jsonl", "eval_loss");
  r.strict_eval = logged_values(dir / "strict/metrics.jsonl", "eval_loss");
  fs::remove_all(dir);
  return r;
}

// The same losses to 1e-6 (logged training losses, distillation terms and validation losses),
// and per optimizer step only the batch up and one read down. Each step has 2 micro-batches of
// 4×256 tokens; each uploads ids, positions and document ids (I32) and its shifted labels
// (I32): at most 4·4 bytes per token in 4 uploads (the teacher runs on the same uploaded
// batch). Down: the step's statistics (loss, hits, KL sum, squared gradient norm), once.
void check_heal(const HealRun& r, size_t logged, size_t evals, size_t steps) {
  ASSERT_EQ(r.cpu_loss.size(), logged);
  ASSERT_EQ(r.strict_loss.size(), logged);
  ASSERT_EQ(r.cpu_eval.size(), evals);
  ASSERT_EQ(r.strict_eval.size(), evals);
  for (size_t i = 0; i < logged; ++i) EXPECT_NEAR(r.strict_loss[i], r.cpu_loss[i], 1e-6) << "logged loss " << i;
  // The demo heal distils: every logged step has its KL term, the same in both modes.
  ASSERT_EQ(r.cpu_kl.size(), logged);
  ASSERT_EQ(r.strict_kl.size(), logged);
  for (size_t i = 0; i < logged; ++i) {
    EXPECT_GT(r.cpu_kl[i], 0.0) << "logged KL " << i;
    EXPECT_NEAR(r.strict_kl[i], r.cpu_kl[i], 1e-6) << "logged KL " << i;
  }
  for (size_t i = 0; i < evals; ++i) EXPECT_NEAR(r.strict_eval[i], r.cpu_eval[i], 1e-6) << "eval loss " << i;
  EXPECT_LT(r.cpu_eval.back(), r.cpu_eval.front());  // it trained
  const int64_t tokens = 2 * 4 * 256, batch_bytes = 4 * 4 * tokens;
  ASSERT_EQ(r.steps.size(), steps);
  int64_t max_up = 0;
  for (const TransferStats& s : r.steps) {
    EXPECT_EQ(s.downloads + s.scalar_reads, 1) << "one read per optimizer step";
    EXPECT_LE(s.uploads, 2 * 4);
    EXPECT_LE(s.upload_bytes, batch_bytes);
    max_up = std::max(max_up, s.upload_bytes);
  }
  std::cout << fmt::format("strict-device demo heal, per step: {} bytes up in {} uploads (the batch is {} bytes "
                           "of I32 ids, positions, doc ids, labels), {} read of {} bytes down\n",
                           max_up, r.steps.front().uploads, batch_bytes, r.steps.front().downloads,
                           r.steps.front().download_bytes);
}

// The first 10 steps of the demo heal with an evaluation every 5: quick, for every build
// (two held-out generations per evaluation instead of 8; the whole heal below runs the
// demo's own evaluation).
TEST(StrictDevice, DemoHealFirstStepsMatchTheCpu) {
  check_heal(run_demo_heal("short", {"max_steps=10", "eval_steps=5", "save_steps=5", "eval_table_size=2"}), 2, 3, 10);
}

// The whole demo heal (120 steps, evaluations at 0, 30, 60, 90, 120, checkpoints at 60).
TEST(StrictDevice, WholeDemoHealMatchesTheCpu) { check_heal(run_demo_heal("whole", {}), 24, 5, 120); }

}  // namespace
}  // namespace tl
