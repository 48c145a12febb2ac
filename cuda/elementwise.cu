// Elementwise ops (add, mul, scale, scale_rows, softcap, gelu_tanh·up, and the backward of the last
// two) and the column copy.
// Grid-stride loops over the flat index; each element is read before it is written by the
// same thread, so outputs may alias inputs as the Ops interface allows. Arithmetic runs in
// acc_t<T> (float for bf16 storage), rounded once on the store.
#include "core/math.h"
#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

using cuda::acc_t;
using cuda::narrow;
using cuda::widen;

template <class T>
__global__ void add_kernel(const T* a, const T* b, T* out, int64_t n) {
  TL_GRID_STRIDE(i, n) out[i] = narrow<T>(widen(a[i]) + widen(b[i]));
}

template <class T>
__global__ void mul_kernel(const T* a, const T* b, T* out, int64_t n) {
  TL_GRID_STRIDE(i, n) out[i] = narrow<T>(widen(a[i]) * widen(b[i]));
}

template <class T>
__global__ void scale_kernel(T* x, acc_t<T> s, int64_t n) {
  TL_GRID_STRIDE(i, n) x[i] = narrow<T>(widen(x[i]) * s);
}

template <class T>
__global__ void fill_kernel(T* x, acc_t<T> v, int64_t n) {
  TL_GRID_STRIDE(i, n) x[i] = narrow<T>(v);
}

// x[m, :] *= s[m]; x viewed [M, d].
template <class T>
__global__ void scale_rows_kernel(T* x, const T* s, int64_t n, int64_t d) {
  TL_GRID_STRIDE(i, n) x[i] = narrow<T>(widen(x[i]) * widen(s[i / d]));
}

// x = cap·tanh(x/cap), the shared formula from core/math.h.
template <class T>
__global__ void softcap_kernel(T* x, acc_t<T> cap, int64_t n) {
  TL_GRID_STRIDE(i, n) x[i] = narrow<T>(softcap(widen(x[i]), cap));
}

// out = gelu_tanh(gate)·up, gelu_tanh from core/math.h.
template <class T>
__global__ void gelu_tanh_mul_kernel(const T* gate, const T* up, T* out, int64_t n) {
  TL_GRID_STRIDE(i, n) out[i] = narrow<T>(gelu_tanh(widen(gate[i])) * widen(up[i]));
}

// dgate += dout·up·gelu'(gate), dup += dout·gelu(gate); either may be null (not wanted).
template <class T>
__global__ void gelu_tanh_mul_backward_kernel(const T* gate, const T* up, const T* dout, T* dgate, T* dup,
                                              int64_t n) {
  TL_GRID_STRIDE(i, n) {
    if (dgate) dgate[i] = narrow<T>(widen(dgate[i]) + widen(dout[i]) * widen(up[i]) * gelu_tanh_grad(widen(gate[i])));
    if (dup) dup[i] = narrow<T>(widen(dup[i]) + widen(dout[i]) * gelu_tanh(widen(gate[i])));
  }
}

// Given y = cap·tanh(x/cap): dx = dy·(1 − (y/cap)²), in place on dy.
template <class T>
__global__ void softcap_backward_kernel(const T* y, acc_t<T> cap, T* dy, int64_t n) {
  using A = acc_t<T>;
  TL_GRID_STRIDE(i, n) {
    const A t = widen(y[i]) / cap;
    dy[i] = narrow<T>(widen(dy[i]) * (A(1) - t * t));
  }
}

void require_same(const Tensor& a, const Tensor& b, const Tensor& out, const char* what) {
  cuda::require(a.numel() == b.numel() && out.numel() == a.numel(), what);
  cuda::require(a.dtype() == b.dtype() && out.dtype() == a.dtype(), what);
  cuda::require_device(a, what);
  cuda::require_device(b, what);
  cuda::require_device(out, what);
}

}  // namespace

void CudaOps::add(const Tensor& a, const Tensor& b, Tensor& out) {
  require_same(a, b, out, "add sizes/dtypes/devices");
  const int64_t n = a.numel();
  if (n == 0) return;
  cuda::dispatch(a.dtype(), [&]<class T>() {
    add_kernel<T><<<cuda::blocks_for(n), cuda::kThreads>>>(a.data<T>(), b.data<T>(), out.data<T>(), n);
    TL_CUDA_LAUNCHED("add_kernel");
  });
}

void CudaOps::mul(const Tensor& a, const Tensor& b, Tensor& out) {
  require_same(a, b, out, "mul sizes/dtypes/devices");
  const int64_t n = a.numel();
  if (n == 0) return;
  cuda::dispatch(a.dtype(), [&]<class T>() {
    mul_kernel<T><<<cuda::blocks_for(n), cuda::kThreads>>>(a.data<T>(), b.data<T>(), out.data<T>(), n);
    TL_CUDA_LAUNCHED("mul_kernel");
  });
}

