// NCCL collectives on device memory, non-blocking communicator (config.blocking = 0), every
// wait polled against a deadline: a dead or hung peer leaves an operation unfinished, and
// then ncclCommAbort frees this rank from it instead of blocking it forever.
#include "train/dist/comm_nccl.h"

#include <fmt/format.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace tl {

namespace {

using Clock = std::chrono::steady_clock;

class NcclComm final : public Comm {
 public:
  NcclComm(Comm& host, double timeout_s, cudaStream_t compute)
      : host_(host), timeout_s_(timeout_s), compute_(compute) {
    int devices = 0;
    cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
    if (devices == 0) throw std::runtime_error(fmt::format("rank {}: no CUDA device for NCCL", host.rank()));
    device_ = host.local_rank() % devices;
    cuda(cudaSetDevice(device_), "cudaSetDevice");
    ncclUniqueId id{};
    if (host.rank() == 0) nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    host.broadcast_host(&id, sizeof id, 0, "NCCL unique id broadcast");
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t rc = ncclCommInitRankConfig(&comm_, host.world(), id, host.rank(), &config);
    if (rc != ncclSuccess && rc != ncclInProgress) nccl(rc, "ncclCommInitRankConfig");
    wait_comm("NCCL communicator set-up");
    cuda(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~NcclComm() override {
    for (auto& s : states_) {
      cudaFree(s->flat);
      cudaEventDestroy(s->ready);
      cudaEventDestroy(s->done);
    }
    if (comm_stream_) cudaStreamDestroy(comm_stream_);
    if (comm_) ncclCommDestroy(comm_);
  }

  int rank() const override { return host_.rank(); }
  int world() const override { return host_.world(); }
  int local_rank() const override { return host_.local_rank(); }
  std::string name() const override { return fmt::format("NCCL, {} ranks, GPU {}", host_.world(), device_); }

  void all_reduce_sum(float* data, size_t n, const char* what) override {
    enqueue(ncclAllReduce(data, data, n, ncclFloat, ncclSum, comm_, compute_), what);
    wait_stream(compute_, what);
  }
  void all_reduce_sum_host(double* data, size_t n, const char* what) override {
    host_.all_reduce_sum_host(data, n, what);
  }
  void broadcast_host(void* data, size_t bytes, int root, const char* what) override {
    host_.broadcast_host(data, bytes, root, what);
  }
  std::vector<uint64_t> all_gather_host(uint64_t value, const char* what) override {
    return host_.all_gather_host(value, what);
  }
  void barrier(const char* what, double timeout_s) override { host_.barrier(what, timeout_s); }

  // Bucket: compute stream → event → communication stream: pack the parts into the flat
  // buffer, all-reduce it, unpack; the backward goes on queueing work meanwhile.
  struct State {
    float* flat = nullptr;
    cudaEvent_t ready = nullptr, done = nullptr;
  };
  void start_bucket(GradBucket& b) override {
    if (!b.state) {
      auto s = std::make_shared<State>();
      cuda(cudaMalloc(&s->flat, b.elems * sizeof(float)), "cudaMalloc (gradient bucket)");
      cuda(cudaEventCreateWithFlags(&s->ready, cudaEventDisableTiming), "cudaEventCreate");
      cuda(cudaEventCreateWithFlags(&s->done, cudaEventDisableTiming), "cudaEventCreate");
      states_.push_back(s);
      b.state = s;
    }
    auto& s = *static_cast<State*>(b.state.get());
    cuda(cudaEventRecord(s.ready, compute_), "cudaEventRecord");  // this bucket's gradients are final
    cuda(cudaStreamWaitEvent(comm_stream_, s.ready, 0), "cudaStreamWaitEvent");
    size_t off = 0;
    for (const auto& p : b.parts) {
      cuda(cudaMemcpyAsync(s.flat + off, p.data, p.n * sizeof(float), cudaMemcpyDeviceToDevice, comm_stream_),
           "cudaMemcpyAsync (pack)");
      off += p.n;
    }
    enqueue(ncclAllReduce(s.flat, s.flat, b.elems, ncclFloat, ncclSum, comm_, comm_stream_), "gradient all-reduce");
    off = 0;
    for (const auto& p : b.parts) {
      cuda(cudaMemcpyAsync(p.data, s.flat + off, p.n * sizeof(float), cudaMemcpyDeviceToDevice, comm_stream_),
           "cudaMemcpyAsync (unpack)");
      off += p.n;
    }
    cuda(cudaEventRecord(s.done, comm_stream_), "cudaEventRecord");
    b.in_flight = true;
  }
  void finish_bucket(GradBucket& b) override {
    auto& s = *static_cast<State*>(b.state.get());
    wait_event(s.done, "gradient all-reduce");
    cuda(cudaStreamWaitEvent(compute_, s.done, 0), "cudaStreamWaitEvent");
    b.in_flight = false;
  }

  [[noreturn]] void abort(int code) override {
    if (comm_) ncclCommAbort(comm_), comm_ = nullptr;
    host_.abort(code);
    std::_Exit(code);  // not reached (host_.abort ends the process); GCC cannot see that through the vtable
  }

 private:
  [[noreturn]] void fail(const std::string& msg) {
    std::fprintf(stderr, "torchless-train: rank %d: %s; ending the job\n", rank(), msg.c_str());
    abort(1);
  }
  void cuda(cudaError_t rc, const char* what) {
    if (rc != cudaSuccess) fail(fmt::format("{}: {}", what, cudaGetErrorString(rc)));
  }
  void nccl(ncclResult_t rc, const char* what) {
    if (rc != ncclSuccess) fail(fmt::format("{}: {}", what, ncclGetErrorString(rc)));
  }
  // Non-blocking communicators may answer ncclInProgress while the call is queued.
  void enqueue(ncclResult_t rc, const char* what) {
    if (rc != ncclSuccess && rc != ncclInProgress) nccl(rc, what);
  }

  // Polls `done` and the communicator's asynchronous error until done() or the deadline.
  template <class Done>
  void poll(const char* what, Done&& done) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s_);
    for (int polls = 0;; ++polls) {
      if (done()) return;
      ncclResult_t st = ncclSuccess;
      ncclCommGetAsyncError(comm_, &st);
      if (st != ncclSuccess && st != ncclInProgress) fail(fmt::format("{}: NCCL {}", what, ncclGetErrorString(st)));
      if (Clock::now() > deadline)
        fail(fmt::format("{} did not complete within {} s: another rank died or hangs (ddp_timeout)", what,
                         timeout_s_));
      if (polls < 100)
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(polls < 1000 ? 50 : 1000));
    }
  }
  void wait_comm(const char* what) {
    poll(what, [&] {
      ncclResult_t st = ncclInProgress;
      ncclCommGetAsyncError(comm_, &st);
      return st == ncclSuccess;
    });
  }
  void wait_query(cudaError_t rc, const char* what, bool& done) {
    if (rc == cudaErrorNotReady) return;
    cuda(rc, what);
    done = true;
  }
  void wait_stream(cudaStream_t s, const char* what) {
    poll(what, [&] {
      bool done = false;
      wait_query(cudaStreamQuery(s), what, done);
      return done;
    });
  }
  void wait_event(cudaEvent_t e, const char* what) {
    poll(what, [&] {
      bool done = false;
      wait_query(cudaEventQuery(e), what, done);
      return done;
    });
  }

  Comm& host_;
  double timeout_s_;
  cudaStream_t compute_, comm_stream_ = nullptr;
  ncclComm_t comm_ = nullptr;
  int device_ = 0;
  std::vector<std::shared_ptr<State>> states_;
};

}  // namespace

std::unique_ptr<Comm> make_nccl_comm(Comm& host, double timeout_s, cudaStream_t compute) {
  return std::make_unique<NcclComm>(host, timeout_s, compute);
}

}  // namespace tl
