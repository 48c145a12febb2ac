// The QLoRA training step on a released config cut to its first LAYERS layers, on the backend
// and numerics torchless-train runs (tools/backend.h with `bf16: true`: bf16 activations on a
// GPU; bf16 products on a CPU with bf16 instructions, else fp32), timed by op family:
//
//   bench_qlora_step --config CONFIG_JSON [--layers N] [--seq S] [--steps K]
//                    [--backend auto|cpu|cuda|strict] [--no-checkpointing] [--blame]
//
// NF4 (double-quantized) bases made on the backend (no checkpoint: the weights are
// {−0.02, 0, 0.02} from two dropout masks, enough to time the step), LoRA r 16 on every
// projection, micro-batch 1, gradient checkpointing unless --no-checkpointing. One warm-up
// step, K steps for tokens/s, then one step through TimedOps (core/timed_ops.h) for the time
// by op family (on the GPU from CUDA events, so the GPU does not wait per op). --blame
// synchronizes after every op of that step and names the op whose work failed. `strict` is
// the CPU backend in strict-device mode (core/cpu/strict_ops.h): the JSON then also counts
// what crossed the bus in that step (host-to-device copies, device-to-host reads).
// Prints the family table to stderr and one JSON line to stdout: tokens/s, the same scaled
// to the full depth (× LAYERS / num_hidden_layers), the measured peak beside the memory plan's
// (train/step/memory_plan.h) and the op table. Exit status 3 when the device ran out of memory
// (scripts/gpu-check.sh then tries fewer layers), 1 on any other error, 2 on bad arguments.
#include <sys/resource.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/math.h"
#include "core/nf4.h"
#include "core/cpu/gemm_bf16.h"
#include "core/cpu/strict_ops.h"
#include "core/cpu/thread_policy.h"
#include "core/timed_ops.h"
#include "core/weights.h"
#include "tools/backend.h"
#include "train/step/memory_plan.h"
#include "train/model/peft_adapter.h"
#include "train/step/train_step.h"
#if defined(TL_HAVE_CUDA)
#include "cuda/cuda_ops.h"
#endif

namespace {

struct Args {
  std::string config;
  int64_t layers = 2, seq = 2048, steps = 3;
  std::string backend = "auto";
  bool checkpointing = true, blame = false;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "bench_qlora_step: " << why
            << "\nusage: bench_qlora_step --config CONFIG_JSON [--layers N] [--seq S] [--steps K] "
               "[--backend auto|cpu|cuda|strict] [--no-checkpointing] [--blame]\n";
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(k + " needs a value");
      return argv[++i];
    };
    auto number = [&](int64_t lo) {
      const std::string v = value();
      size_t used = 0;
      int64_t n = 0;
      try {
        n = std::stoll(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != v.size() || n < lo) usage(k + " must be an integer ≥ " + std::to_string(lo) + ", not '" + v + "'");
      return n;
    };
    if (k == "--config") a.config = value();
    else if (k == "--layers") a.layers = number(1);
    else if (k == "--seq") a.seq = number(2);
    else if (k == "--steps") a.steps = number(1);
    else if (k == "--backend") a.backend = value();
    else if (k == "--no-checkpointing") a.checkpointing = false;
    else if (k == "--blame") a.blame = true;
    else if (k == "-h" || k == "--help") {
      std::cout << "bench_qlora_step: the QLoRA step of a released config cut to N layers, timed by op family\n"
                << "usage: bench_qlora_step --config CONFIG_JSON [--layers N (2)] [--seq S (2048)] [--steps K (3)]\n"
                << "       [--backend auto|cpu|cuda|strict] [--no-checkpointing] [--blame]\n";
      std::exit(0);
    } else usage("unknown argument '" + k + "'");
  }
  if (a.config.empty()) usage("--config is required");
  return a;
}

// w = 0.01·(m1 − m2) with m1, m2 ∈ {0, 2} inverted-dropout masks at p = 1/2, on the backend.
tl::Tensor backend_random(tl::Ops& ops, const tl::Shape& shape, uint64_t seed) {
  tl::Tensor a = ops.zeros(shape), b = ops.zeros(shape);
  ops.dropout_mask(tl::splitmix64(seed), 0.5, a);
  ops.dropout_mask(tl::splitmix64(seed ^ 0x5bd1e995ull), 0.5, b);
  ops.scale(b, -1.0);
  ops.add(a, b, a);
  ops.scale(a, 0.01);
  return a;
}

// NF4 of a backend tensor, quantized where it lives (on the GPU by the device quantizer).
tl::Nf4Tensor quantize(tl::Ops& ops, const tl::Tensor& w) {
#if defined(TL_HAVE_CUDA)
  if (w.device() == tl::Device::CUDA) return tl::CudaOps::quantize_nf4(w, true);
#endif
  return tl::nf4_quantize(ops.download(w), true);
}

