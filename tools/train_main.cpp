// torchless-train: heal a Gemma 4 checkpoint with QLoRA / LoRA / full training.
//   torchless-train --config heal.yaml [key=value ...] [--dry-run]
#include <CLI/CLI.hpp>

#include <iostream>

#include "core/cpu/cpu_ops.h"
#include "train/trainer.h"

int main(int argc, char** argv) {
  CLI::App app{"torchless-train: QLoRA / LoRA / full training of Gemma 4 checkpoints on the CPU"};
  std::string config;
  std::vector<std::string> overrides;
  bool dry_run = false;
  app.add_option("--config,-c", config, "heal.yaml (axolotl-style keys)")->required()->check(CLI::ExistingFile);
  app.add_option("overrides", overrides, "key=value settings that override the YAML");
  app.add_flag("--dry-run", dry_run, "print the plan (parameters, trainable share, memory, data, steps) and exit");
  CLI11_PARSE(app, argc, argv);
  try {
    tl::TrainConfig cfg = tl::TrainConfig::load(config, overrides);
    tl::CpuOps ops(tl::DType::F32);
    tl::Trainer trainer(cfg, ops, std::cout);
    trainer.print_plan(std::cout);
    if (dry_run) return 0;
    trainer.run();
  } catch (const std::exception& e) {
    std::cerr << "torchless-train: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
