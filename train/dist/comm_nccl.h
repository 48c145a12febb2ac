// The NCCL comm: GPU tensors. Built when CUDA and NCCL are found (TL_HAVE_NCCL).
#pragma once
#include <cuda_runtime.h>

#include "train/dist/comm.h"

namespace tl {

// One communicator over the ranks of `host` (MPI, or single-process for one rank), which
// broadcasts NCCL's unique id and carries the host-value collectives. Uses GPU
// host.local_rank() (modulo the devices this node has). `compute` is the stream the model
// runs on (CudaOps: the legacy default stream); buckets are reduced on a stream of their own.
// A collective that has not finished within timeout_s (ncclCommGetAsyncError polled
// meanwhile) aborts the communicator (ncclCommAbort) and ends the job naming this rank.
std::unique_ptr<Comm> make_nccl_comm(Comm& host, double timeout_s, cudaStream_t compute = nullptr);

}  // namespace tl