void CudaOps::gelu_tanh_mul_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  require_same(gate, up, out, "gelu_mul sizes/dtypes/devices");
  const int64_t n = gate.numel();
  if (n == 0) return;
  cuda::dispatch(gate.dtype(), [&]<class T>() {
    gelu_tanh_mul_kernel<T><<<cuda::blocks_for(n), cuda::kThreads>>>(gate.data<T>(), up.data<T>(),
                                                                     out.data<T>(), n);
    TL_CUDA_LAUNCHED("gelu_tanh_mul_kernel");
  });
}

void CudaOps::gelu_tanh_mul_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                                     Tensor& dup) {
  require_same(gate, up, dout, "gelu_mul_backward sizes/dtypes/devices");
  if (dgate.defined()) require_same(gate, up, dgate, "gelu_mul_backward dgate");
  if (dup.defined()) require_same(gate, up, dup, "gelu_mul_backward dup");
  const int64_t n = gate.numel();
  if (n == 0) return;
  cuda::dispatch(gate.dtype(), [&]<class T>() {
    gelu_tanh_mul_backward_kernel<T><<<cuda::blocks_for(n), cuda::kThreads>>>(
        gate.data<T>(), up.data<T>(), dout.data<T>(), dgate.defined() ? dgate.data<T>() : nullptr,
        dup.defined() ? dup.data<T>() : nullptr, n);
    TL_CUDA_LAUNCHED("gelu_tanh_mul_backward_kernel");
  });
}

void CudaOps::scale(Tensor& x, double s) {
  cuda::require_device(x, "scale x");
  const int64_t n = x.numel();
  if (n == 0) return;
  cuda::dispatch(x.dtype(), [&]<class T>() {
    scale_kernel<T><<<cuda::blocks_for(n), cuda::kThreads>>>(x.data<T>(), acc_t<T>(s), n);
    TL_CUDA_LAUNCHED("scale_kernel");
  });
}

void CudaOps::fill(Tensor& x, double value) {
  cuda::require_device(x, "fill x");
  const int64_t n = x.numel();
  if (n == 0) return;
  cuda::dispatch(x.dtype(), [&]<class T>() {
    fill_kernel<T><<<cuda::blocks_for(n), cuda::kThreads>>>(x.data<T>(), acc_t<T>(value), n);
    TL_CUDA_LAUNCHED("fill_kernel");
  });
}

void CudaOps::scale_rows(Tensor& x, const Tensor& s) {
  const int64_t m = s.numel(), d = m ? x.numel() / m : 0;
  cuda::require(x.numel() == m * d && s.dtype() == x.dtype(), "scale_rows sizes/dtypes");
  cuda::require_device(x, "scale_rows x");
  cuda::require_device(s, "scale_rows s");
  const int64_t n = x.numel();
  if (n == 0) return;
  cuda::dispatch(x.dtype(), [&]<class T>() {
    scale_rows_kernel<T><<<cuda::blocks_for(n), cuda::kThreads>>>(x.data<T>(), s.data<T>(), n, d);
    TL_CUDA_LAUNCHED("scale_rows_kernel");
  });
}

void CudaOps::softcap_forward(Tensor& x, double cap) {
  cuda::require_device(x, "softcap x");
  const int64_t n = x.numel();
  if (n == 0) return;
  cuda::dispatch(x.dtype(), [&]<class T>() {
    softcap_kernel<T><<<cuda::blocks_for(n), cuda::kThreads>>>(x.data<T>(), acc_t<T>(cap), n);
    TL_CUDA_LAUNCHED("softcap_kernel");
  });
}

void CudaOps::softcap_backward(const Tensor& y, double cap, Tensor& dy) {
  require_same(y, y, dy, "softcap_backward sizes/dtypes/devices");
  const int64_t n = y.numel();
  if (n == 0) return;
  cuda::dispatch(y.dtype(), [&]<class T>() {
    softcap_backward_kernel<T><<<cuda::blocks_for(n), cuda::kThreads>>>(y.data<T>(), acc_t<T>(cap), dy.data<T>(), n);
    TL_CUDA_LAUNCHED("softcap_backward_kernel");
  });
}

// dst[:, dst_col:dst_col+w] = src[:, src_col:src_col+w]: a strided 2-D copy, any dtype.
void CudaOps::copy_columns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t w) {
  cuda::require(src.rank() == 2 && dst.rank() == 2 && src.dim(0) == dst.dim(0), "copy_columns shapes");
  cuda::require(src_col >= 0 && dst_col >= 0 && w >= 0, "copy_columns range");
  cuda::require(src_col + w <= src.dim(1) && dst_col + w <= dst.dim(1), "copy_columns range");
  cuda::require(src.dtype() == dst.dtype(), "copy_columns dtypes");
  cuda::require_device(src, "copy_columns src");
  cuda::require_device(dst, "copy_columns dst");
  if (w == 0 || src.dim(0) == 0) return;
  const size_t es = dtype_size(src.dtype());
  TL_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(dst.raw()) + size_t(dst_col) * es, size_t(dst.dim(1)) * es,
                                  static_cast<const char*>(src.raw()) + size_t(src_col) * es,
                                  size_t(src.dim(1)) * es, size_t(w) * es, size_t(src.dim(0)),
                                  cudaMemcpyDeviceToDevice, 0));
}

}  // namespace tl
