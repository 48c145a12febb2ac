// torchless-surgery: inspect and reshape Gemma 4 checkpoints.
//   plan   parameter counts and weight memory, from a checkpoint directory or a config.json
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <filesystem>
#include <iostream>

#include "core/config.h"
#include "core/plan.h"
#include "core/tensor.h"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  CLI::App app{"torchless-surgery: plan, expand, upscale and prune Gemma 4 checkpoints"};
  app.require_subcommand(1);

  std::vector<std::string> plan_inputs;
  auto* plan = app.add_subcommand("plan", "Print parameter counts by component and weight memory "
                                          "(bf16 and NF4) for checkpoints or config.json files");
  plan->add_option("inputs", plan_inputs, "checkpoint directories or config.json files")->required();

  CLI11_PARSE(app, argc, argv);
  try {
    if (*plan) {
      for (const auto& in : plan_inputs) {
        fs::path p(in);
        if (!fs::exists(p)) throw tl::Error(in + ": no such file or directory");
        if (fs::is_directory(p) && !fs::exists(p / "config.json"))
          throw tl::Error(in + ": directory has no config.json");
        auto cfg = tl::Gemma4Config::load(p);
        std::cout << tl::format_plan(cfg, tl::plan_model(cfg), in) << std::flush;
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "torchless-surgery: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
