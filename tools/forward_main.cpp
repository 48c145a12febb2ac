// torchless-forward: run the Gemma 4 text decoder on the CPU and print the loss (and, given
// a reference record, how far the logits are from it).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <iostream>

#include "core/cpu/cpu_ops.h"
#include "core/safetensors.h"
#include "train/gemma4_model.h"

int main(int argc, char** argv) {
  CLI::App app{"torchless-forward: Gemma 4 forward pass and loss on the CPU"};
  std::string model_dir, input, dtype = "f32";
  app.add_option("--model", model_dir, "checkpoint directory (config.json + safetensors)")->required();
  app.add_option("--input", input,
                 "safetensors with input_ids [B,S] (and optionally labels, logits, loss to compare)")
      ->required();
  app.add_option("--dtype", dtype, "activation dtype: f32 or f64")->check(CLI::IsMember({"f32", "f64"}));
  CLI11_PARSE(app, argc, argv);
  try {
    auto t0 = std::chrono::steady_clock::now();
    tl::CpuOps ops(dtype == "f64" ? tl::DType::F64 : tl::DType::F32);
    auto cfg = tl::Gemma4Config::load(model_dir);
    tl::Gemma4Model model(cfg, ops);
    model.load(tl::Checkpoint::open(model_dir));
    auto rec = tl::SafetensorsFile::open(input);
    tl::Batch batch{rec.get("input_ids"), {}, {}};
    tl::Tensor hidden = model.forward_hidden(batch);
    tl::Tensor logits = model.logits(hidden);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << fmt::format("model {}: {} layers, batch {}x{}, {:.2f} s\n", model_dir,
                             cfg.num_hidden_layers, batch.ids.dim(0), batch.ids.dim(1), secs);
    if (rec.contains("labels")) {
      auto loss = model.loss(hidden, rec.get("labels"));
      std::cout << fmt::format("loss {:.7f} over {} targets", loss.mean(), loss.count);
      if (rec.contains("loss")) std::cout << fmt::format("  (reference {:.7f})", rec.get("loss").get(0));
      std::cout << "\n";
    }
    if (rec.contains("logits")) {
      tl::Tensor ref = rec.get("logits");
      double maxdiff = 0, maxref = 0;
      for (int64_t i = 0; i < ref.numel(); ++i) {
        maxdiff = std::max(maxdiff, std::abs(logits.get(i) - ref.get(i)));
        maxref = std::max(maxref, std::abs(ref.get(i)));
      }
      std::cout << fmt::format("logits max|diff| {:.3g} (max|ref| {:.3g}, relative {:.3g})\n", maxdiff,
                               maxref, maxdiff / maxref);
    }
  } catch (const std::exception& e) {
    std::cerr << "torchless-forward: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
