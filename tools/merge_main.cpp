// torchless-merge: merge a PEFT LoRA adapter (from torchless or PEFT) into its base.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <malloc.h>
#include <sys/resource.h>

#include <iostream>

#include "train/surgery/merge.h"
#include "core/cpu/thread_policy.h"

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);  // before any OpenMP region: see core/cpu/thread_policy.h
  CLI::App app{"torchless-merge: base checkpoint + PEFT LoRA adapter → merged safetensors checkpoint"};
  std::string base, adapter, out, dtype = "base";
  bool force = false;
  app.add_option("--base", base, "base checkpoint directory")->required();
  app.add_option("--adapter", adapter, "adapter directory (adapter_config.json + adapter_model.safetensors)")->required();
  app.add_option("--out", out, "output directory (must not exist unless --force)")->required();
  app.add_option("--dtype", dtype, "bf16, f16, f32, or base (keep each tensor's dtype)")
      ->check(CLI::IsMember({"bf16", "f16", "f32", "base"}));
  app.add_flag("--force", force, "replace an existing output directory");
  CLI11_PARSE(app, argc, argv);
  // Large buffers (a shard's tensors, its serialised bytes) always come from mmap and go back
  // to the system when freed; glibc's adaptive threshold would otherwise keep them on the heap
  // and resident memory would grow shard after shard.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  try {
    tl::MergeOptions o;
    o.force = force;
    if (dtype == "bf16") o.out_dtype = tl::DType::BF16;
    else if (dtype == "f16") o.out_dtype = tl::DType::F16;
    else if (dtype == "f32") o.out_dtype = tl::DType::F32;
    auto r = tl::merge_adapter(base, adapter, out, o);
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    std::cout << fmt::format("merged {} modules into {} tensors in {} shard(s): {} (peak RSS {:.1f} MiB)\n",
                             r.merged_modules, r.tensors, r.shards, out, double(ru.ru_maxrss) / 1024.0);
  } catch (const std::exception& e) {
    std::cerr << "torchless-merge: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
