// Training-step benchmark: LoRA r 16 on every projection, gradient checkpointing, AdamW, on
// a checkpoint, CPU backend.
//   bench_train_step MODEL_DIR [S ROWS STEPS [f32|bf16 [qlora|lora]]]   (defaults 256 4 5 f32 qlora)
// f32 multiplies exactly in fp32 (OpenBLAS); bf16 rounds matmul inputs to bf16 and
// accumulates in fp32 (oneDNN), as torchless-train does with `bf16: true` (where the CPU has
// no bf16 instructions, bf16 runs the fp32 path and says so). qlora holds the projections in
// NF4 (double-quantized, as bitsandbytes) and dequantizes tiles in every pass; lora keeps the
// checkpoint's dense base, so the two measure NF4 dequantization apart.
// Prints one JSON line: tokens/s over the timed steps (after one warm-up step), the useful
// GFLOP/s (useful_flops_per_token: forward plus the backward LoRA needs, not the recompute)
// and peak RSS.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/cpu/gemm_bf16.h"
#include "core/cpu/cpu_ops.h"
#include "core/cpu/thread_policy.h"
#include "core/weights.h"
#include "train/model/peft_adapter.h"
#include "train/step/train_step.h"

namespace {

// Multiply-adds ×2 per token of one step that training needs, for a dense model:
//  - a frozen projection of P parameters: 2P forward + 2P for dx (no dW) = 4P;
//  - its adapter of r·(in + out) parameters: 2 forward + 4 backward (dx and dA, dB) each;
//  - the tied LM head (V × H, frozen): 4·V·H;
//  - attention per layer: scores and P·V are 2·2·keys·head_dim per head forward and twice
//    that backward (dQ, dK, dP, dV), keys averaged over the causal window.
// Gradient checkpointing's recompute is not useful work, so it is not counted.
double useful_flops_per_token(const tl::Gemma4Config& c, int64_t S, int64_t r) {
  double flops = 0;
  for (const auto& w : tl::text_decoder_weights(c)) {
    if (!w.is_linear) continue;
    flops += 4.0 * double(w.shape[0] * w.shape[1]) + 6.0 * double(r * (w.shape[0] + w.shape[1]));
  }
  flops += 4.0 * double(c.vocab_size * c.hidden_size);
  for (const auto& g : c.layers()) {
    const int64_t window = g.type == tl::LayerType::Sliding ? c.sliding_window : S;
    double keys = 0;
    for (int64_t t = 0; t < S; ++t) keys += double(std::min(t + 1, window));
    keys /= double(S);
    flops += 12.0 * keys * double(g.head_dim * c.num_attention_heads);
  }
  return flops;
}

}  // namespace

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);  // as the tools run (core/cpu/thread_policy.h)
  if (argc < 2) {
    std::cerr << "usage: bench_train_step MODEL_DIR [S ROWS STEPS [f32|bf16 [qlora|lora]]]\n";
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t S = argc > 2 ? std::stoll(argv[2]) : 256, rows = argc > 3 ? std::stoll(argv[3]) : 4,
                steps = argc > 4 ? std::stoll(argv[4]) : 5;
  const std::string matmul = argc > 5 ? argv[5] : "f32", adapter = argc > 6 ? argv[6] : "qlora";
  if (matmul != "f32" && matmul != "bf16") {
    std::cerr << "bench_train_step: matmul precision must be f32 or bf16\n";
    return 2;
  }
  if (adapter != "qlora" && adapter != "lora") {
    std::cerr << "bench_train_step: the adapter must be qlora or lora\n";
    return 2;
  }
  const bool bf16 = matmul == "bf16" && tl::cpu::native_bf16();
  tl::CpuOps ops(tl::DType::F32, bf16 ? tl::CpuMatmul::Bf16 : tl::CpuMatmul::F32);
  auto cfg = tl::Gemma4Config::load(dir);
  tl::Gemma4Model model(cfg, ops);
  std::string prefix;
  {  // as torchless-train loads: the checkpoint mapped only while loading, and for QLoRA
     // each projection quantized to NF4 (double-quantized) as it is read
    tl::Checkpoint ckpt = tl::Checkpoint::open(dir);
    model.load(ckpt, adapter == "qlora" ? tl::Gemma4LoadOptions::nf4(true) : tl::Gemma4LoadOptions{});
    prefix = tl::decoder_prefix(ckpt);
  }
  const int64_t r = 16;
  tl::LoraSpec spec;
  spec.r = r;
  spec.alpha = 32;
  for (const auto& name : tl::select_lora_targets(cfg, spec, prefix)) {
    tl::Tensor* w = tl::weight_slot(model.mutable_weights(), name);
    tl::Tensor A = tl::Tensor::zeros({r, w->dim(1)}, tl::DType::F32), B = tl::Tensor::zeros({w->dim(0), r}, tl::DType::F32);
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
  const double tokens_per_s = double(rows * S * steps) / secs;
  std::cout << nlohmann::json{{"impl", "torchless"}, {"matmul", bf16 ? "bf16" : "f32"}, {"adapter", adapter},
                              {"model", dir}, {"tokens_per_step", rows * S}, {"tokens_per_s", tokens_per_s},
                              {"useful_gflop_per_s", tokens_per_s * useful_flops_per_token(cfg, S, r) / 1e9},
                              {"peak_rss_mib", double(ru.ru_maxrss) / 1024.0}}.dump()
            << "\n";
  return 0;
}
