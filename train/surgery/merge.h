// torchless-merge: base checkpoint + PEFT LoRA adapter → merged checkpoint, as PEFT's
// merge_and_unload computes it (formats.md §2):  W' = round_W(W + round_adapter((B·A)·s)),
// with B·A in fp32 and the delta in the adapter's dtype (fp32 unless the adapter is bf16).
// Streams one shard at a time (memory bounded by the largest shard); the output keeps the
// base's shard layout, index, config and tokenizer files, and is written atomically.
#pragma once
#include <filesystem>
#include <optional>

#include "core/dtype.h"

namespace tl {

struct MergeOptions {
  std::optional<DType> out_dtype;  // unset: each tensor keeps the base's dtype
  bool force = false;               // replace an existing output directory
};

struct MergeReport {
  int64_t merged_modules = 0, tensors = 0, shards = 0;
};

MergeReport merge_adapter(const std::filesystem::path& base, const std::filesystem::path& adapter,
                          const std::filesystem::path& out, const MergeOptions& options);

}  // namespace tl
