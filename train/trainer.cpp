#include "train/trainer.h"

#include <fmt/format.h>

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/attention_blocks.h"
#include "core/nf4.h"
#include "core/plan.h"
#include "core/weights.h"
#include "train/surgery/surgery.h"
#include "train/eval/generate.h"
#include "train/eval/plot.h"
#include "train/eval/report.h"
#include "train/eval/text_measures.h"
#include "train/step/memory_plan.h"
#include "train/model/peft_adapter.h"
#include "train/model/preflight.h"
#include "core/output_dir.h"
#include "train/run_dir.h"
#include "train/step/train_step.h"

namespace tl {

namespace fs = std::filesystem;

Trainer::Trainer(TrainConfig cfg, Ops& ops, std::ostream& log)
    : cfg_(std::move(cfg)), ops_(ops), log_(log), own_comm_(make_single_comm()), comm_(own_comm_.get()) {
  setup_model();
  setup_data();
}

Trainer::Trainer(TrainConfig cfg, Ops& ops, std::ostream& log, Comm& comm)
    : cfg_(std::move(cfg)), ops_(ops), log_(log), comm_(&comm) {
  setup_model();
  setup_data();
  setup_ddp();
}

void Trainer::setup_model() {
  // Measured before any weight is loaded: the plan counts the weights itself.
  memory_budget_ = checkpoint_budget(cfg_, ops_.memory_available());
  if (!cfg_.upscale_from.empty()) {
    // The damage the heal must repair: an overlapping-slice upscale (recipes.md §2).
    const Gemma4Config src = Gemma4Config::load(cfg_.upscale_from);
    const SurgeryReport r = apply_layer_map(cfg_.upscale_from, cfg_.base_model,
                                            slices_map(int(src.num_hidden_layers), cfg_.upscale_slices),
                                            IdentityMode::None, false, /*force=*/true);
    log_ << fmt::format("upscale          {} ({} layers) → {} ({} layers), slices {}\n", cfg_.upscale_from, r.layers_in,
                        cfg_.base_model, r.layers_out, cfg_.upscale_slices);
  }
  if (!fs::is_directory(cfg_.base_model))
    throw Error(fmt::format("{}: base_model '{}' is not a directory", cfg_.source.string(), cfg_.base_model));
  Gemma4Config mc = Gemma4Config::load(cfg_.base_model);
  refuse_sequence_over_context(cfg_, mc);
  Checkpoint ckpt = Checkpoint::open(cfg_.base_model);
  if (const std::string q = first_bnb_4bit(ckpt); !q.empty()) {
    // A -bnb-4bit checkpoint holds only NF4 projections: they can be the frozen base of
    // QLoRA, nothing else (training them needs the full-precision model).
    if (!cfg_.load_in_4bit)
      throw Error(fmt::format("{}: base_model '{}' is pre-quantized by bitsandbytes ('{}' is 4-bit); train it "
                              "with adapter: qlora (load_in_4bit: true), or use the full-precision model",
                              cfg_.source.string(), cfg_.base_model, q));
    if (!cfg_.full_train_layers.empty())
      throw Error(fmt::format("{}: full_train_layers needs full-precision weights, but base_model '{}' is "
                              "pre-quantized by bitsandbytes ('{}' is 4-bit)",
                              cfg_.source.string(), cfg_.base_model, q));
  }
  model_ = std::make_unique<Gemma4Model>(mc, ops_);
  // QLoRA: every projection and MoE expert (outside full_train_layers) is quantized to NF4 as
  // bitsandbytes does it, while streaming the checkpoint, from the dtype the checkpoint stores
  // (bnb's quant_state.dtype); a pre-quantized checkpoint's bytes are used as they are. Held
  // in NF4 from here on; forward and backward dequantize by tiles.
  Gemma4LoadOptions load = cfg_.load_in_4bit ? Gemma4LoadOptions::nf4(cfg_.double_quant, cfg_.full_train_layers)
                                             : Gemma4LoadOptions{};
  load.trainable = [all = cfg_.adapter == "full", layers = cfg_.full_train_layers](const WeightSpec& s) {
    return all || std::find(layers.begin(), layers.end(), s.layer) != layers.end();
  };
  model_->load(ckpt, load);
  prefix_ = decoder_prefix(ckpt);
  total_params_ = plan_model(mc).total_params;
  const auto specs = text_decoder_weights(mc);

  // Base weights live in the activation dtype. Beside BF16 activations (a GPU with bf16: true)
  // training them would update bf16 weights with bf16 gradients and moments, without the
  // fp32 masters LoRA gets; refuse rather than train worse than asked.
  if (ops_.act_dtype() == DType::BF16 && (cfg_.adapter == "full" || !cfg_.full_train_layers.empty()))
    throw Error(fmt::format("{}: {} trains base weights, which this backend holds in bf16 (no fp32 master "
                            "copies); set bf16: false to train them in fp32",
                            cfg_.source.string(), cfg_.adapter == "full" ? "adapter: full" : "full_train_layers"));

  std::vector<ParamSlot> slots;
  if (cfg_.adapter == "full") {
    grads_ = model_->zero_grads();
    for (const WeightSpec& s : specs)
      if (s.is_parameter)
        slots.push_back({s.name, weight_slot(model_->mutable_weights(), s.name), weight_slot(grads_.w, s.name), {},
                         {}, s.shape.size() > 1});  // 1-D (norms, scales): HF's no-decay group
  } else {
    grads_ = model_->no_grads();
    for (const std::string& name : select_lora_targets(mc, cfg_.lora, prefix_)) {
      Tensor* w = weight_slot(model_->mutable_weights(), name);
      const std::string module = prefix_ + name.substr(0, name.size() - 7);
      const int64_t r = cfg_.lora.rank_for(module);
      Tensor A = Tensor::zeros({r, w->dim(1)}, DType::F32), B = Tensor::zeros({w->dim(0), r}, DType::F32);
      const uint64_t h = splitmix64(std::hash<std::string>{}(name) ^ cfg_.seed);
      lora_init(A, B, h);
      model_->attach_lora(name, A, B, cfg_.lora.scaling_for(module), cfg_.lora.dropout, splitmix64(h));
    }
    slots = lora_param_slots(*model_, prefix_);
    for (int layer : cfg_.full_train_layers) {
      if (layer < 0 || layer >= mc.num_hidden_layers)
        throw Error(fmt::format("{}: full_train_layers names layer {} but the model has {}", cfg_.source.string(),
                                layer, mc.num_hidden_layers));
      for (const WeightSpec& s : specs)
        if (s.layer == layer && s.is_parameter) {
          Tensor* w = weight_slot(model_->mutable_weights(), s.name);
          Tensor* g = weight_slot(grads_.w, s.name);
          *g = ops_.zeros(w->shape(), w->dtype());
          slots.push_back({s.name, w, g, {}, {}, s.shape.size() > 1});
        }
    }
  }
  for (const auto& s : slots) trainable_params_ += s.value->numel();
  optimizer_ = std::make_unique<AdamW>(
      AdamWConfig{cfg_.learning_rate, cfg_.adam_beta1, cfg_.adam_beta2, cfg_.adam_epsilon, cfg_.weight_decay}, slots,
      ops_);
  setup_parent();
  // After the parent: a teacher changes what fits.
  plan_input_ = memory_plan_input(cfg_, model_->config(), trainable_params_, ops_.act_dtype(), memory_budget_,
                                  model_->distillation().teacher != nullptr, parent_weight_bytes_);
  model_->set_checkpointed_layers(plan_input_.checkpointed);
}

namespace {
bool same_dir(const fs::path& a, const fs::path& b) {
  std::error_code ea, eb;
  const fs::path ca = fs::weakly_canonical(a, ea), cb = fs::weakly_canonical(b, eb);
  return !ea && !eb && ca == cb;
}

// "" when each parent layer j holds the same bytes as its copy order[j] in the model (checked
// on the layer norms and the final norm: cheap, and any retraining of the parent after the
// surgery changes them); else what differs.
std::string copies_differ(const fs::path& parent_dir, const fs::path& model_dir, const std::vector<int>& order) {
  const Checkpoint p = Checkpoint::open(parent_dir), m = Checkpoint::open(model_dir);
  const std::string pp = decoder_prefix(p), mp = decoder_prefix(m);
  auto same = [&](const std::string& a, const std::string& b) {
    if (!p.contains(pp + a) || !m.contains(mp + b)) return false;
    const Tensor x = p.get(pp + a), y = m.get(mp + b);
    return x.dtype() == y.dtype() && x.shape() == y.shape() && std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0;
  };
  if (!same("norm.weight", "norm.weight")) return "the final norm differs from the model's";
  for (size_t j = 0; j < order.size(); ++j)
    for (const char* w : {"input_layernorm.weight", "post_feedforward_layernorm.weight"})
      if (!same(fmt::format("layers.{}.{}", j, w), fmt::format("layers.{}.{}", order[j], w)))
        return fmt::format("its layer {} differs from layer {} of the model ({}), so it changed after the surgery", j,
                           order[j], w);
  return "";
}
}  // namespace

ParentDir parent_dir(const TrainConfig& cfg, const std::string& model_dir) {
  ParentDir p{cfg.distill_from, "distill_from", false};
  if (p.dir == "auto") {
    if (!cfg.upscale_from.empty()) p.dir = cfg.upscale_from;
    else if (auto rec = read_surgery_record(model_dir)) p.dir = rec->source.string();
    else p.dir.clear(), p.auto_unresolved = true;
  }
  if (p.dir.empty()) p.dir = cfg.upscale_from, p.key = "upscale_from";
  if (p.dir.empty()) p.dir = cfg.eval_reference_model, p.key = "eval_reference_model";
  return p;
}

void Trainer::setup_parent() {
  const std::optional<SurgeryRecord> rec = read_surgery_record(cfg_.base_model);
  const ParentDir parent = parent_dir(cfg_, cfg_.base_model);
  if (parent.auto_unresolved)
    throw Error(fmt::format("{}: distill_from: auto needs upscale_from or a base_model written by torchless-surgery "
                            "expand or upscale ('{}' has no torchless_surgery.json); name the parent's directory",
                            cfg_.source.string(), cfg_.base_model));
  const std::string& dir = parent.dir;
  const std::string& key = parent.key;
  if (dir.empty()) return;
  if (!fs::is_directory(dir))
    throw Error(fmt::format("{}: {} '{}' is not a directory{}", cfg_.source.string(), key, dir,
                            cfg_.distill_from == "auto" ? " (found through distill_from: auto)" : ""));
  parent_dir_ = dir;
  const Gemma4Config pc = Gemma4Config::load(dir);
  const bool distill = !cfg_.distill_from.empty() && cfg_.distill_alpha > 0;
  if (distill && cfg_.distill_top_k > pc.vocab_size)
    throw Error(fmt::format("{}: distill_top_k {} is larger than the parent's vocabulary ({})", cfg_.source.string(),
                            cfg_.distill_top_k, pc.vocab_size));
  // The student's base is the parent's layers (plus inserted ones) when its surgery record
  // maps it from this directory and every parent layer has a frozen copy.
  std::string why;
  if (!rec) {
    why = fmt::format("'{}' has no surgery layer map (torchless_surgery.json)", cfg_.base_model);
  } else if (!same_dir(rec->source, dir)) {
    why = fmt::format("'{}' was made from '{}'", cfg_.base_model, rec->source.string());
  } else if (cfg_.adapter == "full") {
    why = "adapter: full trains the base weights the parent would share";
  } else if (auto order = parent_layer_order(rec->map, int(pc.num_hidden_layers), cfg_.full_train_layers, why)) {
    if (std::string bad = copies_differ(dir, cfg_.base_model, *order); !bad.empty()) {
      why = "the parent's " + bad;
    } else {
      try {
        own_parent_ = model_->parent_view(pc, *order);
        std::string layers;
        for (size_t j = 0; j < order->size(); ++j) layers += fmt::format("{}{}", j ? "," : "", (*order)[j]);
        parent_mode_ = fmt::format("shared weights: the parent's layers are layers {} of {}, run without LoRA "
                                   "(no extra weights)",
                                   layers, cfg_.base_model);
      } catch (const Error& e) {
        why = e.what();
      }
    }
  }
  if (!own_parent_ && !distill && same_dir(dir, cfg_.eval_reference_model)) {
    // Measured only: the reference model setup_data loads anyway is the parent (no third copy).
    parent_mode_ = fmt::format("the eval_reference_model, as loaded for cross-perplexity ({})", why);
    return;
  }
  if (!own_parent_) {
    own_parent_ = std::make_unique<Gemma4Model>(pc, ops_);
    own_parent_->load(Checkpoint::open(dir),
                      cfg_.load_in_4bit ? Gemma4LoadOptions::nf4(cfg_.double_quant) : Gemma4LoadOptions{});
    const ModelPlan pp = plan_model(pc);
    parent_weight_bytes_ = cfg_.load_in_4bit ? pp.bytes_nf4 : pp.bytes_bf16;
    parent_mode_ = fmt::format("second model: loaded frozen{}, {:.3f} GiB ({})", cfg_.load_in_4bit ? " in NF4" : "",
                               parent_weight_bytes_ / double(1ull << 30), why);
  }
  parent_ = own_parent_.get();
  if (distill) model_->set_distillation({parent_, cfg_.distill_alpha, cfg_.distill_temperature, cfg_.distill_top_k});
}

void Trainer::setup_data() {
  const fs::path tok = fs::path(cfg_.base_model) / "tokenizer.json";
  if (!fs::exists(tok)) throw Error(fmt::format("{}: no tokenizer.json beside the weights", cfg_.base_model));
  tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::load(tok.string()));
  std::vector<Example> train = load_examples(cfg_.data(), *tokenizer_, stats_), val;
  split_validation(train, val, cfg_.val_set_size, cfg_.seed);
  train_rows_ = make_rows(train, cfg_.sequence_len, cfg_.sample_packing);
  refuse_untrained_data(train_rows_);
  refuse_oversized_rows(train_rows_);
  val_rows_ = make_rows(val, cfg_.sequence_len, cfg_.sample_packing);
  if (cfg_.eval_table_size > 0) {
    val_examples_ = val;
    stop_tokens_ = stop_tokens_for(cfg_.base_model, *tokenizer_);
    if (!cfg_.eval_reference_model.empty())
      reference_ = std::make_unique<EvalModel>(load_eval_model(cfg_.eval_reference_model, {}, false, ops_));
  }
  if (!parent_ && !parent_dir_.empty()) {  // setup_parent chose the reference model as the parent
    if (!reference_)
      reference_ = std::make_unique<EvalModel>(load_eval_model(cfg_.eval_reference_model, {}, false, ops_));
    parent_ = reference_->model.get();
  }
  if (!cfg_.eval_mc_file.empty()) mc_items_ = load_mc_jsonl(cfg_.eval_mc_file);
  const int64_t per_step = cfg_.micro_batch_size * cfg_.gradient_accumulation_steps * comm_->world();
  const int64_t total = cfg_.max_steps > 0
                            ? cfg_.max_steps
                            : std::max<int64_t>(1, int64_t(std::ceil(cfg_.num_epochs * double(train_rows_.size()) /
                                                                     double(per_step))));
  schedule_ = {cfg_.lr_scheduler, total, warmup_steps_for(total, cfg_.warmup_steps, cfg_.warmup_ratio),
               cfg_.cosine_min_lr_ratio};
  order_ = epoch_order(int64_t(train_rows_.size()), cfg_.seed, 0);
}

