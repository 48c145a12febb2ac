// The MPI comm (OpenMPI): CPU tensors. Built when CMake finds MPI (TL_HAVE_MPI).
#pragma once
#include "train/dist/comm.h"

namespace tl {

// Initialises MPI (once per process; finalised when the comm is destroyed) and reads rank,
// world size and local rank from it. Every collective is non-blocking underneath and waited
// for at most timeout_s seconds; then this rank reports the collective and ends the job.
std::unique_ptr<Comm> make_mpi_comm(double timeout_s);

}  // namespace tl
