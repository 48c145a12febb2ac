// Cross-entropy over the labelled rows (label −100 = ignored): the loss sum, and the fused
// soft-capped gradient whose loss sum and argmax hits stay on the device (added into the
// step's F64 accumulator, read by the trainer once per optimizer step).
#include <cmath>
#include <string>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

using cuda::widen;

// Row statistics in double, as the reference (whatever the storage type): mx = max_j l_j,
// z = Σ_j exp(l_j − mx). Every thread of the block gets both.
template <class T>
__device__ void row_softmax_stats(const T* l, int64_t v, double& mx, double& z) {
  mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) mx = max(mx, double(widen(l[j])));
  mx = cuda::block_reduce(mx, cuda::Max{});
  z = 0;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) z += exp(double(widen(l[j])) - mx);
  z = cuda::block_reduce(z, cuda::Sum{});
}

struct MinIndex {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};

// One block per row: loss[n] = mx + log z − l_y and hit[n] = [argmax = y] (the first
// maximum, as torch.argmax), both 0 for ignored rows. When dlogits is given it is
// set (not added) to
//   (softmax(l) − onehot(y))·grad_scale·c,  c = 1 − (l/cap)² if cap > 0 else 1
// (the cap factor is d/dx of cap·tanh(x/cap) expressed through the capped logit l),
// and to 0 on ignored rows; computed in double and rounded to T once.
template <class T>
__global__ void cross_entropy_kernel(const T* logits, const int32_t* labels, double* loss, double* hit, T* dlogits,
                                     double grad_scale, double cap, int64_t v) {
  const int64_t n = blockIdx.x;
  const int32_t y = labels[n];
  const T* l = logits + n * v;
  T* g = dlogits ? dlogits + n * v : nullptr;
  if (y == -100) {  // block-uniform, so no thread is left waiting at a barrier
    if (threadIdx.x == 0) {
      loss[n] = 0;
      if (hit) hit[n] = 0;
    }
    if (g)
      for (int64_t j = threadIdx.x; j < v; j += blockDim.x) g[j] = cuda::narrow<T>(0.0);
    return;
  }
  double mx, z;
  row_softmax_stats(l, v, mx, z);
  if (hit) {
    int64_t first = v;
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x)
      if (double(widen(l[j])) == mx && j < first) first = j;
    first = cuda::block_reduce(first, MinIndex{});
    if (threadIdx.x == 0) hit[n] = first == y ? 1.0 : 0.0;
  }
  if (threadIdx.x == 0) loss[n] = mx + log(z) - double(widen(l[y]));
  if (!g) return;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const double lj = double(widen(l[j]));
    const double p = exp(lj - mx) / z - (j == y ? 1.0 : 0.0);
    const double c = cap > 0 ? 1.0 - (lj / cap) * (lj / cap) : 1.0;
    g[j] = cuda::narrow<T>(p * grad_scale * c);
  }
}

// Checks the labels on the host (an out-of-range label would read out of bounds on the
// device) and counts the labelled rows.
int64_t count_labels(const Tensor& labels, int64_t v) {
  int64_t count = 0;
  for (int32_t y : cuda::host_ints(labels, "cross_entropy labels must be I32")) {
    if (y == -100) continue;
    if (y < 0 || y >= v) throw std::out_of_range("label " + std::to_string(y) + " outside vocab");
    ++count;
  }
  return count;
}

// Runs the kernel over all rows and returns Σ loss rows.
double run(const Tensor& logits, const Tensor& labels, Tensor* dlogits, double grad_scale, double cap) {
  const int64_t n = labels.numel(), v = logits.dim(-1);
  cuda::DeviceInts dl = cuda::device_ints(labels, "cross_entropy labels must be I32");
  std::shared_ptr<void> rows = cuda::device_alloc(size_t(n) * sizeof(double));
  cuda::dispatch(logits.dtype(), [&]<class T>() {
    cross_entropy_kernel<T><<<unsigned(n), cuda::kThreads>>>(logits.data<T>(), dl.ptr,
                                                             static_cast<double*>(rows.get()), nullptr,
                                                             dlogits ? dlogits->data<T>() : nullptr, grad_scale,
                                                             cap, v);
    TL_CUDA_LAUNCHED("cross_entropy_kernel");
  });
  std::vector<double> host(static_cast<size_t>(n));
  TL_CUDA_CHECK(cudaMemcpy(host.data(), rows.get(), size_t(n) * sizeof(double), cudaMemcpyDeviceToHost));
  double total = 0;
  for (double x : host) total += x;
  return total;
}

void check_shapes(const Tensor& logits, const Tensor& labels) {
  cuda::require(logits.rank() >= 1 && logits.numel() == labels.numel() * logits.dim(-1) &&
                    labels.dtype() == DType::I32,
                "cross_entropy shapes");
  cuda::require_device(logits, "cross_entropy logits");
  cuda::require(labels.numel() <= INT32_MAX, "cross_entropy: too many rows");
}

}  // namespace

double CudaOps::cross_entropy_sum(const Tensor& logits, const Tensor& labels, int64_t& count) {
  check_shapes(logits, labels);
  count = count_labels(labels, logits.dim(-1));
  if (count == 0) return 0.0;
  return run(logits, labels, nullptr, 0.0, 0.0);
}

void CudaOps::cross_entropy_backward(const Tensor& logits, const Tensor& labels, double grad_scale, double cap,
                                     Tensor& dlogits, Tensor& sums) {
  check_shapes(logits, labels);
  cuda::require(dlogits.numel() == logits.numel() && dlogits.dtype() == logits.dtype(),
                "cross_entropy_backward dlogits");
  cuda::require_device(dlogits, "cross_entropy_backward dlogits");
  cuda::require(sums.dtype() == DType::F64 && sums.numel() >= 2, "cross_entropy_backward sums must be F64 [2]");
  cuda::require_device(sums, "cross_entropy_backward sums");
  // Labels on the device were checked by the caller before their upload (reading them back
  // here would wait for the stream); host labels are checked here.
  if (labels.device() == Device::CPU) count_labels(labels, logits.dim(-1));
  const int64_t n = labels.numel(), v = logits.dim(-1);
  if (n == 0) return;
  cuda::DeviceInts dl = cuda::device_ints(labels, "cross_entropy labels must be I32");
  std::shared_ptr<void> rows = cuda::device_alloc(size_t(2 * n) * sizeof(double));
  double* loss = static_cast<double*>(rows.get());
  cuda::dispatch(logits.dtype(), [&]<class T>() {
    cross_entropy_kernel<T><<<unsigned(n), cuda::kThreads>>>(logits.data<T>(), dl.ptr, loss, loss + n,
                                                             dlogits.data<T>(), grad_scale, cap, v);
    TL_CUDA_LAUNCHED("cross_entropy_kernel");
  });
  cuda::add_sum_in_order(loss, n, sums.data<double>());          // Σ loss rows
  cuda::add_sum_in_order(loss + n, n, sums.data<double>() + 1);  // Σ hit rows
}

}  // namespace tl