void Trainer::refuse_untrained_data(const std::vector<Row>& rows) const {
  // A target is a label != -100 after the one-token shift (labels[0] never is one).
  int64_t targets = 0;
  for (const Row& r : rows)
    for (size_t i = 1; i < r.labels.size(); ++i) targets += r.labels[i] != -100;
  if (targets > 0) return;
  std::string why = cfg_.train_on_inputs
                        ? "every example is a single token"
                        : "only the roles in roles_to_train (assistant turns, completions) are trained, and no "
                          "example has one";
  if (stats_.truncated > 0 || stats_.dropped > 0)
    why = fmt::format("{} truncated and {} dropped at sequence_len {}, which cut off every trained turn; or {}",
                      stats_.truncated, stats_.dropped, cfg_.sequence_len, why);
  throw Error(fmt::format("{}: the training data has no trained tokens ({} examples): {}", cfg_.source.string(),
                          stats_.examples, why));
}

void refuse_sequence_over_context(const TrainConfig& cfg, const Gemma4Config& model) {
  refuse_over_context(model, (fs::path(cfg.base_model) / "config.json").string(), cfg.sequence_len,
                      fmt::format("{}: sequence_len", cfg.source.string()), "lower sequence_len");
}

void Trainer::refuse_oversized_rows(const std::vector<Row>& rows) const {
  // The CPU attention (core/attention_blocks.h) holds, per thread, one block's probabilities
  // and their gradient in the activation dtype plus a bf16 copy of each, allocated inside a
  // parallel loop where a failed allocation cannot be caught; so the longest row is checked
  // against physical memory first.
  size_t longest = 0;
  for (const Row& r : rows) longest = std::max(longest, r.ids.size());
  const int64_t group = widest_gqa_group(model_->config()), threads = omp_get_max_threads();
  const double per_thread = attention_block_scores(group, int64_t(longest)) *
                            (2.0 * double(dtype_size(ops_.act_dtype())) + 4.0);
  refuse_over_memory(double(threads) * per_thread,
                     fmt::format("{} threads × {} heads × 128 queries × S keys, twice", threads, group),
                     fmt::format("out of memory: attention over a {}-token row", longest), "lower sequence_len");
}

