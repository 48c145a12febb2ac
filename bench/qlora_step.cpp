// GPU QLoRA step benchmark on a released config with its first LAYERS layers:
//   bench_gpu_qlora_step CONFIG_JSON LAYERS SEQ STEPS
// NF4 (double-quantized) bases made and quantized on the device (no checkpoint: the weights
// are {−0.02, 0, 0.02} from two device dropout masks, enough to time the step), LoRA r 16
// on every projection, gradient checkpointing, micro-batch 1, bf16 projections. Prints one
// JSON line: tokens/s over the timed steps (after one warm-up step), the same scaled to the
// full depth (× LAYERS / num_hidden_layers: per-layer cost dominates; the embedding and the
// head are not rescaled, so this is slightly pessimistic) and the pool's peak bytes.
#include <chrono>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/weights.h"
#include "cuda/cuda_ops.h"
#include "train/peft_adapter.h"
#include "train/train_step.h"

namespace {

// w = 0.01·(m1 − m2) with m1, m2 ∈ {0, 2} inverted-dropout masks at p = 1/2.
tl::Tensor device_random(tl::CudaOps& ops, const tl::Shape& shape, uint64_t seed) {
  tl::Tensor a = ops.zeros(shape), b = ops.zeros(shape);
  ops.dropout_mask(tl::splitmix64(seed), 0.5, a);
  ops.dropout_mask(tl::splitmix64(seed ^ 0x5bd1e995ull), 0.5, b);
  ops.scale(b, -1.0);
  ops.add(a, b, a);
  ops.scale(a, 0.01);
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: bench_gpu_qlora_step CONFIG_JSON LAYERS SEQ STEPS\n";
    return 2;
  }
  try {
    if (!tl::CudaOps::available()) throw tl::Error("bench_gpu_qlora_step: no CUDA device");
    std::ifstream in(argv[1]);
    if (!in) throw tl::Error(std::string(argv[1]) + ": cannot open");
    nlohmann::json j = nlohmann::json::parse(in);
    nlohmann::json& t = j.contains("text_config") ? j["text_config"] : j;
    const int64_t full = t["num_hidden_layers"], layers = std::stoll(argv[2]);
    const int64_t S = std::stoll(argv[3]), steps = std::stoll(argv[4]);
    if (layers < 1 || layers > full) throw tl::Error("bench_gpu_qlora_step: LAYERS must be in [1, " + std::to_string(full) + "]");
    t["num_hidden_layers"] = layers;
    t["layer_types"] = std::vector<std::string>(t["layer_types"].begin(), t["layer_types"].begin() + layers);
    const tl::Gemma4Config cfg = tl::Gemma4Config::from_json(j, argv[1]);

    tl::CudaOps ops(tl::DType::F32, tl::CudaMatmul::Bf16);
    tl::Gemma4Model model(cfg, ops);
    uint64_t seed = 1;
    for (const tl::WeightSpec& s : tl::text_decoder_weights(cfg)) {
      if (s.component == tl::Component::LayerScalar) {
        model.mutable_weights().layers[size_t(s.layer)].layer_scalar = 1.0;
        continue;
      }
      tl::Tensor w = device_random(ops, s.shape, seed++);
      if (s.is_linear) model.set_nf4(s.name, tl::CudaOps::quantize_nf4(w, true));  // w is freed here
      else *tl::weight_slot(model.mutable_weights(), s.name) = w;
    }
    if (cfg.tie_word_embeddings) model.mutable_weights().lm_head = model.mutable_weights().embed_tokens;
    else model.mutable_weights().lm_head = device_random(ops, {cfg.vocab_size, cfg.hidden_size}, seed++);

    const std::string prefix = "model.language_model.";
    tl::LoraSpec spec;
    spec.r = 16;
    spec.alpha = 32;
    for (const auto& name : tl::select_lora_targets(cfg, spec, prefix)) {
      tl::Tensor* w = tl::weight_slot(model.mutable_weights(), name);
      tl::Tensor A = tl::Tensor::zeros({16, w->dim(1)}, tl::DType::F32), B = tl::Tensor::zeros({w->dim(0), 16}, tl::DType::F32);
      tl::lora_init(A, B, seed++);
      model.attach_lora(name, A, B, 2.0);
    }
    model.set_gradient_checkpointing(true);
    tl::AdamW opt({1e-4}, tl::lora_param_slots(model, prefix), ops);
    tl::Gemma4Grads none = model.no_grads();
    tl::Tensor ids = tl::Tensor::zeros({1, S}, tl::DType::I32);
    for (int64_t i = 0; i < ids.numel(); ++i) ids.data<int32_t>()[i] = int32_t((i * 7919 + 13) % cfg.vocab_size);
    std::vector<tl::MicroBatch> micro{{{ids, {}, {}}, ids}};
    const tl::CudaMemory setup = tl::CudaOps::memory();
    tl::train_step(model, none, opt, ops, micro, 1e-4, 1.0);  // warm-up: descriptors, pool
    const tl::CudaMemory warm = tl::CudaOps::memory();
    auto t0 = std::chrono::steady_clock::now();
    double loss = 0;
    for (int64_t s = 0; s < steps; ++s) loss = tl::train_step(model, none, opt, ops, micro, 1e-4, 1.0).loss;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const tl::CudaMemory end = tl::CudaOps::memory();
    const double tps = double(S * steps) / secs;
    std::cout << nlohmann::json{{"impl", "torchless-cuda"},  {"config", argv[1]},
                                {"layers", layers},          {"full_layers", full},
                                {"seq", S},                  {"steps", steps},
                                {"seconds", secs},           {"tokens_per_s", tps},
                                {"tokens_per_s_scaled_to_full_depth", tps * double(layers) / double(full)},
                                {"loss", loss},
                                {"weights_bytes", setup.used},
                                {"peak_bytes", end.used_peak},
                                {"reserved_peak_bytes", end.reserved_peak},
                                {"reserved_grew_after_warmup", end.reserved_peak > warm.reserved_peak},
                                {"device_used_bytes", end.device_used}}
                     .dump()
              << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
}
