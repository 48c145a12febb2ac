// The single-process comm and the choice between it and MPI at start-up.
#include "train/dist/comm.h"

#include <cstdlib>
#include <cstring>

#include "train/dist/comm_mpi.h"

namespace tl {

namespace {

class SingleComm final : public Comm {
 public:
  int rank() const override { return 0; }
  int world() const override { return 1; }
  int local_rank() const override { return 0; }
  std::string name() const override { return "single process"; }
  // A sum over one rank is the value itself.
  void all_reduce_sum(float*, size_t, const char*) override {}
  void all_reduce_sum_host(double*, size_t, const char*) override {}
  void broadcast_host(void*, size_t, int, const char*) override {}
  std::vector<uint64_t> all_gather_host(uint64_t value, const char*) override { return {value}; }
  void barrier(const char*, double) override {}
  void start_bucket(GradBucket& b) override { b.in_flight = true; }
  void finish_bucket(GradBucket& b) override { b.in_flight = false; }
  [[noreturn]] void abort(int code) override { std::exit(code); }
};

// OpenMPI's mpirun sets OMPI_COMM_WORLD_SIZE; PMIx and PMI launchers (srun, hydra) set theirs.
bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"})
    if (std::getenv(v)) return true;
  return false;
}

}  // namespace

std::unique_ptr<Comm> make_single_comm() { return std::make_unique<SingleComm>(); }

bool have_mpi() {
#ifdef TL_HAVE_MPI
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Comm> make_comm(double timeout_s) {
  if (!launched_by_mpi()) return make_single_comm();
#ifdef TL_HAVE_MPI
  return make_mpi_comm(timeout_s);
#else
  (void)timeout_s;
  throw std::runtime_error("started by mpirun, but this build has no MPI (install libopenmpi-dev and rebuild)");
#endif
}

}  // namespace tl
