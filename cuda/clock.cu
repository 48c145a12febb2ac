// CudaOps' clock, synchronisation and free memory (Ops::make_clock, Ops::synchronize,
// Ops::memory_available). The clock is CUDA events recorded on the stream the ops run on (the
// legacy default stream), so timing an op does not make the GPU wait; the times are read
// once, after the measured work.
#include <vector>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

class EventClock final : public OpClock {
 public:
  ~EventClock() override {
    for (cudaEvent_t e : events_) (void)cudaEventDestroy(e);  // never throws from a destructor
  }
  size_t mark() override {
    if (used_ == events_.size()) {
      cudaEvent_t e;
      TL_CUDA_CHECK(cudaEventCreate(&e));  // with timing (no cudaEventDisableTiming)
      events_.push_back(e);
    }
    TL_CUDA_CHECK(cudaEventRecord(events_[used_], 0));
    return used_++;
  }
  double seconds(size_t a, size_t b) override {
    require(a < used_ && b < used_, "OpClock: no such mark");
    TL_CUDA_CHECK(cudaEventSynchronize(events_[b]));
    float ms = 0;
    TL_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[a], events_[b]));
    return double(ms) / 1e3;
  }
  void clear() override { used_ = 0; }  // the events are recorded again from the first

 private:
  static void require(bool ok, const char* what) { cuda::require(ok, what); }
  std::vector<cudaEvent_t> events_;
  size_t used_ = 0;
};

}  // namespace

std::unique_ptr<OpClock> CudaOps::make_clock() { return std::make_unique<EventClock>(); }

// What this process can still allocate: the driver's free memory plus what our pool has
// reserved but holds no allocation in (the pool keeps freed memory, so the driver counts it
// as used).
double CudaOps::memory_available() {
  const CudaMemory m = memory();
  const double driver_free = double(m.device_total - m.device_used);
  return driver_free + double(m.reserved - m.used);
}

void CudaOps::synchronize() {
  const cudaError_t e = cudaDeviceSynchronize();
  const cudaError_t last = e == cudaSuccess ? cudaGetLastError() : e;
  if (last != cudaSuccess)
    throw Error(std::string("CUDA: ") + cudaGetErrorName(last) + ": " + cudaGetErrorString(last));
}

}  // namespace tl
