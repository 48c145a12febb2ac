// Collectives between the ranks of a data-parallel job (`mpirun -np N torchless-train`).
// Three implementations behind one interface:
//   single process  no MPI at run time (the binary started without mpirun)
//   MPI             CPU tensors (train/dist/comm_mpi.cpp, OpenMPI)
//   NCCL            GPU tensors, its unique id broadcast over MPI (train/dist/comm_nccl.cpp)
// Every rank must call every collective in the same order: none may sit inside
// `if (rank == 0)`. Each blocking call is bounded by a timeout; a collective that does not
// complete in time (a rank died or hangs) ends the whole job with a message naming the rank.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace tl {

// Raised identically by every rank (e.g. by the start-up agreement check): rank 0 reports
// it and all ranks exit 1 together, instead of aborting the job.
struct AgreedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A gradient bucket: several tensors' memory (on the comm's device) reduced as one flat
// buffer. The comm owns the flat buffer (`state`), allocated on first use and reused.
struct GradBucket {
  struct Part {
    float* data;
    size_t n;
  };
  std::vector<Part> parts;
  size_t elems = 0;
  std::shared_ptr<void> state;  // implementation's flat buffer, request, events
  bool in_flight = false;
};

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual int local_rank() const = 0;  // rank among the processes of this node: the GPU to use
  virtual std::string name() const = 0;

  // In-place sums over ranks of memory the comm works on (MPI: host; NCCL: GPU).
  virtual void all_reduce_sum(float* data, size_t n, const char* what) = 0;
  // Host values, whatever the comm's device: small counts and losses.
  virtual void all_reduce_sum_host(double* data, size_t n, const char* what) = 0;
  virtual void broadcast_host(void* data, size_t bytes, int root, const char* what) = 0;
  // Every rank receives every rank's value, in rank order.
  virtual std::vector<uint64_t> all_gather_host(uint64_t value, const char* what) = 0;
  // timeout_s ≤ 0: the comm's timeout. Longer waits are for rank 0's writes (checkpoints).
  virtual void barrier(const char* what, double timeout_s = 0) = 0;

  // Bucketed gradient reduction: start packs the parts into the flat buffer and starts its
  // all-reduce (NCCL: on the communication stream, after the work queued so far on the
  // compute stream); finish waits for it and unpacks the sums into the parts.
  virtual void start_bucket(GradBucket& b) = 0;
  virtual void finish_bucket(GradBucket& b) = 0;

  // Seconds this rank has spent inside collectives (waiting, packing): the share of a step
  // that communication (and waiting for slower ranks) costs.
  virtual double seconds_in_collectives() const { return 0; }

  // Ends every rank of the job now (MPI_Abort); for errors only this rank saw.
  [[noreturn]] virtual void abort(int code) = 0;
};

// The single-process comm: a world of one where every collective is the identity.
std::unique_ptr<Comm> make_single_comm();
// MPI when this process was started by mpirun (OMPI_COMM_WORLD_SIZE / PMI* in the
// environment), else single-process. timeout_s bounds every collective.
std::unique_ptr<Comm> make_comm(double timeout_s);
// Whether this build has the MPI comm.
bool have_mpi();

}  // namespace tl