MemoryPlanInput memory_plan_input(const TrainConfig& cfg, const Gemma4Config& model, int64_t trainable, DType act,
                                  double budget, bool distill, double teacher_weights) {
  MemoryPlanInput in;
  in.distill = distill;
  in.teacher_weights = teacher_weights;
  in.sequence_len = cfg.sequence_len;
  in.micro_batch = cfg.micro_batch_size;
  in.lora_params = trainable;
  in.gradient_checkpointing = cfg.gradient_checkpointing != "false";
  in.load_in_4bit = cfg.load_in_4bit;
  in.act_bytes = int(dtype_size(act));
  const size_t L = size_t(model.num_hidden_layers);
  if (cfg.gradient_checkpointing == "auto" && budget > 0) in.checkpointed = checkpointed_layers(model, in, budget);
  else in.checkpointed.assign(L, in.gradient_checkpointing);
  return in;
}

double checkpoint_budget(const TrainConfig& cfg, double available) {
  return cfg.max_memory_gib > 0 ? cfg.max_memory_gib * double(1ull << 30) : available;
}

std::string describe_checkpointing(const TrainConfig& cfg, const MemoryPlanInput& in, double budget) {
  const int64_t L = int64_t(in.checkpointed.size()),
                kept = L - std::count(in.checkpointed.begin(), in.checkpointed.end(), true);
  std::string why = cfg.gradient_checkpointing != "auto"
                        ? fmt::format("gradient_checkpointing: {}", cfg.gradient_checkpointing)
                    : budget <= 0 ? "auto, with no budget known (no device here; set max_memory_gib): every layer recomputed"
                                  : fmt::format("auto, for a budget of {:.1f} GiB ({})", budget / double(1ull << 30),
                                                cfg.max_memory_gib > 0 ? "max_memory_gib" : "free at start");
  return fmt::format("checkpointing    {} of {} layers keep their activations, {} recomputed ({})\n", kept, L,
                     L - kept, why);
}

