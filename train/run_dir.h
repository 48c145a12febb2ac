// The trainer's output_dir over several runs (docs/checkpoints.md): which run a directory
// belongs to, which of its checkpoints this run may resume or prune, and the metrics log.
//
// A run's identity is a hash of every config value that changes what it computes (model,
// data and their contents, adapter, optimisation, seed), not of where it writes or how
// often it logs or saves. It is written to output_dir/torchless_run.json and into every
// checkpoint's trainer_state.json as "run_id".
#pragma once
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "core/dir_lock.h"
#include "train/train_config.h"

namespace tl {

namespace fs = std::filesystem;

// The result-relevant keys, canonical JSON (datasets' and the base config's bytes by hash).
// Recorded beside the identity, so a refusal can say which key differs.
nlohmann::json run_identity_keys(const TrainConfig& cfg);
// 16 hex digits (FNV-1a 64 of run_identity_keys' canonical JSON).
std::string run_identity(const nlohmann::json& keys);
// "seed 5 → 6, datasets[0].bytes (the file's contents changed)": the keys whose values differ
// between a recorded run and this one; "" when `recorded` holds none (an older run).
std::string run_key_differences(const nlohmann::json& recorded, const nlohmann::json& now);

// Makes output_dir ready for a run with identity `id`, before anything is written:
// refuses an output_dir that is, contains or lies inside the base model or a dataset; one
// that exists, is not empty and holds nothing of ours; locks it into `lock` (the caller keeps
// it for the run's life), refusing one another process holds (core/dir_lock.h); refuses one
// holding another run's checkpoints or run record unless overwrite_output_dir (then those are
// removed). Removes stale .partial / .deleting directories of killed saves and prunes, and
// records the identity and its keys (run_identity_keys). A refusal names the keys that differ
// where the other run recorded them; a checkpoint whose trainer_state.json is unreadable is
// refused naming the file (it may be this run's, damaged: nothing of it is deleted unless
// overwrite_output_dir). Returns
// the normalised output_dir.
fs::path prepare_run_dir(const TrainConfig& cfg, const nlohmann::json& keys, std::ostream& log, DirLock& lock);

// checkpoint-N directories of run `id`, by step (others' and unreadable ones left out).
std::vector<std::pair<int64_t, fs::path>> run_checkpoints(const fs::path& out, const std::string& id);

// Keeps the newest `limit` checkpoints of run `id`. Each one dropped is renamed to a hidden
// .deleting name first, so a prune cut short never leaves a half-deleted checkpoint-N.
// `midway` (a test hook) runs after each rename, before the deletion.
void prune_run_checkpoints(const fs::path& out, const std::string& id, int64_t limit,
                           const std::function<void(const fs::path& aside)>& midway = {});

// Appends `line` + "\n" with one write(2) on an O_APPEND descriptor, so a crash leaves
// whole lines only; throws tl::Error naming the file on any failure. Returns the new size.
int64_t append_line(const fs::path& file, const std::string& line);

// Cuts metrics.jsonl back to `bytes` (the length a checkpoint recorded); refuses a file
// that is shorter, which would otherwise be padded with NUL bytes.
void truncate_metrics(const fs::path& file, int64_t bytes);

}  // namespace tl
