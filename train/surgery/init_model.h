// A freshly initialised Gemma 4 text checkpoint from a config alone (HF's _init_weights:
// projections and embeddings ~ N(0, initializer_range), norm weights, router scales and
// layer_scalar at 1), deterministic in the seed.
#pragma once
#include <filesystem>
#include <vector>

#include "core/config.h"

namespace tl {

// `inputs` (the config file, `copy_from`) must not overlap `out` (core/output_dir.h); the
// non-weight files of `copy_from` other than config.json are copied into the result.
void init_checkpoint(const Gemma4Config& config, const std::filesystem::path& out, uint64_t seed,
                     double initializer_range, bool force, const std::vector<std::filesystem::path>& inputs = {},
                     const std::filesystem::path& copy_from = {});

}  // namespace tl
