// The one factory every tool uses to pick the backend the model runs on: `backend:` in
// heal.yaml, `--backend` on the command line (auto | cpu | cuda). `auto` takes the GPU when
// this build has the CUDA backend and a device is present, else the CPU; `cuda` without a
// usable GPU is an error. Each process takes the GPU of its local rank (set by mpirun /
// torchrun / Slurm), so one process per GPU is ready for DDP.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "core/ops.h"

namespace tl {

enum class BackendKind { Auto, Cpu, Cuda };

// "auto", "cpu" or "cuda"; anything else throws tl::Error naming `where` (the key or flag).
BackendKind parse_backend(const std::string& name, const std::string& where);

// This process's rank among those on its node: the first of OMPI_COMM_WORLD_LOCAL_RANK
// (Open MPI), MV2_COMM_WORLD_LOCAL_RANK (MVAPICH2), MPI_LOCALRANKID (MPICH / Intel MPI),
// SLURM_LOCALID (srun), LOCAL_RANK (torchrun) that is set; 0 when none is. A value that is
// not a non-negative integer throws tl::Error naming the variable.
int local_rank();

// Whether the CUDA backend is compiled in (TL_HAVE_CUDA) and sees at least one device.
bool cuda_built();
bool cuda_available();

struct BackendOptions {
  DType act = DType::F32;
  bool bf16 = false;  // products in bf16 with fp32 sums where the backend can (heal.yaml `bf16`)
};

struct Backend {
  std::unique_ptr<Ops> ops;
  BackendKind kind = BackendKind::Cpu;  // what was chosen (never Auto)
  int device = -1;                      // the CUDA device taken (local rank), -1 on the CPU
  std::string description;              // one line: what was chosen and why, and its numerics
  // The device memory pool's high-water mark in bytes since the backend was made (CUDA);
  // empty on the CPU, whose memory is the process's RSS.
  std::function<double()> peak_device_bytes;
};

// The activation dtype the CUDA backend runs with under `opts` (BF16 when bf16 is on and F32
// was asked for), whether or not this machine has a GPU: what a dry run plans a GPU for.
DType cuda_activation_dtype(const BackendOptions& opts);

// Makes the backend `kind` asks for; with Cuda, sets the current device to local_rank()
// first. Throws tl::Error (one line) when `cuda` is asked for and cannot be had.
Backend make_backend(BackendKind kind, const BackendOptions& opts = {});

}  // namespace tl
