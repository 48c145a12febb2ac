// The trainer behind `torchless-train --config heal.yaml`: builds the model (bf16 base,
// NF4-quantized base for QLoRA, or fully trainable), attaches LoRA adapters, prepares the
// data, and runs optimizer steps with logging, evaluation, resumable checkpoints and the
// final PEFT adapter.
#pragma once
#include <functional>
#include <memory>
#include <ostream>

#include "core/ops.h"
#include "core/tokenizer.h"
#include "train/data.h"
#include "train/gemma4_model.h"
#include "train/optim.h"
#include "train/train_config.h"

namespace tl {

// On-disk state of a checkpoint directory besides the adapter (documented in
// docs/checkpoints.md): what resuming needs to continue exactly where the run stopped.
struct TrainerState {
  int64_t step = 0;           // optimizer steps done
  int64_t adam_t = 0;
  int64_t epoch = 0, cursor = 0;  // data position: next row of epoch_order(epoch)
  int64_t metrics_bytes = 0;  // length of metrics.jsonl when the checkpoint was taken
  int64_t skipped_steps = 0;
};

class Trainer {
 public:
  Trainer(TrainConfig cfg, Ops& ops, std::ostream& log);
  // Prints the plan (parameters, trainable share, memory, data, steps).
  void print_plan(std::ostream& out) const;
  // Runs to the last step; returns the final validation loss (NaN without a split).
  double run();

  // Test hook: called before each checkpoint save with the step; may throw to simulate a
  // failed save (disk full, killed process).
  std::function<void(int64_t)> before_save;
  // Test hook: called while pruning, after a checkpoint was renamed aside and before it is
  // deleted (a kill here must leave no half-deleted checkpoint-N).
  std::function<void(const std::filesystem::path&)> during_prune;
  // Stop after this many steps (saving a checkpoint first), as an interrupted run would;
  // 0 runs to the end.
  int64_t stop_after_step = 0;
  // Set when a SIGINT/SIGTERM (train/stop_signal.h) stopped the run after saving.
  int interrupted_by = 0;
  const TrainerState& state() const { return state_; }
  const std::string& run_id() const { return run_id_; }
  const DataStats& data_stats() const { return stats_; }

 private:
  void setup_model();
  void setup_data();
  // Refuses training rows with no target (truncation, or no trained turns), saying why.
  void refuse_untrained_data(const std::vector<Row>& rows) const;
  // Refuses rows whose attention would not fit in memory (an OutOfMemory naming it).
  void refuse_oversized_rows(const std::vector<Row>& rows) const;
  void save_checkpoint();
  // After a step: on a stop signal, saves a checkpoint (unless this step just did) and
  // returns true (train/stop_signal.cpp).
  bool stop_if_signalled();
  void resume(const std::filesystem::path& dir);
  // The LoRA adapter (PEFT format) and trainable.safetensors; with final_output and
  // adapter: full, a complete model checkpoint in dir/model instead.
  void write_adapter(const std::filesystem::path& dir, bool final_output) const;
  double evaluate();
  // Greedy generations from the first eval_table_size held-out prompts: appended to
  // generations.jsonl, summarised in the log; returns the mean seq-rep-4.
  double generation_check(int64_t step);
  MicroBatch next_micro_batch();

  TrainConfig cfg_;
  Ops& ops_;
  std::ostream& log_;
  std::unique_ptr<Gemma4Model> model_;
  std::string prefix_;
  std::unique_ptr<Tokenizer> tokenizer_;
  Gemma4Grads grads_;
  std::unique_ptr<AdamW> optimizer_;
  std::vector<Row> train_rows_, val_rows_;
  std::vector<Example> val_examples_;  // unpacked, for generation prompts
  std::vector<int32_t> stop_tokens_;
  DataStats stats_;
  Schedule schedule_;
  TrainerState state_;
  std::vector<int64_t> order_;
  int64_t total_params_ = 0, trainable_params_ = 0;
  std::string run_id_;  // train/run_dir.h
};

}  // namespace tl