bool out_of_memory(const std::string& what) {
  return what.find("out of memory") != std::string::npos || what.find("cudaErrorMemoryAllocation") != std::string::npos ||
         what.find("bad_alloc") != std::string::npos;
}

}  // namespace

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);
  const Args args = parse(argc, argv);
  try {
    std::ifstream in(args.config);
    if (!in) throw tl::Error(args.config + ": cannot open");
    nlohmann::json j = nlohmann::json::parse(in);
    nlohmann::json& t = j.contains("text_config") ? j["text_config"] : j;
    const int64_t full = t["num_hidden_layers"];
    if (args.layers > full) usage("--layers must be at most the config's " + std::to_string(full));
    t["num_hidden_layers"] = args.layers;
    t["layer_types"] = std::vector<std::string>(t["layer_types"].begin(), t["layer_types"].begin() + args.layers);
    if (t.value("num_kv_shared_layers", 0) >= args.layers) t["num_kv_shared_layers"] = 0;
    const tl::Gemma4Config cfg = tl::Gemma4Config::from_json(j, args.config);

    tl::BackendOptions opts;
    opts.act = tl::DType::F32;
    opts.bf16 = true;  // the trainer's default
    tl::Backend backend;
    tl::StrictOps* strict = nullptr;
    if (args.backend == "strict") {
      auto s = std::make_unique<tl::StrictOps>(tl::DType::F32, tl::cpu::native_bf16() ? tl::CpuMatmul::Bf16 : tl::CpuMatmul::F32);
      strict = s.get();
      backend.ops = std::move(s);
      backend.description = "cpu in strict-device mode";
    } else {
      backend = tl::make_backend(tl::parse_backend(args.backend, "--backend"), opts);
    }
    std::cerr << "backend: " << backend.description << "\n";
    tl::TimedOps ops(*backend.ops, args.blame);
    ops.set_enabled(false);  // on for the one step that the table measures

    tl::Gemma4Model model(cfg, ops);
    model.mutable_weights().layers.resize(size_t(cfg.num_hidden_layers));  // as load() does
    uint64_t seed = 1;
    for (const tl::WeightSpec& s : tl::text_decoder_weights(cfg)) {
      if (s.component == tl::Component::LayerScalar) {
        model.mutable_weights().layers[size_t(s.layer)].layer_scalar = 1.0;
        continue;
      }
      if (s.component == tl::Component::Experts && s.shape.size() == 3)
        throw tl::Error("bench_qlora_step: MoE configs are not benchmarked yet (expert tensors)");
      tl::Tensor w = backend_random(ops, s.shape, seed++);
      if (s.is_linear) model.set_nf4(s.name, quantize(ops, w));  // w is freed here
      else if (tl::Tensor* slot = tl::weight_slot(model.mutable_weights(), s.name)) *slot = w;
      else throw tl::Error("bench_qlora_step: no slot for '" + s.name + "'");
    }
    if (cfg.tie_word_embeddings) model.mutable_weights().lm_head = model.mutable_weights().embed_tokens;
    else model.mutable_weights().lm_head = backend_random(ops, {cfg.vocab_size, cfg.hidden_size}, seed++);

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
    model.set_gradient_checkpointing(args.checkpointing);
    tl::AdamW opt({1e-4}, tl::lora_param_slots(model, prefix), ops);
    tl::Gemma4Grads none = model.no_grads();
    tl::Tensor ids = tl::Tensor::zeros({1, args.seq}, tl::DType::I32);
    for (int64_t i = 0; i < ids.numel(); ++i) ids.data<int32_t>()[i] = int32_t((i * 7919 + 13) % cfg.vocab_size);
    std::vector<tl::MicroBatch> micro{{{ids, {}, {}}, ids}};

    tl::train_step(model, none, opt, ops, micro, 1e-4, 1.0);  // warm-up: descriptors, the pool
    ops.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    double loss = 0;
    for (int64_t s = 0; s < args.steps; ++s) loss = tl::train_step(model, none, opt, ops, micro, 1e-4, 1.0).loss;
    ops.synchronize();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ops.set_enabled(true);
    const tl::TransferStats before = strict ? strict->transfers() : tl::TransferStats{};
    tl::train_step(model, none, opt, ops, micro, 1e-4, 1.0);
    const tl::TimedOps::Times times = ops.collect();
    nlohmann::json bus;
    if (strict) {
      const tl::TransferStats& after = strict->transfers();
      bus = {{"uploads", after.uploads - before.uploads},
             {"upload_bytes", after.upload_bytes - before.upload_bytes},
             {"downloads", after.downloads - before.downloads},
             {"download_bytes", after.download_bytes - before.download_bytes},
             {"scalar_reads", after.scalar_reads - before.scalar_reads}};
      std::cerr << "bus in one step: " << bus.dump() << "\n";
    }
    std::cerr << times.table();

    tl::MemoryPlanInput plan_in;
    plan_in.sequence_len = args.seq;
    plan_in.lora_params = tl::lora_param_count(cfg, spec, prefix);
    plan_in.gradient_checkpointing = args.checkpointing;
    plan_in.act_bytes = int(tl::dtype_size(ops.act_dtype()));
    const double planned = tl::plan_training_memory(cfg, plan_in).total();
    double peak = 0;
    std::string peak_kind = "device pool high-water mark";
    if (backend.peak_device_bytes) {
      peak = backend.peak_device_bytes();
    } else {
      rusage u{};
      getrusage(RUSAGE_SELF, &u);
      peak = double(u.ru_maxrss) * 1024.0;
      peak_kind = "process peak RSS";
    }
    const double tps = double(args.seq * args.steps) / secs;
    std::cout << nlohmann::json{{"impl", std::string("torchless-") + (backend.kind == tl::BackendKind::Cuda ? "cuda" : "cpu")},
                                {"backend", backend.description},
                                {"config", args.config},
                                {"layers", args.layers},
                                {"full_layers", full},
                                {"seq", args.seq},
                                {"steps", args.steps},
                                {"gradient_checkpointing", args.checkpointing},
                                {"seconds", secs},
                                {"tokens_per_s", tps},
                                {"tokens_per_s_scaled_to_full_depth", tps * double(args.layers) / double(full)},
                                {"loss", loss},
                                {"peak_bytes", peak},
                                {"peak_kind", peak_kind},
                                {"planned_peak_bytes", planned},
                                {"ops", times.to_json()},
                                {"bus_per_step", bus}}
                     .dump()
              << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "bench_qlora_step: " << e.what() << "\n";
    return out_of_memory(e.what()) ? 3 : 1;
  }
}
