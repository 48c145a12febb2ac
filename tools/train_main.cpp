// torchless-train: heal a Gemma 4 checkpoint with QLoRA / LoRA / full training.
//   torchless-train --config heal.yaml [key=value ...] [--dry-run]
#include <CLI/CLI.hpp>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include <fmt/format.h>

#include "train/stop_signal.h"
#include "train/dist/comm.h"
#include "train/dist/ddp.h"
#include "tools/backend.h"
#if defined(TL_HAVE_NCCL)
#include "train/dist/comm_nccl.h"
#endif
#include "core/plan.h"
#include "train/step/memory_plan.h"
#include "train/trainer.h"
#include "core/cpu/thread_policy.h"

namespace {
// Whether `dir` holds a checkpoint's weights (false when it is missing, not a directory, or
// holds only a config).
bool has_weights(const std::filesystem::path& dir) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (e.path().extension() == ".safetensors") return true;
  return false;
}
// --dry-run on a bare config (e.g. configs/models/*): the plan needs no weights and no data.
// `budget`: what `gradient_checkpointing: auto` plans against (≤ 0: unknown).
void plan_bare_config(std::ostream& log, const tl::TrainConfig& cfg, tl::DType act, double budget) {
  const tl::Gemma4Config mc = tl::Gemma4Config::load(cfg.base_model);
  tl::refuse_sequence_over_context(cfg, mc);
  const int64_t trainable = cfg.adapter == "full" ? tl::plan_model(mc).total_params
                                                  : tl::lora_param_count(mc, cfg.lora, "model.language_model.");
  log << fmt::format("model            {} ({} layers, hidden {}; config only, no weights)\n", cfg.base_model,
                     mc.num_hidden_layers, mc.hidden_size)
      << fmt::format("adapter          {} (r {}), {} trainable parameters\n", cfg.adapter, cfg.lora.r, trainable);
  const bool distill = !cfg.distill_from.empty() && cfg.distill_alpha > 0;
  if (distill) {
    // Without weights there is no layer map to read: planned as the shared-weight teacher
    // (what an upscale or expand gets); a parent loaded on its own adds its weights.
    log << fmt::format("distillation     from {}: planned with the teacher over the student's base (shared "
                       "weights; a parent loaded as a second model adds its own)\n",
                       cfg.distill_from);
  }
  const tl::MemoryPlanInput in = tl::memory_plan_input(cfg, mc, trainable, act, budget, distill);
  log << tl::describe_checkpointing(cfg, in, budget) << tl::format_memory_plan(mc, in);
}
}  // namespace

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);  // before any OpenMP region: see core/cpu/thread_policy.h
  CLI::App app{"torchless-train: QLoRA / LoRA / full training of Gemma 4 checkpoints (GPU or CPU)"};
  std::string config;
  std::vector<std::string> overrides;
  bool dry_run = false;
  app.add_option("--config,-c", config, "heal.yaml (axolotl-style keys)")->required()->check(CLI::ExistingFile);
  app.add_option("overrides", overrides, "key=value settings that override the YAML");
  app.add_flag("--dry-run", dry_run, "print the plan (parameters, trainable share, memory, data, steps) and exit");
  CLI11_PARSE(app, argc, argv);
  std::unique_ptr<tl::Comm> comm;
  try {
    tl::TrainConfig cfg = tl::TrainConfig::load(config, overrides);
    // Under mpirun: MPI ranks (docs/ddp.md); otherwise a single process without MPI.
    comm = tl::make_comm(cfg.ddp_timeout);
    std::ostream quiet(nullptr);  // ranks other than 0 log nothing
    std::ostream& log = comm->rank() == 0 ? std::cout : quiet;
    if (comm->world() > 1) tl::check_ranks_agree(*comm, tl::startup_fingerprints(cfg, overrides));
    const tl::BackendKind kind = tl::parse_backend(cfg.backend, cfg.source.string() + ": backend");
    const tl::BackendOptions backend_opts{tl::DType::F32, cfg.bf16};
    if (dry_run && !has_weights(cfg.base_model) && kind == tl::BackendKind::Cuda && !tl::cuda_available()) {
      // Planning a GPU run needs no GPU: a bare config with `backend: cuda` is planned with the
      // CUDA backend's numerics on any machine (training itself then needs the GPU).
      log << "backend          cuda (dry run on a machine without a usable GPU: planned with the CUDA "
             "backend's numerics)\n";
      plan_bare_config(log, cfg, tl::cuda_activation_dtype(backend_opts), tl::checkpoint_budget(cfg, 0));
      return 0;
    }
    // The backend comes next: it says which device (this rank's GPU) the plan is for.
    tl::Backend backend = tl::make_backend(kind, backend_opts);
    log << fmt::format("backend          {}\n", backend.description) << std::flush;
    // On GPUs the gradients are reduced by NCCL on the device; MPI carries its id and the
    // host values. Without NCCL (or on the CPU) MPI reduces host memory.
    tl::Comm* step_comm = comm.get();
    std::unique_ptr<tl::Comm> device_comm;
#if defined(TL_HAVE_NCCL)
    if (backend.kind == tl::BackendKind::Cuda && comm->world() > 1) {
      device_comm = tl::make_nccl_comm(*comm, cfg.ddp_timeout);
      step_comm = device_comm.get();
    }
#else
    if (backend.kind == tl::BackendKind::Cuda && comm->world() > 1)
      throw tl::AgreedError("data parallelism on GPUs needs NCCL, which this build did not find (nccl.h and "
                            "libnccl next to the CUDA toolkit)");
#endif
    // With upscale_from the base is made from it first (the demo): the Trainer plans that.
    if (dry_run && cfg.upscale_from.empty() && !has_weights(cfg.base_model)) {
      plan_bare_config(log, cfg, backend.ops->act_dtype(), tl::checkpoint_budget(cfg, backend.ops->memory_available()));
      return 0;
    }
    tl::Trainer trainer(cfg, *backend.ops, log, *step_comm);
    trainer.print_plan(log);
    if (dry_run) return 0;
    // Fault injection for the crash tests (tests/cli/train_runs.sh): SIGKILL this process in
    // the middle of saving checkpoint N, or in the middle of pruning after step N's save.
    // TORCHLESS_TEST_SIGINT=N: SIGINT to this process once step N is done (the signal test,
    // which must not race a run that finishes first).
    if (const char* f = std::getenv("TORCHLESS_TEST_SIGINT")) {
      const int64_t at = std::atoll(f);
      trainer.around_step = [at](int64_t step, bool after) { if (after && step == at) std::raise(SIGINT); };
    }
    if (const char* f = std::getenv("TORCHLESS_TEST_KILL")) {
      const std::string spec = f;
      const auto colon = spec.find(':');
      const int64_t at = colon == std::string::npos ? 0 : std::atoll(spec.c_str() + colon + 1);
      if (spec.starts_with("save:"))
        trainer.before_save = [at](int64_t step) { if (step == at) std::raise(SIGKILL); };
      if (spec.starts_with("prune:"))
        trainer.during_prune = [](const std::filesystem::path& aside) {
          std::filesystem::remove(aside / "optimizer.safetensors");  // half deleted
          std::raise(SIGKILL);
        };
    }
    tl::install_stop_signals();
    trainer.run();
    if (backend.peak_device_bytes)  // the plan's promise, checked: measured beside planned
      log << fmt::format("memory peak      {:.2f} GiB measured on GPU {} (pool high-water mark), {:.2f} GiB planned\n",
                         backend.peak_device_bytes() / double(1ull << 30), backend.device,
                         trainer.planned_peak_bytes() / double(1ull << 30));
    if (trainer.interrupted_by) {
      // Every rank agreed on the signal (train/trainer_checkpoint.cpp); rank 0 says so once, and
      // no rank exits before it has (mpirun ends the job when the first rank exits non-zero).
      if (comm->rank() == 0)
        std::cerr << fmt::format("torchless-train: interrupted by {} after step {}; checkpoint saved in {}\n",
                                 trainer.interrupted_by == SIGINT ? "SIGINT" : "SIGTERM", trainer.state().step,
                                 cfg.output_dir)
                  << std::flush;
      if (comm->world() > 1) comm->barrier("exit after a signal", cfg.ddp_io_timeout);
      return 128 + trainer.interrupted_by;
    }
  } catch (const tl::OutOfMemory& e) {
    std::cerr << "torchless-train: " << e.what() << "; lower sequence_len (or turn sample_packing off) or "
                 "micro_batch_size\n";
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "torchless-train: out of memory; lower sequence_len or micro_batch_size\n";
    return 1;
  } catch (const tl::AgreedError& e) {
    // Every rank raised it: rank 0 says it once and all exit 1 together.
    if (!comm || comm->rank() == 0) std::cerr << "torchless-train: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    // This rank alone may have seen it: the others would wait in the next collective, so
    // the whole job ends now.
    const bool many = comm && comm->world() > 1;
    std::cerr << "torchless-train: " << (many ? fmt::format("rank {}: ", comm->rank()) : "") << e.what() << "\n";
    if (many) comm->abort(1);
    return 1;
  }
  return 0;
}
