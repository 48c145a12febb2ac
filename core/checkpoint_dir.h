// Whole checkpoint directories: writing one completely or not at all, and the small
// utilities every command that produces a checkpoint shares.
#pragma once
#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include "core/safetensors.h"

namespace tl {

// "5GB" → 5·10⁹ (decimal, as huggingface_hub parses), "2GiB" → 2·2³⁰, "200KB", "123".
uint64_t parse_size(const std::string& text);

// Files of a checkpoint directory that are not weights (config, tokenizer, chat template,
// generation config, ...), which a derived checkpoint copies unchanged.
std::vector<fs::path> non_weight_files(const fs::path& dir);

// Builds a checkpoint in a fresh temporary directory beside `out` and renames it to `out`
// only once `fill` has returned, so an interrupted run never leaves a directory that looks
// complete; follows core/output_dir.h (an `out` overlapping any of `inputs` is refused; an
// existing `out` is refused unless `force` and it is one of our outputs).
void write_checkpoint_dir(const fs::path& out, const std::vector<fs::path>& inputs, bool force,
                          const std::function<void(const fs::path& tmp_dir)>& fill);

// A checkpoint derived from `src` (surgery, pruning): `tensors` sharded as usual, the
// source's non-weight files copied, config.json replaced by `config_text`, and a record of
// how it was made written as `record_name`; atomically, as write_checkpoint_dir.
void write_derived_checkpoint(const fs::path& src, const fs::path& out, bool force,
                              const std::vector<NamedTensor>& tensors, const std::string& config_text,
                              const std::string& record_name, const std::string& record_text);

// Copies a checkpoint with float tensors converted to `dtype` (unset: keep each tensor's
// dtype), resharded at `max_shard_bytes`; non-weight files are copied and
// torchless_convert.json records how.
void convert_checkpoint(const fs::path& src, const fs::path& out, std::optional<DType> dtype,
                        uint64_t max_shard_bytes, bool force);

}  // namespace tl
