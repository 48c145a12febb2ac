// Training-step benchmark: QLoRA (r 16, all-linear) steps on a checkpoint, CPU backend.
//   bench_train_step MODEL_DIR [S ROWS STEPS [f32|bf16]]   (defaults 256 4 5 f32)
// f32 multiplies exactly in fp32 (OpenBLAS); bf16 rounds matmul inputs to bf16 and
// accumulates in fp32 (oneDNN), as torchless-train does with `bf16: true`.
// Prints one JSON line: tokens/s over the timed steps (after one warm-up step) and peak RSS.
#include <sys/resource.h>

#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/cpu/cpu_ops.h"
#include "core/nf4.h"
#include "core/weights.h"
#include "train/peft_adapter.h"
#include "train/train_step.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: bench_train_step MODEL_DIR [S ROWS STEPS [f32|bf16]]\n";
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t S = argc > 2 ? std::stoll(argv[2]) : 256, rows = argc > 3 ? std::stoll(argv[3]) : 4,
                steps = argc > 4 ? std::stoll(argv[4]) : 5;
  const std::string matmul = argc > 5 ? argv[5] : "f32";
  if (matmul != "f32" && matmul != "bf16") {
    std::cerr << "bench_train_step: matmul precision must be f32 or bf16\n";
    return 2;
  }
  tl::CpuOps ops(tl::DType::F32, matmul == "bf16" ? tl::CpuMatmul::Bf16 : tl::CpuMatmul::F32);
  auto cfg = tl::Gemma4Config::load(dir);
  tl::Checkpoint ckpt = tl::Checkpoint::open(dir);
  tl::Gemma4Model model(cfg, ops);
  model.load(ckpt);
  const std::string prefix = tl::decoder_prefix(ckpt);
  for (const auto& s : tl::text_decoder_weights(cfg))  // QLoRA: projections held in NF4
    if (s.is_linear) model.quantize_nf4(s.name, tl::DType::BF16, true);
  tl::LoraSpec spec;
  spec.r = 16;
  spec.alpha = 32;
  for (const auto& name : tl::select_lora_targets(cfg, spec, prefix)) {
    tl::Tensor* w = tl::weight_slot(model.mutable_weights(), name);
    tl::Tensor A = tl::Tensor::zeros({16, w->dim(1)}, tl::DType::F32), B = tl::Tensor::zeros({w->dim(0), 16}, tl::DType::F32);
    tl::lora_init(A, B, 1);
    model.attach_lora(name, A, B, 2.0);
  }
  model.set_gradient_checkpointing(true);
  tl::AdamW opt({1e-4}, tl::lora_param_slots(model, prefix), ops);
  tl::Gemma4Grads none = model.no_grads();
  tl::Tensor ids = tl::Tensor::zeros({rows, S}, tl::DType::I32);
  for (int64_t i = 0; i < ids.numel(); ++i) ids.data<int32_t>()[i] = int32_t((i * 7919 + 13) % cfg.vocab_size);
  std::vector<tl::MicroBatch> micro{{{ids, {}, {}}, ids}};
  tl::train_step(model, none, opt, ops, micro, 1e-4, 1.0);  // warm-up
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < steps; ++s) tl::train_step(model, none, opt, ops, micro, 1e-4, 1.0);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  std::cout << nlohmann::json{{"impl", "torchless"}, {"matmul", matmul}, {"model", dir}, {"tokens_per_step", rows * S},
                              {"tokens_per_s", double(rows * S * steps) / secs},
                              {"peak_rss_mib", double(ru.ru_maxrss) / 1024.0}}.dump()
            << "\n";
  return 0;
}
