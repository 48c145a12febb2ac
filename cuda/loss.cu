// Cross-entropy summed over the labelled rows: Σ_n −log softmax(logits[n])[label[n]].
#include <cmath>
#include <string>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

// One block per row, in double as the reference does:
//   loss[n] = mx + log Σ_j exp(l_j − mx) − l_y,  mx = max_j l_j
// Rows labelled −100 get 0. The host adds the rows up in order (deterministic, no atomics).
template <class T>
__global__ void cross_entropy_kernel(const T* logits, const int32_t* labels, double* loss, int64_t v) {
  const int64_t n = blockIdx.x;
  const int32_t y = labels[n];
  if (y == -100) {  // block-uniform, so no thread is left waiting at a barrier
    if (threadIdx.x == 0) loss[n] = 0;
    return;
  }
  const T* l = logits + n * v;
  double mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) mx = max(mx, double(l[j]));
  mx = cuda::block_reduce(mx, cuda::Max{});
  double z = 0;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) z += exp(double(l[j]) - mx);
  z = cuda::block_reduce(z, cuda::Sum{});
  if (threadIdx.x == 0) loss[n] = mx + log(z) - double(l[y]);
}

}  // namespace

double CudaOps::cross_entropy_sum(const Tensor& logits, const Tensor& labels, int64_t& count) {
  const int64_t n = labels.numel(), v = logits.dim(-1);
  cuda::require(logits.numel() == n * v && labels.dtype() == DType::I32, "cross_entropy shapes");
  cuda::require_device(logits, "cross_entropy logits");
  cuda::require(n <= INT32_MAX, "cross_entropy: too many rows");
  // Labels are checked (and counted) on the host: an out-of-range label would read out
  // of bounds on the device.
  count = 0;
  for (int32_t y : cuda::host_ints(labels, "cross_entropy labels must be I32")) {
    if (y == -100) continue;
    if (y < 0 || y >= v) throw std::out_of_range("label " + std::to_string(y) + " outside vocab");
    ++count;
  }
  if (count == 0) return 0.0;
  cuda::DeviceInts dl = cuda::device_ints(labels, "cross_entropy labels must be I32");
  std::shared_ptr<void> rows = cuda::device_alloc(size_t(n) * sizeof(double));
  cuda::dispatch(logits.dtype(), [&]<class T>() {
    cross_entropy_kernel<T><<<unsigned(n), cuda::kThreads>>>(logits.data<T>(), dl.ptr,
                                                             static_cast<double*>(rows.get()), v);
    TL_CUDA_LAUNCHED("cross_entropy_kernel");
  });
  std::vector<double> host(static_cast<size_t>(n));
  TL_CUDA_CHECK(cudaMemcpy(host.data(), rows.get(), size_t(n) * sizeof(double), cudaMemcpyDeviceToHost));
  double total = 0;
  for (double x : host) total += x;
  return total;
}

}  // namespace tl
