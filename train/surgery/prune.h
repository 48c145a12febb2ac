// MoE expert pruning from calibration data (recipes.md §4): teacher-forced passes of the
// unpruned model; at every MoE layer, per routed token, ‖routing weight · expert output‖₂
// accumulated in fp64 (non-finite tokens skipped and counted); per sample and layer the top
// `protect` experts by that norm are protected; experts are ranked by how many samples
// protect them (ties: larger total norm, then lower index) and the top `keep` per layer stay.
// Also "reap" (mean over routed tokens of weight × ‖output‖) and "frequency" (routed count).
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "core/ops.h"

namespace tl {

struct PruneOptions {
  int64_t keep = 0;        // experts kept per layer
  int64_t protect = 16;    // experts protected per sample and layer (coverage method)
  std::string method = "coverage";  // coverage | reap | frequency
  bool force = false;
};

struct PruneReport {
  std::vector<std::vector<int64_t>> kept;  // per MoE layer, ascending expert ids
  int64_t samples = 0, routed_tokens = 0, skipped_tokens = 0;
};

// Scores with `calibration` (token-id sequences), then writes the pruned checkpoint (router
// rows, per-expert scales and expert tensors sliced; num_experts set), expert_drop_map.json
// beside it, config and tokenizer files copied; atomically; byte-identical for equal inputs.
PruneReport prune_experts(const std::filesystem::path& src, const std::filesystem::path& out,
                          const std::vector<std::vector<int32_t>>& calibration, const PruneOptions& options);

}  // namespace tl
