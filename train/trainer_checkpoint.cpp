// Resumable checkpoints: output_dir/checkpoint-<step>/ holds
//   adapter_config.json, adapter_model.safetensors  the LoRA adapter (PEFT format), if any
//   trainable.safetensors                          full-rank trained weights (HF decoder names)
//   optimizer.safetensors                          Adam moments: "<param>.exp_avg", ".exp_avg_sq"
//   trainer_state.json                             step, Adam's t, data position, metrics length
// written into a temporary directory and renamed, so a failed save leaves the previous
// checkpoint as it was and never a half-written one.
#include <fmt/format.h>

#include <csignal>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/checkpoint_dir.h"
#include "core/weights.h"
#include "train/model/peft_adapter.h"
#include "train/run_dir.h"
#include "train/stop_signal.h"
#include "train/trainer.h"

namespace tl {

namespace fs = std::filesystem;
using nlohmann::json;

void Trainer::write_adapter(const fs::path& dir, bool final_output) const {
  auto& model = const_cast<Gemma4Model&>(*model_);
  if (!model.adapters().empty()) {
    std::vector<AdapterTensors> ad;
    for (LoraAdapter* a : model.adapters())
      ad.push_back({a->name, ops_.download(a->A).to(DType::F32), ops_.download(a->B).to(DType::F32)});
    LoraSpec spec = cfg_.lora;
    spec.base_model_name_or_path = cfg_.base_model;
    write_peft_adapter(dir, spec, ad, prefix_);
  }
  if (cfg_.adapter == "full" && final_output) {
    // A complete checkpoint: every decoder weight as trained, config and tokenizer copied.
    std::vector<NamedTensor> tensors;
    for (const auto& s : text_decoder_weights(model.config())) {
      Tensor host;
      if (s.is_parameter) {
        host = ops_.download(*weight_slot(model.mutable_weights(), s.name)).to(DType::F32);
      } else {
        host = Tensor::zeros({1}, DType::F32);
        host.data<float>()[0] = float(model.weights().layers[size_t(s.layer)].layer_scalar);
      }
      tensors.push_back(NamedTensor{prefix_ + s.name, host});
    }
    const fs::path model_dir = dir / "model";
    fs::remove_all(model_dir);
    fs::create_directories(model_dir);
    write_checkpoint(model_dir, tensors, 5'000'000'000ull);
    for (const fs::path& f : non_weight_files(cfg_.base_model)) fs::copy_file(f, model_dir / f.filename());
    return;
  }
  // Full-rank trained weights (adapter: full, or layers trained beside LoRA).
  std::vector<NamedTensor> full;
  for (auto& p : optimizer_->params())
    if (!p.name.starts_with("base_model."))
      full.push_back(NamedTensor{prefix_ + p.name, ops_.download(*p.value).to(DType::F32)});
  if (!full.empty()) write_safetensors(dir / "trainable.safetensors", full);
}

void Trainer::save_checkpoint() {
  const fs::path dir = fs::path(cfg_.output_dir) / fmt::format("checkpoint-{}", state_.step);
  write_checkpoint_dir(dir, {cfg_.base_model}, true, [&](const fs::path& tmp) {
    if (before_save) before_save(state_.step);
    write_adapter(tmp, false);
    std::vector<NamedTensor> moments;
    for (auto& p : optimizer_->params()) {
      moments.push_back({p.name + ".exp_avg", ops_.download(p.m)});
      moments.push_back({p.name + ".exp_avg_sq", ops_.download(p.v)});
    }
    write_safetensors(tmp / "optimizer.safetensors", moments);
    json st = {{"format", "torchless-trainer-state/1"}, {"step", state_.step}, {"adam_t", optimizer_->t()},
               {"epoch", state_.epoch}, {"cursor", state_.cursor}, {"metrics_bytes", state_.metrics_bytes},
               {"skipped_steps", state_.skipped_steps}, {"seed", cfg_.seed},
               {"total_steps", schedule_.total_steps}, {"run_id", run_id_}, {"run_keys", run_keys_}};
    write_file_atomic(tmp / "trainer_state.json", st.dump(2) + "\n");
  });
  log_ << fmt::format("saved {}\n", dir.string());
  // Only this run's checkpoints count towards the limit; another run's are never touched.
  prune_run_checkpoints(cfg_.output_dir, run_id_, cfg_.save_total_limit, during_prune);
}

void Trainer::resume(const fs::path& dir) {
  std::ifstream in(dir / "trainer_state.json");
  if (!in) throw Error(fmt::format("{}: not a torchless checkpoint (no trainer_state.json)", dir.string()));
  json st;
  try {
    st = json::parse(in);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}/trainer_state.json: invalid JSON ({})", dir.string(), e.what()));
  }
  if (!st.is_object()) throw Error(fmt::format("{}/trainer_state.json: not a JSON object", dir.string()));
  const std::string rid = st.value("run_id", std::string());
  if (rid != run_id_) {
    const std::string differs = run_key_differences(st.contains("run_keys") ? st["run_keys"] : json(), run_keys_);
    throw Error(fmt::format("{}: checkpoint is of run {}, but this config is run {} ({})", dir.string(),
                            rid.empty() ? "unknown" : rid, run_id_,
                            differs.empty() ? "a result-relevant key differs; the checkpoint records no keys to compare"
                                            : "it differs in " + differs));
  }
  if (st.value("seed", cfg_.seed) != cfg_.seed || st.value("total_steps", schedule_.total_steps) != schedule_.total_steps)
    throw Error(fmt::format("{}: checkpoint was made with another seed or step count than this config", dir.string()));
  state_.step = st.at("step");
  state_.epoch = st.at("epoch");
  state_.cursor = st.at("cursor");
  state_.metrics_bytes = st.at("metrics_bytes");
  state_.skipped_steps = st.value("skipped_steps", int64_t(0));
  optimizer_->set_t(st.at("adam_t"));
  order_ = epoch_order(int64_t(train_rows_.size()), cfg_.seed, state_.epoch);

  // Trainable values: LoRA tensors from the adapter file, full-rank ones from trainable.
  std::optional<SafetensorsFile> adapter, full;
  if (fs::exists(dir / "adapter_model.safetensors")) adapter = SafetensorsFile::open(dir / "adapter_model.safetensors");
  if (fs::exists(dir / "trainable.safetensors")) full = SafetensorsFile::open(dir / "trainable.safetensors");
  auto moments = SafetensorsFile::open(dir / "optimizer.safetensors");
  for (auto& p : optimizer_->params()) {
    const bool lora = p.name.starts_with("base_model.");
    const std::string key = lora ? p.name : prefix_ + p.name;
    const auto& file = lora ? adapter : full;
    if (!file || !file->contains(key))
      throw Error(fmt::format("{}: checkpoint has no tensor '{}' (trained with another adapter setup?)", dir.string(), key));
    // Each in the dtype the run holds it in (F32 LoRA masters beside BF16 activations).
    assign(ops_, *p.value, file->get(key));  // in place: the optimizer's flat buffers hold them
    assign(ops_, p.m, moments.get(p.name + ".exp_avg"));
    assign(ops_, p.v, moments.get(p.name + ".exp_avg_sq"));
  }
  log_ << fmt::format("resumed from {} at step {} (run {})\n", dir.string(), state_.step, run_id_);
}

// A signal asked the run to stop (stop_signal.h): save where it is, unless this step was just
// saved, and say how to resume. Under mpirun every rank looks at its own flag at this same
// step boundary and all agree on the first rank's signal: a signal may reach some ranks only
// (each rank is its own process group; a scheduler or `kill` picks them), and the ranks must
// stop together, with rank 0 alone saving (one checkpoint, its metrics length, not one per rank).
bool Trainer::stop_if_signalled() {
  int sig = stop_signal();
  if (comm_->world() > 1) {
    sig = 0;
    for (uint64_t s : comm_->all_gather_host(uint64_t(stop_signal()), "stop signal agreement"))
      if (s != 0) {
        sig = int(s);
        break;
      }
  }
  if (sig == 0) return false;
  if (cfg_.save_steps <= 0 || state_.step % cfg_.save_steps != 0) save_checkpoint_ranks();
  interrupted_by = sig;
  log_ << fmt::format("interrupted by {} after step {}: saved checkpoint-{} (resume with resume_from_checkpoint: "
                      "auto)\n",
                      sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : fmt::format("signal {}", sig),
                      state_.step, state_.step)
       << std::flush;
  return true;
}

}  // namespace tl
