// Token accuracy on the device: rows whose label ≠ −100 and whose argmax logit is the label.
// The argmax takes the first maximum (ties to the lower index), as Ops::count_argmax_hits;
// values compare in acc_t<T> (bf16 widens to fp32 exactly).
#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

constexpr int kArgmaxThreads = 256;

// One block per row: each thread scans a stride of the row, then the block merges the
// (value, index) pairs keeping the larger value, or the lower index on equal values.
template <class T>
__global__ void argmax_hits_kernel(const T* logits, const int32_t* labels, int64_t v,
                                   unsigned long long* hits) {
  using A = cuda::acc_t<T>;
  const int64_t row = blockIdx.x;
  const int32_t target = labels[row];
  if (target == -100) return;  // block-uniform: no thread reaches the barriers below
  const T* l = logits + row * v;
  A best = cuda::widen(l[0]);
  int64_t at = 0;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const A lj = cuda::widen(l[j]);
    if (lj > best || (lj == best && j < at)) best = lj, at = j;
  }
  __shared__ A vals[kArgmaxThreads];
  __shared__ int64_t idx[kArgmaxThreads];
  vals[threadIdx.x] = best;
  idx[threadIdx.x] = at;
  __syncthreads();
  for (int s = kArgmaxThreads / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) {
      const A ov = vals[threadIdx.x + s];
      const int64_t oi = idx[threadIdx.x + s];
      if (ov > vals[threadIdx.x] || (ov == vals[threadIdx.x] && oi < idx[threadIdx.x])) {
        vals[threadIdx.x] = ov;
        idx[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0 && idx[0] == target) atomicAdd(hits, 1ull);
}

}  // namespace

int64_t CudaOps::count_argmax_hits(const Tensor& logits, const Tensor& labels) {
  cuda::require_device(logits, "count_argmax_hits logits");
  const int64_t n = labels.numel();
  if (n == 0) return 0;
  cuda::require(logits.numel() % n == 0 && logits.numel() / n > 0, "count_argmax_hits: logits are not [N, V]");
  const int64_t v = logits.numel() / n;
  cuda::DeviceInts y = cuda::device_ints(labels, "count_argmax_hits labels must be I32");
  auto hits = cuda::device_alloc(sizeof(unsigned long long));
  TL_CUDA_CHECK(cudaMemsetAsync(hits.get(), 0, sizeof(unsigned long long), 0));
  cuda::dispatch(logits.dtype(), [&]<class T>() {
    argmax_hits_kernel<T><<<unsigned(n), kArgmaxThreads>>>(logits.data<T>(), y.ptr, v,
                                                           static_cast<unsigned long long*>(hits.get()));
    TL_CUDA_LAUNCHED("argmax_hits_kernel");
  });
  unsigned long long h = 0;
  TL_CUDA_CHECK(cudaMemcpy(&h, hits.get(), sizeof(h), cudaMemcpyDeviceToHost));
  return int64_t(h);
}

}  // namespace tl
