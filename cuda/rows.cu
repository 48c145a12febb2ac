// Row ops: embedding lookup, gather_rows, scatter_add_rows.
#include <string>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

// out[r, j] = table[ids[r], j] · scale (ids were range-checked on the host).
template <class T>
__global__ void embedding_kernel(const T* table, const int32_t* ids, T scale, T* out, int64_t n, int64_t d) {
  TL_GRID_STRIDE(e, n * d) {
    const int64_t r = e / d, j = e % d;
    out[e] = table[int64_t(ids[r]) * d + j] * scale;
  }
}

// out[m, :] = src[rows[m], :], copied as words W (4-byte words when the row size allows,
// else bytes), so any dtype works as in the reference's memcpy.
template <class W>
__global__ void gather_kernel(const W* src, const int32_t* rows, W* out, int64_t m, int64_t words) {
  TL_GRID_STRIDE(e, m * words) {
    const int64_t r = e / words, j = e % words;
    out[e] = src[int64_t(rows[r]) * words + j];
  }
}

// dst[rows[m], :] += scale[m] · src[m, :]. Rows may repeat, so the adds are atomic; with
// repeated rows the summation order (hence the last bits) is not deterministic.
template <class T>
__global__ void scatter_add_kernel(const T* src, const int32_t* rows, const T* scale, T* dst, int64_t m,
                                   int64_t d) {
  TL_GRID_STRIDE(e, m * d) {
    const int64_t r = e / d, j = e % d;
    atomicAdd(dst + int64_t(rows[r]) * d + j, scale[r] * src[e]);
  }
}

}  // namespace

void CudaOps::embedding_forward(const Tensor& table, const Tensor& ids, double scale, Tensor& out) {
  cuda::require(table.rank() == 2 && ids.dtype() == DType::I32, "embedding args");
  const int64_t v = table.dim(0), d = table.dim(1), n = ids.numel();
  cuda::require(out.numel() == n * d && out.dtype() == table.dtype(), "embedding out");
  cuda::require_device(table, "embedding table");
  cuda::require_device(out, "embedding out");
  if (n == 0 || d == 0) return;
  // An id outside the table would read out of bounds on the device; check on the host
  // like the reference (a small copy back when the ids live on the device).
  for (int32_t id : cuda::host_ints(ids, "embedding ids must be I32"))
    if (id < 0 || id >= v)
      throw std::out_of_range("token id " + std::to_string(id) + " outside vocab of " + std::to_string(v));
  cuda::DeviceInts dids = cuda::device_ints(ids, "embedding ids must be I32");
  cuda::dispatch(table.dtype(), [&]<class T>() {
    embedding_kernel<T><<<cuda::blocks_for(n * d), cuda::kThreads>>>(table.data<T>(), dids.ptr, T(scale),
                                                                     out.data<T>(), n, d);
    TL_CUDA_LAUNCHED("embedding_kernel");
  });
}

void CudaOps::gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) {
  const int64_t d = src.dim(-1), m = rows.numel();
  cuda::require(out.numel() == m * d && out.dtype() == src.dtype(), "gather_rows out");
  cuda::require_device(src, "gather_rows src");
  cuda::require_device(out, "gather_rows out");
  if (m == 0 || d == 0) return;
  cuda::DeviceInts r = cuda::device_ints(rows, "gather_rows rows must be I32");
  const int64_t bytes = d * int64_t(dtype_size(src.dtype()));
  const bool words = bytes % 4 == 0 && reinterpret_cast<uintptr_t>(src.raw()) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(out.raw()) % 4 == 0;
  if (words) {
    gather_kernel<uint32_t><<<cuda::blocks_for(m * bytes / 4), cuda::kThreads>>>(
        src.data<uint32_t>(), r.ptr, out.data<uint32_t>(), m, bytes / 4);
  } else {
    gather_kernel<uint8_t><<<cuda::blocks_for(m * bytes), cuda::kThreads>>>(src.data<uint8_t>(), r.ptr,
                                                                           out.data<uint8_t>(), m, bytes);
  }
  TL_CUDA_LAUNCHED("gather_kernel");
}

void CudaOps::scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, Tensor& dst) {
  const int64_t d = dst.dim(-1), m = rows.numel();
  cuda::require(src.numel() == m * d && scale.numel() == m, "scatter_add_rows shapes");
  cuda::require(src.dtype() == dst.dtype() && scale.dtype() == dst.dtype(), "scatter_add_rows dtypes");
  cuda::require_device(src, "scatter_add_rows src");
  cuda::require_device(scale, "scatter_add_rows scale");
  cuda::require_device(dst, "scatter_add_rows dst");
  if (m == 0 || d == 0) return;
  cuda::DeviceInts r = cuda::device_ints(rows, "scatter_add_rows rows must be I32");
  cuda::dispatch(dst.dtype(), [&]<class T>() {
    scatter_add_kernel<T><<<cuda::blocks_for(m * d), cuda::kThreads>>>(src.data<T>(), r.ptr, scale.data<T>(),
                                                                       dst.data<T>(), m, d);
    TL_CUDA_LAUNCHED("scatter_add_kernel");
  });
}

}  // namespace tl
