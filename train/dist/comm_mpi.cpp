// MPI collectives with a bound on every wait. Each call is the non-blocking form
// (MPI_Iallreduce, MPI_Ibcast, ...) polled with MPI_Test until it completes or the timeout
// passes: a rank that died or hangs then brings the job down (MPI_Abort) with a line naming
// this rank and the collective, instead of every other rank blocking forever. (mpirun itself
// ends the job when a rank exits abnormally, naming that rank.)
#include <mpi.h>

#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "train/dist/comm_mpi.h"

namespace tl {

namespace {

using Clock = std::chrono::steady_clock;

class MpiComm final : public Comm {
 public:
  explicit MpiComm(double timeout_s) : timeout_s_(timeout_s) {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
      int provided = 0;
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
      owns_mpi_ = true;
    }
    MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
    // Errors come back as codes, so this rank can say which collective failed.
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &world_);
    MPI_Comm node;  // the ranks sharing this node's memory: local rank = GPU index
    MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &local_rank_);
    MPI_Comm_free(&node);
  }
  ~MpiComm() override {
    MPI_Comm_free(&comm_);
    if (owns_mpi_) MPI_Finalize();
  }

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  int local_rank() const override { return local_rank_; }
  std::string name() const override { return fmt::format("MPI, {} ranks", world_); }

  void all_reduce_sum(float* data, size_t n, const char* what) override {
    for (size_t off = 0; off < n; off += kMaxCount) {
      MPI_Request req;
      check(MPI_Iallreduce(MPI_IN_PLACE, data + off, count(n - off), MPI_FLOAT, MPI_SUM, comm_, &req), what);
      wait(req, what, timeout_s_);
    }
  }
  void all_reduce_sum_host(double* data, size_t n, const char* what) override {
    MPI_Request req;
    check(MPI_Iallreduce(MPI_IN_PLACE, data, int(n), MPI_DOUBLE, MPI_SUM, comm_, &req), what);
    wait(req, what, timeout_s_);
  }
  void broadcast_host(void* data, size_t bytes, int root, const char* what) override {
    for (size_t off = 0; off < bytes; off += kMaxCount) {
      MPI_Request req;
      check(MPI_Ibcast(static_cast<char*>(data) + off, count(bytes - off), MPI_BYTE, root, comm_, &req), what);
      wait(req, what, timeout_s_);
    }
  }
  std::vector<uint64_t> all_gather_host(uint64_t value, const char* what) override {
    std::vector<uint64_t> out(static_cast<size_t>(world_));
    MPI_Request req;
    check(MPI_Iallgather(&value, 1, MPI_UINT64_T, out.data(), 1, MPI_UINT64_T, comm_, &req), what);
    wait(req, what, timeout_s_);
    return out;
  }
  void barrier(const char* what, double timeout_s) override {
    MPI_Request req;
    check(MPI_Ibarrier(comm_, &req), what);
    wait(req, what, timeout_s > 0 ? timeout_s : timeout_s_);
  }

  // The flat buffer is host memory; the reduction proceeds while the backward continues
  // (as far as MPI progresses it without a progress thread) and is waited for in finish.
  struct State {
    std::vector<float> flat;
    MPI_Request req = MPI_REQUEST_NULL;
  };
  void start_bucket(GradBucket& b) override {
    if (!b.state) b.state = std::make_shared<State>();
    auto& s = *static_cast<State*>(b.state.get());
    s.flat.resize(b.elems);
    size_t off = 0;
    for (const auto& p : b.parts) std::memcpy(s.flat.data() + off, p.data, p.n * sizeof(float)), off += p.n;
    check(MPI_Iallreduce(MPI_IN_PLACE, s.flat.data(), count(b.elems), MPI_FLOAT, MPI_SUM, comm_, &s.req),
          "gradient all-reduce");
    b.in_flight = true;
  }
  void finish_bucket(GradBucket& b) override {
    auto& s = *static_cast<State*>(b.state.get());
    wait(s.req, "gradient all-reduce", timeout_s_);
    size_t off = 0;
    for (const auto& p : b.parts) std::memcpy(p.data, s.flat.data() + off, p.n * sizeof(float)), off += p.n;
    b.in_flight = false;
  }

  [[noreturn]] void abort(int code) override {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

 private:
  static constexpr size_t kMaxCount = size_t(1) << 30;  // MPI counts are int
  static int count(size_t n) { return int(std::min(n, kMaxCount)); }

  void check(int rc, const char* what) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    std::fprintf(stderr, "torchless-train: rank %d: %s failed: %.*s; ending the job\n", rank_, what, len, msg);
    abort(1);
  }

  // Polls with a growing pause (up to 1 ms) so a waiting rank leaves the cores to the
  // others: ranks are often oversubscribed (CI) and the backward of a slower rank needs them.
  void wait(MPI_Request& req, const char* what, double timeout_s) {
    const auto t0 = Clock::now();
    const auto deadline = t0 + std::chrono::duration<double>(timeout_s);
    struct Timer {  // counts the wait however it ends
      MpiComm& c;
      Clock::time_point t0;
      ~Timer() { c.seconds_ += std::chrono::duration<double>(Clock::now() - t0).count(); }
    } timer{*this, t0};
    ++seq_;
    int done = 0;
    for (int polls = 0;; ++polls) {
      check(MPI_Test(&req, &done, MPI_STATUS_IGNORE), what);
      if (done) return;
      if (Clock::now() > deadline) {
        std::fprintf(stderr,
                     "torchless-train: rank %d: %s (collective #%lld) did not complete within %g s: another rank "
                     "died or hangs; ending the job (ddp_timeout)\n",
                     rank_, what, (long long)seq_, timeout_s);
        abort(1);
      }
      if (polls < 100)
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(polls < 1000 ? 50 : 1000));
    }
  }

  double timeout_s_;
  bool owns_mpi_ = false;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, world_ = 1, local_rank_ = 0;
  int64_t seq_ = 0;
  double seconds_ = 0;

 public:
  double seconds_in_collectives() const override { return seconds_; }
};

}  // namespace

std::unique_ptr<Comm> make_mpi_comm(double timeout_s) { return std::make_unique<MpiComm>(timeout_s); }

}  // namespace tl