double Trainer::planned_peak_bytes() const { return plan_training_memory(model_->config(), plan_input()).total(); }

void Trainer::print_plan(std::ostream& out) const {
  const double pct = 100.0 * double(trainable_params_) / double(std::max<int64_t>(1, total_params_));
  const auto& mc = model_->config();
  ModelPlan plan = plan_model(mc);
  out << fmt::format("model            {} ({} layers, hidden {})\n", cfg_.base_model, mc.num_hidden_layers, mc.hidden_size);
  out << fmt::format("adapter          {}{}\n", cfg_.adapter,
                     cfg_.adapter == "full" ? "" : fmt::format(" (r {}, alpha {}, {} modules)", cfg_.lora.r,
                                                               cfg_.lora.alpha, model_->adapters().size()));
  out << fmt::format("parameters       {} / {} ({:.4f}%) trainable\n", trainable_params_, total_params_, pct);
  const double base = cfg_.load_in_4bit ? plan.bytes_nf4 : plan.bytes_bf16;
  // Trainable fp32 master weights, their gradients and two Adam moments.
  const double train_bytes = 16.0 * double(trainable_params_);
  out << fmt::format("memory           base weights {:.3f} GiB ({}), trainable state {:.3f} GiB\n",
                     base / double(1ull << 30), cfg_.load_in_4bit ? "NF4" : "bf16", train_bytes / double(1ull << 30));
  if (parent_) {
    const auto& d = model_->distillation();
    out << fmt::format("parent           {} ({} layers): {}\n", parent_dir_, parent_->config().num_hidden_layers,
                       parent_mode_);
    out << (d.teacher ? fmt::format("distillation     (1 − {0})·CE + {0}·T²·KL, T {1}, {2}; the teacher's logits per "
                                    "{3}-token chunk\n",
                                    d.alpha, d.temperature,
                                    d.top_k > 0 ? fmt::format("the parent's top {} renormalised", d.top_k)
                                                : std::string("whole vocabulary"),
                                    256)
                      : std::string(!cfg_.distill_from.empty()
                                        ? "distillation     off (distill_alpha 0): the parent is measured only\n"
                                        : "distillation     off (no distill_from): the parent is measured only\n"));
  }
  const MemoryPlanInput in = plan_input();
  out << describe_checkpointing(cfg_, in, memory_budget_) << format_memory_plan(mc, in);
  out << fmt::format("data             {} examples, {} tokens ({} trained), {} truncated, {} dropped\n",
                     stats_.examples, stats_.tokens, stats_.trained_tokens, stats_.truncated, stats_.dropped);
  out << fmt::format("rows             {} train, {} validation (sequence_len {}, packing {})\n", train_rows_.size(),
                     val_rows_.size(), cfg_.sequence_len, cfg_.sample_packing ? "on" : "off");
  out << fmt::format("steps            {} (micro-batch {} × accumulation {}), warmup {}, {} schedule, lr {}\n",
                     schedule_.total_steps, cfg_.micro_batch_size, cfg_.gradient_accumulation_steps,
                     schedule_.warmup_steps, cfg_.lr_scheduler, cfg_.learning_rate);
}

