// Helpers shared by the CUDA op files (nvcc only): error checks, dtype dispatch, the
// storage/arithmetic conversions, launch sizes, index-tensor staging and deterministic
// warp/block reductions.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cuda_ops.h"

namespace tl::cuda {

// Throw std::runtime_error("<call> failed at <file>:<line>: <error>") unless the call succeeded.
void check(cudaError_t e, const char* call, const char* file, int line);
void check(cublasStatus_t s, const char* call, const char* file, int line);

#define TL_CUDA_CHECK(call) ::tl::cuda::check((call), #call, __FILE__, __LINE__)
// After a <<<...>>> launch: catches bad launch configurations at once. Faults while the
// kernel runs surface at the next synchronising call (download, cudaMemcpy, cudaFree).
#define TL_CUDA_LAUNCHED(kernel) ::tl::cuda::check(cudaGetLastError(), "launch " kernel, __FILE__, __LINE__)

// Argument checks, reported like CpuOps does (std::invalid_argument "CudaOps: ...").
void require(bool ok, const char* what);
// `t` must be a device tensor (activations and weights are never staged implicitly).
void require_device(const Tensor& t, const char* what);

using bf16 = __nv_bfloat16;

// Runs f.template operator()<T>() for the storage type of the activation dtype `t`:
// float (F32), double (F64) or bf16 (BF16).
template <class F>
void dispatch(DType t, F&& f) {
  if (t == DType::F32) f.template operator()<float>();
  else if (t == DType::F64) f.template operator()<double>();
  else if (t == DType::BF16) f.template operator()<bf16>();
  else throw std::invalid_argument("CudaOps: activations must be F32, F64 or BF16");
}

// The same for code that exists in float and double only (cuBLAS SGEMM/DGEMM paths; bf16
// takes its own path before reaching them).
template <class F>
void dispatch_wide(DType t, F&& f) {
  if (t == DType::F32) f.template operator()<float>();
  else if (t == DType::F64) f.template operator()<double>();
  else throw std::invalid_argument("CudaOps: this path needs F32 or F64 tensors");
}

// The type a kernel computes in for storage type T: bf16 values are loaded to float, every
// operation runs in float and the result is rounded to bf16 once, on the store. float and
// double compute in themselves, so for them widen/narrow are the identity and the F32/F64
// kernels are the arithmetic they always were.
template <class T>
struct Accumulate {
  using type = T;
};
template <>
struct Accumulate<bf16> {
  using type = float;
};
template <class T>
using acc_t = typename Accumulate<T>::type;

// Storage -> arithmetic type.
template <class T>
__device__ __forceinline__ acc_t<T> widen(T v) {
  if constexpr (std::is_same_v<T, bf16>) return __bfloat162float(v);
  else return v;
}

// Any arithmetic value (float or double) -> storage type T, rounding to nearest even once
// (a double goes to bf16 directly, not through float).
template <class T, class V>
__device__ __forceinline__ T narrow(V v) {
  if constexpr (std::is_same_v<T, bf16>) {
    if constexpr (std::is_same_v<V, double>) return __double2bfloat16(v);
    else return __float2bfloat16_rn(float(v));
  } else {
    return T(v);
  }
}

// *p += v, atomically, in T (bf16 atomics need sm_80, the oldest architecture built).
template <class T>
__device__ __forceinline__ void atomic_add(T* p, acc_t<T> v) {
  if constexpr (std::is_same_v<T, bf16>) atomicAdd(p, __float2bfloat16_rn(v));
  else atomicAdd(p, v);
}

constexpr int kThreads = 256;
// Blocks for a grid-stride loop over n items; the cap keeps the grid legal for any n.
inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  return unsigned(std::clamp<int64_t>((n + threads - 1) / threads, 1, int64_t(1) << 20));
}

// for (int64_t i = global thread index; i < n; i += all threads): a grid-stride loop.
#define TL_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// Stream-ordered device memory from the current device's default pool (cudaMallocAsync on
// the legacy stream every op runs on), returned to the pool with cudaFreeAsync by the last
// owner. The pool's release threshold is unlimited, so memory freed by one step is reused by
// the next without going back to the driver: after the first step nothing is cudaMalloc'ed.
// Stream order makes reuse safe: a block freed after a kernel is only handed out to work
// queued after that kernel. At least 1 byte, so the pointer is valid.
// *acc += Σ x[0..n), summed in order on one device thread: a deterministic total of per-row
// or per-block partial sums, left on the device.
void add_sum_in_order(const double* x, int64_t n, double* acc);
std::shared_ptr<void> device_alloc(size_t bytes);

// Round-to-nearest-even fp32 -> bf16, as core/half.h's float_to_bf16 (and __float2bfloat16_rn).
void to_bf16(const float* src, uint16_t* dst, int64_t n);
// bf16 -> fp32 (exact).
void from_bf16(const uint16_t* src, float* dst, int64_t n);

// An I32 index tensor as a device pointer: device tensors are used in place, host tensors
// are copied to a temporary kept alive by `keep`.
struct DeviceInts {
  const int32_t* ptr = nullptr;
  std::shared_ptr<void> keep;
};
DeviceInts device_ints(const Tensor& t, const char* what);
// An I32 index tensor's values on the host (copied back when it lives on the device).
std::vector<int32_t> host_ints(const Tensor& t, const char* what);

struct Sum {
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <class T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// Reduce over the 32 lanes of a warp; every lane gets the result. Needs the whole warp.
template <class T, class Op>
__device__ T warp_reduce(T v, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduce over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result, combined in warp order so it is deterministic. Callable repeatedly in a kernel.
template <class T, class Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T partial[32];
  v = warp_reduce(v, op);
  __syncthreads();  // an earlier call's readers are done with `partial`
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = partial[0];
  for (unsigned w = 1; w < blockDim.x / 32; ++w) r = op(r, partial[w]);
  return r;
}

}  // namespace tl::cuda
