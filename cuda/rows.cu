// Row ops: embedding lookup and its backward, gather_rows, scatter_add_rows, scatter_rows,
// rowwise_dot.
#include <string>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

using cuda::acc_t;
using cuda::narrow;
using cuda::widen;

// out[r, j] = table[ids[r], j] · scale (ids were range-checked on the host), in acc_t<T>.
template <class T>
__global__ void embedding_kernel(const T* table, const int32_t* ids, acc_t<T> scale, T* out, int64_t n,
                                 int64_t d) {
  TL_GRID_STRIDE(e, n * d) {
    const int64_t r = e / d, j = e % d;
    out[e] = narrow<T>(widen(table[int64_t(ids[r]) * d + j]) * scale);
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

// dst[rows[m], :] += scale[m] · src[m, :] (scale == null: 1). Rows may repeat, so the adds
// are atomic; with repeated rows the summation order (hence the last bits) is not
// deterministic. bf16: the product is formed in fp32, rounded, and added by a bf16 atomic.
template <class T>
__global__ void scatter_add_kernel(const T* src, const int32_t* rows, const T* scale, T* dst, int64_t m,
                                   int64_t d) {
  TL_GRID_STRIDE(e, m * d) {
    const int64_t r = e / d, j = e % d;
    cuda::atomic_add(dst + int64_t(rows[r]) * d + j, scale ? widen(scale[r]) * widen(src[e]) : widen(src[e]));
  }
}

// dtable[ids[r], :] += scale · dout[r, :], skipping ids equal to `skip`. Atomic, since
// tokens repeat (same caveat on summation order as above).
template <class T>
__global__ void embedding_backward_kernel(const int32_t* ids, const T* dout, acc_t<T> scale, int64_t skip,
                                          T* dtable, int64_t n, int64_t d) {
  TL_GRID_STRIDE(e, n * d) {
    const int64_t r = e / d, j = e % d;
    const int64_t id = ids[r];
    if (id != skip) cuda::atomic_add(dtable + id * d + j, scale * widen(dout[e]));
  }
}

// out[m] = T(Σ_j a[m,j]·b[rows[m],j]), summed in double; one block per m.
template <class T>
__global__ void rowwise_dot_kernel(const T* a, const int32_t* rows, const T* b, T* out, int64_t d) {
  const T* x = a + int64_t(blockIdx.x) * d;
  const T* y = b + int64_t(rows[blockIdx.x]) * d;
  double acc = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) acc += double(widen(x[j])) * double(widen(y[j]));
  acc = cuda::block_reduce(acc, cuda::Sum{});
  if (threadIdx.x == 0) out[blockIdx.x] = narrow<T>(acc);
}

// Ids are range-checked on the host (a small copy back when they live on the device): an
// id outside the table would touch memory out of bounds on the device.
void check_ids(const Tensor& ids, int64_t v, int64_t skip) {
  for (int32_t id : cuda::host_ints(ids, "embedding ids must be I32"))
    if (id != skip && (id < 0 || id >= v))
      throw std::out_of_range("token id " + std::to_string(id) + " outside vocab of " + std::to_string(v));
}

}  // namespace

void CudaOps::embedding_forward(const Tensor& table, const Tensor& ids, double scale, Tensor& out) {
  cuda::require(table.rank() == 2 && ids.dtype() == DType::I32, "embedding args");
  const int64_t v = table.dim(0), d = table.dim(1), n = ids.numel();
  cuda::require(out.numel() == n * d && out.dtype() == table.dtype(), "embedding out");
  cuda::require_device(table, "embedding table");
  cuda::require_device(out, "embedding out");
  if (n == 0 || d == 0) return;
  check_ids(ids, v, -1);
  cuda::DeviceInts dids = cuda::device_ints(ids, "embedding ids must be I32");
  cuda::dispatch(table.dtype(), [&]<class T>() {
    embedding_kernel<T><<<cuda::blocks_for(n * d), cuda::kThreads>>>(table.data<T>(), dids.ptr, acc_t<T>(scale),
                                                                     out.data<T>(), n, d);
    TL_CUDA_LAUNCHED("embedding_kernel");
  });
}

void CudaOps::embedding_backward(const Tensor& ids, const Tensor& dout, double scale, int64_t skip_id,
                                 Tensor& dtable) {
  if (!dtable.defined()) return;  // gradient not wanted (as in the reference)
  cuda::require(dtable.rank() == 2 && ids.dtype() == DType::I32, "embedding_backward args");
  const int64_t v = dtable.dim(0), d = dtable.dim(1), n = ids.numel();
  cuda::require(dout.numel() == n * d && dout.dtype() == dtable.dtype(), "embedding_backward sizes");
  cuda::require_device(dout, "embedding_backward dout");
  cuda::require_device(dtable, "embedding_backward dtable");
  if (n == 0 || d == 0) return;
  check_ids(ids, v, skip_id);
  cuda::DeviceInts dids = cuda::device_ints(ids, "embedding ids must be I32");
  cuda::dispatch(dtable.dtype(), [&]<class T>() {
    embedding_backward_kernel<T><<<cuda::blocks_for(n * d), cuda::kThreads>>>(dids.ptr, dout.data<T>(), acc_t<T>(scale),
                                                                              skip_id, dtable.data<T>(), n, d);
    TL_CUDA_LAUNCHED("embedding_backward_kernel");
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

void CudaOps::scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) {
  const int64_t d = dst.dim(-1), m = rows.numel();
  cuda::require(src.numel() == m * d && src.dtype() == dst.dtype(), "scatter_rows sizes/dtypes");
  cuda::require_device(src, "scatter_rows src");
  cuda::require_device(dst, "scatter_rows dst");
  if (m == 0 || d == 0) return;
  cuda::DeviceInts r = cuda::device_ints(rows, "scatter_rows rows must be I32");
  cuda::dispatch(dst.dtype(), [&]<class T>() {
    scatter_add_kernel<T><<<cuda::blocks_for(m * d), cuda::kThreads>>>(src.data<T>(), r.ptr, nullptr,
                                                                       dst.data<T>(), m, d);
    TL_CUDA_LAUNCHED("scatter_add_kernel");
  });
}

void CudaOps::rowwise_dot(const Tensor& a, const Tensor& rows, const Tensor& b, Tensor& out) {
  const int64_t d = a.dim(-1), m = rows.numel();
  cuda::require(a.numel() == m * d && out.numel() == m && b.dim(-1) == d, "rowwise_dot sizes");
  cuda::require(b.dtype() == a.dtype() && out.dtype() == a.dtype(), "rowwise_dot dtypes");
  cuda::require_device(a, "rowwise_dot a");
  cuda::require_device(b, "rowwise_dot b");
  cuda::require_device(out, "rowwise_dot out");
  cuda::require(m <= INT32_MAX, "rowwise_dot: too many rows");
  if (m == 0) return;
  cuda::DeviceInts r = cuda::device_ints(rows, "rowwise_dot rows must be I32");
  cuda::dispatch(a.dtype(), [&]<class T>() {
    rowwise_dot_kernel<T><<<unsigned(m), 128>>>(a.data<T>(), r.ptr, b.data<T>(), out.data<T>(), d);
    TL_CUDA_LAUNCHED("rowwise_dot_kernel");
  });
}

}  // namespace tl