MicroBatch Trainer::next_micro_batch(bool build) {
  const int64_t n = int64_t(train_rows_.size());
  if (state_.cursor >= n) {
    ++state_.epoch;
    state_.cursor = 0;
    order_ = epoch_order(n, cfg_.seed, state_.epoch);
  }
  const int64_t count = std::min(cfg_.micro_batch_size, n - state_.cursor);
  MicroBatch mb = build ? make_micro_batch(train_rows_, order_, state_.cursor, count) : MicroBatch{};
  state_.cursor += count;
  return mb;
}

Trainer::Evaluation Trainer::evaluate() {
  Evaluation e;
  if (val_rows_.empty()) return e;
  // Sharded: rank r evaluates every world-th micro-batch; the sums are reduced below.
  const HeldOut h = held_out(*model_, parent_, val_rows_, cfg_.micro_batch_size,
                             cfg_.micro_batch_size * comm_->rank(), cfg_.micro_batch_size * comm_->world());
  double v[5] = {h.loss.sum, double(h.loss.count), h.parent.kl, double(h.parent.count), double(h.parent.agree)};
  comm_->all_reduce_sum_host(v, 5, "evaluation all-reduce");
  if (v[1] > 0) e.loss = v[0] / v[1];
  if (v[3] > 0) e.kl_parent = v[2] / v[3], e.top1_parent = v[4] / v[3];
  return e;
}

EvalMeasures Trainer::generation_measures(Gemma4Model& model, std::vector<std::vector<int32_t>>& prompts,
                                          std::vector<Generation>& gens) {
  EvalMeasures m;
  prompts.clear();
  gens.clear();
  if (cfg_.eval_table_size > 0) {
    model.set_training(false);
    const int64_t max_prompt = std::max<int64_t>(1, cfg_.sequence_len - cfg_.eval_max_new_tokens);
    for (const Example& e : val_examples_) {
      if (int64_t(prompts.size()) == cfg_.eval_table_size) break;
      if (auto p = generation_prompt(e, max_prompt); !p.empty()) prompts.push_back(std::move(p));
    }
    gens = greedy_generations(model, ops_, prompts, cfg_.eval_max_new_tokens, stop_tokens_);
    score_generations(m, gens);
    if (reference_) m.cross_perplexity = cross_perplexity(*reference_->model, gens);
  }
  if (!mc_items_.empty()) {
    const McResult r = score_mc(model, ops_, *tokenizer_, mc_items_);
    m.mc_accuracy = r.accuracy();
    m.mc_accuracy_norm = r.accuracy_norm();
  }
  return m;
}

