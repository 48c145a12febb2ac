#include "tools/backend.h"

#include "core/cpu/thread_policy.h"

#include <fmt/format.h>

#include <cstdlib>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/gemm_bf16.h"

#if defined(TL_HAVE_CUDA)
#include <cuda_runtime.h>

#include "cuda/cuda_ops.h"
#endif

namespace tl {

BackendKind parse_backend(const std::string& name, const std::string& where) {
  if (name == "auto") return BackendKind::Auto;
  if (name == "cpu") return BackendKind::Cpu;
  if (name == "cuda") return BackendKind::Cuda;
  throw Error(fmt::format("{}: '{}' is not a backend (auto, cpu, cuda)", where, name));
}

int local_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                          "SLURM_LOCALID", "LOCAL_RANK"}) {
    const char* v = std::getenv(var);
    if (!v) continue;
    char* end = nullptr;
    const long r = std::strtol(v, &end, 10);
    if (*v == '\0' || *end != '\0' || r < 0 || r > 1 << 20)
      throw Error(fmt::format("environment: {}='{}' is not a local rank (a non-negative integer)", var, v));
    return int(r);
  }
  return 0;
}

bool cuda_built() {
#if defined(TL_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

bool cuda_available() {
#if defined(TL_HAVE_CUDA)
  return CudaOps::available();
#else
  return false;
#endif
}

namespace {
Backend make_cpu(const BackendOptions& o, const std::string& why) {
  // bf16 multiplies as a GPU under autocast only where the CPU has bf16 instructions;
  // emulated bf16 would be slower than fp32.
  const bool bf16 = o.bf16 && o.act == DType::F32 && cpu::native_bf16();
  Backend b;
  b.ops = std::make_unique<CpuOps>(o.act, bf16 ? CpuMatmul::Bf16 : CpuMatmul::F32);
  b.kind = BackendKind::Cpu;
  b.description = fmt::format("cpu{}, {} ({}; {})", why,
                              bf16 ? "bf16 inputs, fp32 accumulation (oneDNN)"
                              : o.bf16 && o.act == DType::F32 ? "fp32: this CPU has no bf16 instructions"
                                                               : o.act == DType::F64 ? "fp64" : "fp32",
                              cpu::cpu_isa_name(), describe_threads());
  return b;
}

#if defined(TL_HAVE_CUDA)
Backend make_cuda(const BackendOptions& o, const std::string& why) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    throw Error("backend: cuda was asked for but no CUDA device is usable (driver or GPU missing)");
  const int rank = local_rank();
  if (rank >= count)
    throw Error(fmt::format("backend: cuda: local rank {} has no GPU of its own ({} visible)", rank, count));
  if (cudaSetDevice(rank) != cudaSuccess) throw Error(fmt::format("backend: cuda: cannot select GPU {}", rank));
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, rank);
  // `bf16: true` (the trainer's default) on a GPU: bf16 activations, fp32 compute, fp32 LoRA
  // masters (issue 10). Exact checks (torchless-forward, bf16 off) keep fp32 or fp64.
  const bool bf16 = cuda_activation_dtype(o) == DType::BF16;
  Backend b;
  if (bf16) b.ops = std::make_unique<CudaOps>(DType::BF16, CudaMatmul::Bf16);
  else b.ops = std::make_unique<CudaOps>(o.act);
  b.kind = BackendKind::Cuda;
  b.device = rank;
  CudaOps::reset_peak_memory();
  b.peak_device_bytes = [] { return double(CudaOps::memory().used_peak); };
  b.description = fmt::format("cuda{}, GPU {} of {} ({}, {:.0f} GiB), {}", why, rank, count, prop.name,
                              double(prop.totalGlobalMem) / double(1ull << 30),
                              bf16 ? "bf16 activations, fp32 accumulation, softmax, norms and loss, fp32 LoRA masters "
                                     "(cuBLASLt)"
                              : o.act == DType::F64 ? "fp64"
                                                    : "fp32");
  return b;
}
#endif
}  // namespace

DType cuda_activation_dtype(const BackendOptions& o) { return o.bf16 && o.act == DType::F32 ? DType::BF16 : o.act; }

Backend make_backend(BackendKind kind, const BackendOptions& opts) {
  if (kind == BackendKind::Cpu) return make_cpu(opts, "");
#if defined(TL_HAVE_CUDA)
  if (kind == BackendKind::Cuda) return make_cuda(opts, "");
  if (cuda_available()) return make_cuda(opts, " (auto: a GPU is present)");
  return make_cpu(opts, " (auto: no usable CUDA device)");
#else
  if (kind == BackendKind::Cuda)
    throw Error("backend: cuda was asked for but this build has no CUDA backend (nvcc was not found at build time)");
  return make_cpu(opts, " (auto: built without the CUDA backend)");
#endif
}

}  // namespace tl
