// The trainer behind `torchless-train --config heal.yaml`: builds the model (bf16 base,
// NF4-quantized base for QLoRA, or fully trainable), attaches LoRA adapters, prepares the
// data, and runs optimizer steps with logging, evaluation, resumable checkpoints and the
// final PEFT adapter.
//
// The trainer room (train/, top level) owns heal.yaml, the run (checkpoints, run identity,
// signals) and the data-parallel wiring; it uses every room below it (model, data, eval,
// surgery, dist, step: docs/architecture.md) and must not know which backend runs the ops
// (tools/backend.h makes the Ops it is given).
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <memory>
#include <ostream>

#include "core/dir_lock.h"
#include "core/ops.h"
#include "core/tokenizer.h"
#include "train/dist/comm.h"
#include "train/dist/ddp.h"
#include "train/data/data.h"
#include "train/eval/evaluate.h"
#include "train/model/gemma4_model.h"
#include "train/step/memory_plan.h"
#include "train/step/optim.h"
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

// The memory plan's input for this run. With `gradient_checkpointing: auto` it holds the
// layers chosen for `budget` bytes (budget ≤ 0: unknown, every layer recomputed).
MemoryPlanInput memory_plan_input(const TrainConfig& cfg, const Gemma4Config& model, int64_t trainable_params,
                                  DType act, double budget, bool distill = false, double teacher_weights = 0);
// The parent a heal measures (and distils from): distill_from (`auto`: upscale_from, else the
// folder model_dir's torchless_surgery.json names), else upscale_from, else
// eval_reference_model; `key` names the setting it came from. auto_unresolved: distill_from is
// auto and neither names one (dir then falls back as without distill_from).
struct ParentDir {
  std::string dir, key;
  bool auto_unresolved = false;
};
ParentDir parent_dir(const TrainConfig& cfg, const std::string& model_dir);
// sequence_len within the model's context (max_position_embeddings), or one line naming both.
void refuse_sequence_over_context(const TrainConfig& cfg, const Gemma4Config& model);
// The budget `auto` plans against: max_memory_gib, else what the backend has free (`available`).
double checkpoint_budget(const TrainConfig& cfg, double available);
// One line: how many layers keep their activations, and why.
std::string describe_checkpointing(const TrainConfig& cfg, const MemoryPlanInput& in, double budget);

class Trainer {
 public:
  Trainer(TrainConfig cfg, Ops& ops, std::ostream& log);
  // Data parallel: one Trainer per rank, all given the same config. Rank 0 alone writes
  // logs, metrics, generations and checkpoints; every rank runs every collective.
  Trainer(TrainConfig cfg, Ops& ops, std::ostream& log, Comm& comm);
  // Prints the plan (parameters, trainable share, memory, data, steps).
  void print_plan(std::ostream& out) const;
  // The planned peak device memory of one process (the "peak per GPU" line of print_plan).
  double planned_peak_bytes() const;
  // Runs to the last step; returns the final validation loss (NaN without a split).
  double run();

  // Test hook: called before each checkpoint save with the step; may throw to simulate a
  // failed save (disk full, killed process).
  std::function<void(int64_t)> before_save;
  // Test hook: called while pruning, after a checkpoint was renamed aside and before it is
  // deleted (a kill here must leave no half-deleted checkpoint-N).
  std::function<void(const std::filesystem::path&)> during_prune;
  // Test hook: called with the step number just before and just after each optimizer step
  // (micro-batches, forward, backward, clipping, update), outside evaluation and saving.
  std::function<void(int64_t step, bool after)> around_step;
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
  // returns true (trainer_checkpoint.cpp).
  bool stop_if_signalled();
  void resume(const std::filesystem::path& dir);
  // The LoRA adapter (PEFT format) and trainable.safetensors; with final_output and
  // adapter: full, a complete model checkpoint in dir/model instead.
  void write_adapter(const std::filesystem::path& dir, bool final_output) const;
  // The held-out loss (NaN without a validation split) and, with a parent, the KL to it and
  // the top-1 agreement with it on the same targets; every rank takes part.
  struct Evaluation {
    double loss = NAN, kl_parent = NAN, top1_parent = NAN;
  };
  Evaluation evaluate();
  // Greedy generations from the first eval_table_size held-out prompts (appended to
  // generations.jsonl, scored by train/eval/text_measures.h, with the cross-perplexity under
  // eval_reference_model) and multiple-choice accuracy on eval_mc_file; logged in one line.
  EvalMeasures measure(int64_t step, const Evaluation& eval);
  // The generation and multiple-choice measures of `m` (the model or the parent), and its
  // generations.
  EvalMeasures generation_measures(Gemma4Model& m, std::vector<std::vector<int32_t>>& prompts_out,
                                   std::vector<Generation>& gens_out);