void Trainer::measure_parent() {
  if (!parent_ || parent_measured_) return;
  // Held-out loss on the same split, sharded like evaluate (every rank).
  double v[2] = {0, 0};
  if (!val_rows_.empty()) {
    const HeldOut h = held_out(*parent_, nullptr, val_rows_, cfg_.micro_batch_size,
                               cfg_.micro_batch_size * comm_->rank(), cfg_.micro_batch_size * comm_->world());
    v[0] = h.loss.sum;
    v[1] = double(h.loss.count);
  }
  comm_->all_reduce_sum_host(v, 2, "parent evaluation all-reduce");
  parent_measures_ = {};
  on_writer("parent generation check", [&] {
    if (cfg_.eval_table_size > 0 || !mc_items_.empty()) {
      std::vector<std::vector<int32_t>> prompts;
      std::vector<Generation> gens;
      parent_measures_ = generation_measures(*parent_, prompts, gens);
      parent_texts_.clear();
      for (const Generation& g : gens) parent_texts_.push_back(tokenizer_->decode(g.tokens));
    }
  });
  if (v[1] > 0) {
    parent_measures_.eval_loss = v[0] / v[1];
    parent_measures_.perplexity = std::exp(parent_measures_.eval_loss);
  }
  parent_measured_ = true;
  const GenerationScores& g = parent_measures_.generation;
  log_ << fmt::format("parent | eval_loss {:.4f}{} | {}\n", parent_measures_.eval_loss,
                      g.count ? fmt::format(" | generation rep-4 {:.3f} loops {:.2f} distinct-2 {:.3f}", g.rep4,
                                            g.loop_fraction, g.distinct2)
                              : std::string(),
                      parent_dir_)
       << std::flush;
}

EvalMeasures Trainer::measure(int64_t step, const Evaluation& eval) {
  std::vector<std::vector<int32_t>> prompts;
  std::vector<Generation> gens;
  EvalMeasures m = generation_measures(*model_, prompts, gens);
  m.eval_loss = eval.loss;
  m.perplexity = std::exp(eval.loss);
  m.kl_parent = eval.kl_parent;
  m.top1_parent = eval.top1_parent;
  std::string line = fmt::format("step {}/{} | measures", step, schedule_.total_steps);
  if (cfg_.eval_table_size > 0) {
    std::ofstream out(fs::path(cfg_.output_dir) / "generations.jsonl", step == 0 ? std::ios::trunc : std::ios::app);
    last_texts_.clear();
    for (const Generation& g : gens) {
      const std::string text = tokenizer_->decode(g.tokens);
      // Scored as GenerationScores scores it: without the stop token.
      const auto scored = std::span<const int32_t>(g.tokens).first(g.tokens.size() - (g.stopped ? 1 : 0));
      last_texts_.push_back({tokenizer_->decode(g.prompt), text});
      out << nlohmann::json{{"step", step}, {"prompt", last_texts_.back().first}, {"completion", text},
                            {"rep4", repetition_rate(scored, 4)}, {"loops", loops(scored)}, {"stopped", g.stopped}}
                 .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
          << "\n";
    }
    if (!out) throw Error(fmt::format("{}: cannot write generations.jsonl", cfg_.output_dir));
    if (gens.empty()) {
      line += " | generation: no held-out example has a prompt to continue";
    } else {
      const GenerationScores& g = m.generation;
      // One line of the first completion, so the log shows what the numbers mean.
      const std::string shown = nlohmann::json(last_texts_[0].second.substr(0, 100))
                                    .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      line += fmt::format(" | generation rep-4 {:.3f} loops {:.2f} distinct-2 {:.3f} over {} prompts ({} ended, {} new "
                          "tokens max){} | {}",
                          g.rep4, g.loop_fraction, g.distinct2, g.count, g.stopped, cfg_.eval_max_new_tokens,
                          std::isfinite(m.cross_perplexity) ? fmt::format(", cross-ppl {:.2f}", m.cross_perplexity) : "",
                          shown);
    }
  }
  if (!mc_items_.empty()) line += fmt::format(" | multiple choice {:.3f} ({} questions)", m.mc_accuracy, mc_items_.size());
  log_ << line << "\n" << std::flush;
  return m;
}

namespace {
std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  int64_t t = int64_t(s);
  return t >= 3600 ? fmt::format("{}h{:02}m", t / 3600, t / 60 % 60) : fmt::format("{}m{:02}s", t / 60, t % 60);
}
}  // namespace

