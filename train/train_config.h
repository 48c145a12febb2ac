// heal.yaml: the trainer's configuration, with the axolotl-style keys users know
// (../shared/docs/users.md §1). Unknown or mistyped keys are errors that suggest the
// nearest valid key; `key=value` overrides from the command line apply on top.
#pragma once
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "train/data/data.h"
#include "train/model/lora.h"

namespace tl {

struct TrainConfig {
  std::filesystem::path source;  // the YAML file
  std::string base_model;
  std::string adapter = "qlora";  // qlora | lora | full
  bool load_in_4bit = true;
  bool double_quant = true;
  LoraSpec lora;
  std::vector<int> full_train_layers;  // layers trained at full rank beside LoRA (inserted layers)

  int64_t sequence_len = 2048;
  bool sample_packing = true;
  std::string overlong = "truncate";  // truncate | drop: sequences longer than sequence_len
  std::vector<DatasetConfig> datasets;
  bool train_on_inputs = false;
  double val_set_size = 0.0;

  int64_t micro_batch_size = 1;
  int64_t gradient_accumulation_steps = 1;
  double num_epochs = 1;
  int64_t max_steps = 0;  // > 0 overrides num_epochs

  double learning_rate = 2e-4;
  std::string lr_scheduler = "cosine";
  double warmup_ratio = 0.0;
  int64_t warmup_steps = 0;
  double cosine_min_lr_ratio = 0.0;
  std::string optimizer = "adamw";
  double weight_decay = 0.0, adam_beta1 = 0.9, adam_beta2 = 0.999, adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;
  std::string nan_policy = "skip";  // skip | stop: what a non-finite loss or gradient does

  // true: every layer's tape is recomputed in the backward from its input; false: none is;
  // auto: the fewest layers that make the step fit max_memory_gib (or, when that is 0, the
  // GPU's free memory at start, or the host's available memory on the CPU).
  std::string gradient_checkpointing = "auto";
  double max_memory_gib = 0;
  bool bf16 = true;
  // Where the model runs: the GPU when there is one (auto), or the one named
  // (tools/backend.h makes it; `cuda` without a GPU is an error).
  std::string backend = "auto";

  std::string output_dir = "out";
  int64_t save_steps = 0;
  int64_t save_total_limit = 0;
  int64_t logging_steps = 1;
  int64_t eval_steps = 0;
  // Greedy generations from this many held-out prompts before and after training, scored by
  // repetition (seq-rep-4) and written to generations.jsonl; 0 turns them off (axolotl names).
  int64_t eval_table_size = 0;
  int64_t eval_max_new_tokens = 128;
  // Cross-perplexity of those generations under this model (e.g. the one before surgery), and
  // multiple-choice accuracy on this GPQA-style jsonl, at each evaluation.
  std::string eval_reference_model, eval_mc_file;
  // Damage before the heal: base_model is first written as the overlapping-slice upscale
  // (recipes.md §2) of upscale_from with these slices ("0:4,2:6").
  std::string upscale_from, upscale_slices;
  // Distillation from the parent (issue 24): the loss becomes (1 − α)·CE + α·T²·KL(p_parent,T
  // ‖ p_model,T) over the trained tokens. distill_from is the parent's directory, or "auto":
  // upscale_from, else the directory base_model's torchless_surgery.json names; empty: no
  // distillation. distill_top_k 0 uses the whole vocabulary, else the parent's top k
  // renormalised (as Axolotl's KD).
  std::string distill_from;
  double distill_alpha = 0.5, distill_temperature = 1.0;
  int64_t distill_top_k = 0;
  uint64_t seed = 42;
  // A new run in an output_dir holding another run's checkpoints is refused unless true
  // (then that run's files are removed first).
  bool overwrite_output_dir = false;
  std::string resume_from_checkpoint;  // a checkpoint dir, or "auto" for the newest in output_dir

  // Data parallelism (mpirun; docs/ddp.md): a collective that does not complete within
  // ddp_timeout seconds ends the job; waits for rank 0's writes (checkpoints, generations)
  // get ddp_io_timeout. Gradients are all-reduced in buckets of ddp_bucket_mb MiB. Every
  // ddp_check_sync_steps steps (0: never) the ranks compare their trainable weights.
  double ddp_timeout = 60, ddp_io_timeout = 1800, ddp_bucket_mb = 25;
  int64_t ddp_check_sync_steps = 0;

  // The keys the data pipeline reads.
  DataConfig data() const { return {datasets, sequence_len, overlong, train_on_inputs}; }

  // Loads and validates; `overrides` are "key=value" strings (value parsed as YAML).
  static TrainConfig load(const std::filesystem::path& yaml, const std::vector<std::string>& overrides = {});
};

// The valid top-level keys, and the nearest one to `key` (Levenshtein), for error messages.
const std::vector<std::string>& train_config_keys();
std::string nearest_key(const std::string& key, const std::vector<std::string>& valid);

}  // namespace tl