  // The parent (issue 24): distill_from (auto: upscale_from or the directory base_model's
  // torchless_surgery.json names), else upscale_from, else eval_reference_model. Run over the
  // student's frozen base in the parent's layer order when the surgery map holds every parent
  // layer as a frozen copy, else loaded as a second frozen model (NF4 under QLoRA). The
  // teacher of a distillation heal, and the report's parent column.
  void setup_parent();
  // The parent's held-out loss (all ranks) and generation measures (rank 0), once.
  void measure_parent();
  // What the memory plan of this run takes (the parent's weights and the teacher included).
  const MemoryPlanInput& plan_input() const { return plan_input_; }
  // The next micro-batch of the data order; with build false only the position advances.
  MicroBatch next_micro_batch(bool build = true);

  // Data parallelism (trainer_ddp.cpp).
  void setup_ddp();
  bool writer() const { return comm_->rank() == 0; }
  // This rank's micro-batches of the next global batch: the global batch is the
  // accumulation × world micro-batches one process would take in turn, and rank r takes
  // the r-th run of `accumulation` of them.
  std::vector<MicroBatch> next_step_batches();
  // Every rank resumes from the checkpoint rank 0 chose (its step broadcast).
  std::filesystem::path agree_resume_dir(const std::filesystem::path& chosen);
  // Rank 0 saves; the others wait at one barrier.
  void save_checkpoint_ranks();
  // Rank 0 runs `f` (writes, generations); the others wait for it at one barrier.
  template <class F>
  void on_writer(const char* what, F&& f) {
    if (writer()) f();
    comm_->barrier(what, cfg_.ddp_io_timeout);
  }
  // Every ddp_check_sync_steps: compares the ranks' trainable weights (stops naming the
  // rank that differs) and records the fingerprint in `rec`.
  void check_sync(nlohmann::json& rec);
  // One line: seconds per optimizer step and the share spent in collectives.
  void log_timing(double train_seconds, int64_t steps);

  TrainConfig cfg_;
  Ops& ops_;
  std::ostream& log_;
  std::unique_ptr<Comm> own_comm_;  // single process when no comm is given
  Comm* comm_;
  std::unique_ptr<GradBuckets> buckets_;  // world > 1
  std::unique_ptr<Gemma4Model> model_;
  double memory_budget_ = 0;        // what `gradient_checkpointing: auto` plans against (bytes)
  // The memory plan's input, with the layers gradient checkpointing recomputes (all, none, or
  // `auto`'s choice for the budget), made once the parent is known.
  MemoryPlanInput plan_input_;
  std::string prefix_;
  std::unique_ptr<Tokenizer> tokenizer_;
  Gemma4Grads grads_;
  std::unique_ptr<AdamW> optimizer_;
  std::vector<Row> train_rows_, val_rows_;
  std::vector<Example> val_examples_;  // unpacked, for generation prompts
  std::vector<int32_t> stop_tokens_;
  std::unique_ptr<EvalModel> reference_;
  std::vector<McItem> mc_items_;
  EvalMeasures before_;
  std::unique_ptr<Gemma4Model> own_parent_;  // a parent_view or a second model, when one is made
  Gemma4Model* parent_ = nullptr;            // the parent: own_parent_'s, or the reference model's
  std::string parent_dir_, parent_mode_;  // the parent's directory; how it runs (plan and log)
  double parent_weight_bytes_ = 0;        // a second model's weights (0: shared)
  bool parent_measured_ = false;
  EvalMeasures parent_measures_;
  std::vector<std::string> parent_texts_;  // its completions of the report's prompts
  std::vector<std::pair<std::string, std::string>> last_texts_, before_texts_;  // (prompt, completion)
  DataStats stats_;
  Schedule schedule_;
  TrainerState state_;
  std::vector<int64_t> order_;
  int64_t total_params_ = 0, trainable_params_ = 0;
  std::string run_id_;  // train/run_dir.h
  nlohmann::json run_keys_;  // what run_id_ is the hash of
  DirLock run_lock_;    // output_dir, locked while run() runs (core/dir_lock.h)
};

// What every rank must agree on before training: (what, fingerprint) pairs for the config
// (the YAML file's bytes and the key=value overrides), each data file's bytes, and the base
// checkpoint's index (config.json, the shard index, each safetensors header).
std::vector<std::pair<std::string, uint64_t>> startup_fingerprints(const TrainConfig& cfg,
                                                                   const std::vector<std::string>& overrides);

}  // namespace tl