double Trainer::run() {
  // output_dir stays locked while the run writes to it, and no longer: however run() ends.
  struct Unlock {
    DirLock& lock;
    ~Unlock() { lock.release(); }
  } unlock{run_lock_};
  run_keys_ = run_identity_keys(cfg_);
  run_id_ = run_identity(run_keys_);
  // Rank 0 alone inspects and prepares output_dir (records, leftovers); the others would see
  // its fresh run record as another run's. They wait for it, then use the same directory.
  fs::path out = normalise_path(cfg_.output_dir);
  on_writer("output_dir preparation", [&] { out = prepare_run_dir(cfg_, run_keys_, log_, run_lock_); });
  cfg_.output_dir = out.string();
  fs::path resume_dir;
  if (cfg_.resume_from_checkpoint == "auto") {
    // Only this run's checkpoints: prepare_run_dir refused (or removed) any other run's.
    const auto mine = run_checkpoints(out, run_id_);
    if (mine.empty()) log_ << "resume: no checkpoint of run " << run_id_ << " in " << out.string() << ", starting fresh\n";
    else resume_dir = mine.back().second;
  } else if (!cfg_.resume_from_checkpoint.empty()) {
    resume_dir = cfg_.resume_from_checkpoint;
    if (!fs::is_directory(resume_dir))
      throw Error(fmt::format("resume_from_checkpoint: '{}' is not a directory", resume_dir.string()));
  }
  resume_dir = agree_resume_dir(resume_dir);
  if (!resume_dir.empty()) resume(resume_dir);
  // metrics.jsonl holds exactly the records of the steps done so far.
  const fs::path metrics_path = out / "metrics.jsonl";
  if (writer()) truncate_metrics(metrics_path, state_.metrics_bytes);

  // The eval line: the loss and, with a parent, the KL to it and the top-1 agreement.
  auto eval_line = [&](int64_t step, const Evaluation& e) {
    return fmt::format("step {}/{} | eval_loss {:.4f}{}\n", step, schedule_.total_steps, e.loss,
                       std::isfinite(e.kl_parent)
                           ? fmt::format(" | KL to parent {:.4f} | top-1 agreement {:.3f}", e.kl_parent, e.top1_parent)
                           : std::string());
  };
  auto eval_record = [](nlohmann::json& rec, const Evaluation& e) {
    rec["eval_loss"] = e.loss;
    if (std::isfinite(e.kl_parent)) rec["eval_kl_parent"] = e.kl_parent, rec["eval_top1_parent"] = e.top1_parent;
  };
  if (state_.step == 0) {
    // The baseline the run improves on: held-out loss, and how the raw model generates; and
    // the parent's level, which the heal aims back at.
    nlohmann::json rec;
    Evaluation base;
    if (parent_ && cfg_.eval_steps > 0) {
      measure_parent();
      if (std::isfinite(parent_measures_.eval_loss)) rec["parent_eval_loss"] = parent_measures_.eval_loss;
    }
    if (cfg_.eval_steps > 0 && !val_rows_.empty()) {
      base = evaluate();
      log_ << eval_line(0, base) << std::flush;
      eval_record(rec, base);
    }
    if (cfg_.eval_table_size > 0 || !mc_items_.empty()) {
      // Rank 0 generates and writes generations.jsonl; the others wait.
      on_writer("generation check", [&] {
        before_ = measure(0, base);
        before_texts_ = last_texts_;
        rec.update(before_.to_json());
      });
    }
    if (!rec.is_null() && writer()) {
      rec["step"] = 0;
      state_.metrics_bytes = append_line(metrics_path, rec.dump());
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t first = state_.step, total = schedule_.total_steps;
  double window_loss = 0, window_acc = 0, window_kl = 0;
  int64_t window_steps = 0, tokens_done = 0;
  double last_val = NAN;
  Evaluation last_eval;
  while (state_.step < total) {
    std::vector<MicroBatch> micro = next_step_batches();
    const double lr = cfg_.learning_rate * schedule_.factor(state_.step);
    if (around_step) around_step(state_.step + 1, false);
    model_->set_training(true, uint64_t(state_.step));
    StepResult r = buckets_ ? train_step(*model_, grads_, *optimizer_, ops_, micro, lr, cfg_.max_grad_norm, comm_,
                                         buckets_.get())
                            : train_step(*model_, grads_, *optimizer_, ops_, micro, lr, cfg_.max_grad_norm);
    if (around_step) around_step(state_.step + 1, true);
    ++state_.step;
    // Every rank takes as many rows; counted on this one (padding may differ by rank).
    for (const auto& mb : micro) tokens_done += mb.batch.ids.numel() * comm_->world();
    if (r.skipped) {
      ++state_.skipped_steps;
      if (cfg_.nan_policy == "stop")
        throw Error(fmt::format("step {}: loss {} / gradient norm {} is not finite; stopping (nan_policy: stop)",
                                state_.step, r.loss, r.grad_norm));
      log_ << fmt::format("step {}: non-finite loss or gradient, update skipped (nan_policy: skip)\n", state_.step);
    } else {
      window_loss += r.loss;
      window_kl += r.kl;
      window_acc += r.targets ? double(r.correct) / double(r.targets) : 0.0;
      ++window_steps;
    }
    const bool last = state_.step == total;
    nlohmann::json rec;
    if ((state_.step % std::max<int64_t>(1, cfg_.logging_steps) == 0 || last) && window_steps > 0) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double eta = secs / double(state_.step - first) * double(total - state_.step);
      const double loss = window_loss / double(window_steps), acc = window_acc / double(window_steps);
      // Distilling: "loss" stays the cross-entropy (comparable with eval_loss and with a
      // cross-entropy heal); the KL term and the objective trained are logged beside it.
      const auto& d = model_->distillation();
      const double kl = window_kl / double(window_steps);
      const double objective = (1.0 - d.alpha) * loss + d.alpha * d.temperature * d.temperature * kl;
      log_ << fmt::format("step {}/{} | loss {:.4f}{} | acc {:.3f} | lr {:.3e} | grad {:.3f} | {:.0f} tok/s | ETA {}\n",
                          state_.step, total, loss,
                          d.teacher ? fmt::format(" | kl {:.4f} | objective {:.4f}", kl, objective) : std::string(),
                          acc, lr, r.grad_norm, double(tokens_done) / secs, duration(eta))
           << std::flush;
      rec = {{"step", state_.step}, {"epoch", state_.epoch}, {"loss", loss}, {"token_accuracy", acc},
             {"lr", lr}, {"grad_norm", r.grad_norm}, {"skipped_steps", state_.skipped_steps}};
      if (d.teacher) rec["distill_kl"] = kl, rec["distill_objective"] = objective;
      window_loss = window_acc = window_kl = 0;
      window_steps = 0;
    }
    if (cfg_.eval_steps > 0 && (state_.step % cfg_.eval_steps == 0 || last) && !val_rows_.empty()) {
      last_eval = evaluate();
      last_val = last_eval.loss;
      log_ << eval_line(state_.step, last_eval) << std::flush;
      if (rec.is_null()) rec = {{"step", state_.step}};
      eval_record(rec, last_eval);
      if (!last && (cfg_.eval_table_size > 0 || !mc_items_.empty()))
        on_writer("generation check", [&] { rec.update(measure(state_.step, last_eval).to_json()); });
    }
    check_sync(rec);
    if (!rec.is_null() && writer()) state_.metrics_bytes = append_line(metrics_path, rec.dump());
    if (cfg_.save_steps > 0 && state_.step % cfg_.save_steps == 0 && !last) save_checkpoint_ranks();
    if (stop_after_step > 0 && state_.step == stop_after_step && !last) {
      if (cfg_.save_steps <= 0 || state_.step % cfg_.save_steps != 0) save_checkpoint_ranks();
      log_ << fmt::format("stopped after step {} (resume with resume_from_checkpoint: auto)\n", state_.step);
      return NAN;
    }
    if (!last && stop_if_signalled()) return NAN;
  }
  if (std::isnan(last_val) && !val_rows_.empty()) {
    last_eval = evaluate();
    last_val = last_eval.loss;
  }
  double rep_after = NAN, rep_before = before_.generation.count ? before_.generation.rep4 : NAN;
  if (cfg_.eval_table_size > 0 || !mc_items_.empty()) {
    measure_parent();  // a resumed run measures the (frozen) parent now
    on_writer("generation check and report", [&] {
      const EvalMeasures after = measure(total, last_eval);
      rep_after = after.generation.count ? after.generation.rep4 : NAN;
      nlohmann::json rec = after.to_json();
      for (const char* k : {"eval_loss", "eval_kl_parent", "eval_top1_parent"})
        rec.erase(k);  // already in this step's record when eval_steps > 0
      rec["step"] = total;
      state_.metrics_bytes = append_line(metrics_path, rec.dump());
      HealReport report;
      report.title = fmt::format("Heal report: {}", fs::path(cfg_.base_model).filename().string());
      report.before_label = "before (step 0)";
      report.after_label = fmt::format("after (step {})", total);
      report.before = before_;
      report.after = after;
      if (parent_) {
        report.has_parent = true;
        report.parent_label = fmt::format("parent ({})", fs::path(parent_dir_).filename().string());
        report.parent = parent_measures_;
      }
      for (size_t i = 0; i < last_texts_.size() && i < 6; ++i)
        report.samples.push_back({last_texts_[i].first, i < before_texts_.size() ? before_texts_[i].second : "",
                                  last_texts_[i].second, i < parent_texts_.size() ? parent_texts_[i] : ""});
      for (const fs::path& p : write_heal_report(out, report, metrics_path)) log_ << "plot: " << p.string() << "\n";
      if (!plots_available()) log_ << "plots skipped: this build has no cairo\n";
      log_ << "report: " << (out / "report.md").string() << "\n";
    });
  }
  const double train_secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  on_writer("final adapter write", [&] { write_adapter(out, true); });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log_timing(train_secs, total - first);
  std::string rep;
  if (!std::isnan(rep_after))
    rep = std::isnan(rep_before) ? fmt::format("generation rep-4 {:.3f}; ", rep_after)
                                 : fmt::format("generation rep-4 {:.3f} → {:.3f}; ", rep_before, rep_after);
  log_ << fmt::format("done: {} steps in {}, {} skipped; {}{}{} written to {}\n", total - first, duration(secs),
                      state_.skipped_steps, std::isnan(last_val) ? "" : fmt::format("eval_loss {:.4f}; ", last_val),
                      rep, cfg_.adapter == "full" ? "model" : "adapter", out.string());
  return last_val;
}

}  // namespace tl
