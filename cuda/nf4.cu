// NF4 on the device. The frozen base stays on the GPU as bitsandbytes stores it (packed
// nibbles + double-quantized absmax: the host Nf4Tensor's bytes, copied once). A linear
// layer dequantizes the whole projection into a reused scratch and multiplies it there:
//   w[i] = round_orig(nf4_code_value(q[i]) · absmax_f32[i/64])      (core/nf4.h)
//   y = x·Wᵀ (forward);  dx += dy·W (backward; the base is frozen)
// in bf16 on tensor cores when the product runs in bf16 (CudaMatmul::Bf16, and always with
// BF16 activations, whose x, y, dy and dx are bf16 too), else in the activation dtype, so
// the product is the CPU backend's to fp32 summation order.
// The quantize kernel is nf4_quantize's first pass (per-block absmax, reciprocal, codes) on
// the device, so loading can quantize a weight where it was uploaded.
#include <climits>

#include "core/half.h"
#include "core/nf4.h"
#include "cuda/cuda_util.cuh"
#include "cuda/gemm_lt.h"

namespace tl {

using cuda::blocks_for;
using cuda::kThreads;

namespace {

// The device copy: one allocation holding the packed bytes, then the scale data.
struct Nf4Device {
  std::shared_ptr<void> mem;
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;        // !double_quant
  const uint8_t* absmax_q = nullptr;    // double_quant
  const float* nested_absmax = nullptr;
  const float* nested_map = nullptr;
  float offset = 0;
};

const Nf4Device& device_copy(const Nf4Tensor& w) {
  CudaOps::nf4_to_device(w);
  return *static_cast<const Nf4Device*>(w.backend_copy.get());
}

// Out is bf16 bits (uint16_t), float or double; the value is rounded to the weight's
// original dtype first, exactly as nf4_dequantize_rows does on the host.
template <class Out>
__global__ void nf4_dequant_kernel(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                   const float* nested, const float* map, float offset, int orig, Out* out,
                                   int64_t n) {
  TL_GRID_STRIDE(i, n) {
    const int64_t b = i / kNf4BlockSize;
    const float scale =
        absmax ? absmax[b] : nf4_absmax_dq(map[absmax_q[b]], nested[b / kNf4NestedBlockSize], offset);
    const uint8_t byte = packed[i / 2];
    const unsigned q = (i & 1) ? (byte & 15u) : (byte >> 4);  // even element: high nibble
    float v = __fmul_rn(nf4_code_value(q), scale);
    if (orig == 1) v = bf16_to_float(float_to_bf16(v));
    else if (orig == 2) v = f16_to_float(float_to_f16(v));
    if constexpr (sizeof(Out) == 2) out[i] = float_to_bf16(v);
    else out[i] = Out(v);
  }
}

// Pass 1 of nf4_quantize, one thread per 64-element block: absmax = max|x|, inv = 1/absmax
// (+inf for an all-zero block, whose 0·inf = NaN codes give 0, as the kernel's), codes of
// x·inv, two per byte (even element high). A lone last element pairs with a padding 0.
template <class In>
__global__ void nf4_quantize_kernel(const In* x, int64_t n, uint8_t* packed, float* absmax, int64_t nblocks) {
  TL_GRID_STRIDE(b, nblocks) {
    auto rd = [&](int64_t i) -> float {
      if constexpr (sizeof(In) == 4) return x[i];
      else return bf16_to_float(x[i]);
    };
    const int64_t lo = b * kNf4BlockSize, hi = min(n, lo + kNf4BlockSize);
    float amax = 0.0f;
    for (int64_t i = lo; i < hi; ++i) amax = fmaxf(amax, fabsf(rd(i)));
    absmax[b] = amax;
    const float inv = __frcp_rn(amax);  // IEEE 1/x, as the host's 1.0f / amax
    for (int64_t i = lo; i < hi; i += 2) {
      const uint8_t hq = nf4_quantize_value(__fmul_rn(rd(i), inv));
      const uint8_t lq = nf4_quantize_value(__fmul_rn(i + 1 < n ? rd(i + 1) : 0.0f, inv));
      packed[i / 2] = uint8_t(hq << 4 | lq);
    }
  }
}

// The F16 reader differs from BF16 only in the conversion.
__global__ void nf4_quantize_f16_kernel(const uint16_t* x, int64_t n, uint8_t* packed, float* absmax,
                                        int64_t nblocks) {
  TL_GRID_STRIDE(b, nblocks) {
    const int64_t lo = b * kNf4BlockSize, hi = min(n, lo + kNf4BlockSize);
    float amax = 0.0f;
    for (int64_t i = lo; i < hi; ++i) amax = fmaxf(amax, fabsf(f16_to_float(x[i])));
    absmax[b] = amax;
    const float inv = __frcp_rn(amax);
    for (int64_t i = lo; i < hi; i += 2) {
      const uint8_t hq = nf4_quantize_value(__fmul_rn(f16_to_float(x[i]), inv));
      const uint8_t lq = nf4_quantize_value(__fmul_rn(i + 1 < n ? f16_to_float(x[i + 1]) : 0.0f, inv));
      packed[i / 2] = uint8_t(hq << 4 | lq);
    }
  }
}

int orig_code(DType t) { return t == DType::BF16 ? 1 : t == DType::F16 ? 2 : 0; }

void check_nf4(const Nf4Tensor& w) {
  const int64_t n = w.numel(), nb = w.nblocks();
  const bool ok = w.shape.size() == 2 && w.packed.size() == size_t((n + 1) / 2) &&
                  (w.double_quant ? w.absmax_q.size() == size_t(nb) && w.nested_map.size() == 256 &&
                                        w.nested_absmax.size() * kNf4NestedBlockSize >= size_t(nb)
                                  : w.absmax.size() == size_t(nb));
  if (!ok) throw Error("CudaOps: inconsistent Nf4Tensor for shape " + shape_str(w.shape));
}

}  // namespace

void CudaOps::nf4_to_device(const Nf4Tensor& w) {
  if (w.backend_copy) return;
  check_nf4(w);
  // Sections 256-byte aligned inside one allocation.
  auto up = [](size_t b) { return (b + 255) / 256 * 256; };
  const size_t packed_b = up(w.packed.size()), absmax_b = up(w.absmax.size() * 4), q_b = up(w.absmax_q.size()),
               nested_b = up(w.nested_absmax.size() * 4), map_b = up(w.nested_map.size() * 4);
  auto d = std::make_shared<Nf4Device>();
  d->mem = cuda::device_alloc(packed_b + absmax_b + q_b + nested_b + map_b);
  char* base = static_cast<char*>(d->mem.get());
  auto put = [&](const void* src, size_t bytes, size_t& at) -> const void* {
    char* dst = base + at;
    if (bytes) TL_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    return dst;
  };
  size_t at = 0;
  d->packed = static_cast<const uint8_t*>(put(w.packed.data(), w.packed.size(), at));
  at += packed_b;
  if (w.double_quant) {
    d->absmax_q = static_cast<const uint8_t*>(put(w.absmax_q.data(), w.absmax_q.size(), at));
    at += q_b;
    d->nested_absmax = static_cast<const float*>(put(w.nested_absmax.data(), w.nested_absmax.size() * 4, at));
    at += nested_b;
    d->nested_map = static_cast<const float*>(put(w.nested_map.data(), w.nested_map.size() * 4, at));
    d->offset = w.offset;
  } else {
    d->absmax = static_cast<const float*>(put(w.absmax.data(), w.absmax.size() * 4, at));
  }
  w.backend_copy = std::move(d);
}

void CudaOps::nf4_dequantize_into(const Nf4Tensor& w, void* out) {
  const Nf4Device& d = device_copy(w);
  const int64_t n = w.numel();
  const int orig = orig_code(w.orig_dtype);
  auto launch = [&]<class Out>(Out* o) {
    nf4_dequant_kernel<Out><<<blocks_for(n), kThreads>>>(d.packed, d.absmax, d.absmax_q, d.nested_absmax,
                                                         d.nested_map, d.offset, orig, o, n);
    TL_CUDA_LAUNCHED("nf4_dequant_kernel");
  };
  if (act_ == DType::BF16) launch(static_cast<uint16_t*>(out));
  else if (act_ == DType::F32) launch(static_cast<float*>(out));
  else launch(static_cast<double*>(out));
}

const void* CudaOps::nf4_dequantized(const Nf4Tensor& w, bool bf16) {
  const Nf4Device& d = device_copy(w);
  const int64_t n = w.numel();
  const size_t es = bf16 ? 2 : dtype_size(act_);
  void* out = scratch(3, size_t(n) * es);
  const int orig = orig_code(w.orig_dtype);
  auto launch = [&]<class Out>(Out* o) {
    nf4_dequant_kernel<Out><<<blocks_for(n), kThreads>>>(d.packed, d.absmax, d.absmax_q, d.nested_absmax,
                                                         d.nested_map, d.offset, orig, o, n);
    TL_CUDA_LAUNCHED("nf4_dequant_kernel");
  };
  if (bf16) launch(static_cast<uint16_t*>(out));
  else if (act_ == DType::F32) launch(static_cast<float*>(out));  // (BF16 activations always take bf16)
  else launch(static_cast<double*>(out));
  return out;
}

void CudaOps::linear_nf4_forward(const Tensor& x, const Nf4Tensor& w, Tensor& y) {
  const int64_t out = w.shape.at(0), in = w.shape.at(1);
  cuda::require_device(x, "linear_nf4 x");
  cuda::require_device(y, "linear_nf4 y");
  cuda::require(x.dtype() == act_ && y.dtype() == act_, "linear_nf4: x and y must have the activation dtype");
  cuda::require(in > 0 && x.numel() % in == 0, "linear_nf4: x width does not match W");
  const int64_t n = x.numel() / in;
  cuda::require(y.numel() == n * out, "linear_nf4: y size");
  cuda::require(n <= INT_MAX && in <= INT_MAX && out <= INT_MAX, "linear_nf4: dimension exceeds cuBLAS int range");
  if (n == 0 || out == 0) return;
  const bool bf16 = act_ == DType::BF16 || bf16_for(n * out * in);
  const void* wd = nf4_dequantized(w, bf16);
  // yᵀ[out,n] = op_T(W's buffer [in,out]) · (x's buffer [in,n])   (see linear.cu)
  if (act_ == DType::BF16) {
    lt().run(cuda::LtType::Bf16Bf16, true, false, out, n, in, wd, in, x.raw(), in, 0.0, y.raw(), out, nullptr);
    return;
  }
  if (bf16) {
    gemm_bf16(true, false, out, n, in, nullptr, in, x.data<float>(), in, 0.0f, y.data<float>(), out,
              static_cast<const uint16_t*>(wd));
    return;
  }
  if (act_ == DType::F32) {
    const float one = 1, zero = 0;
    TL_CUDA_CHECK(cublasSgemm(blas(), CUBLAS_OP_T, CUBLAS_OP_N, int(out), int(n), int(in), &one,
                              static_cast<const float*>(wd), int(in), x.data<float>(), int(in), &zero,
                              y.data<float>(), int(out)));
  } else {
    const double one = 1, zero = 0;
    TL_CUDA_CHECK(cublasDgemm(blas(), CUBLAS_OP_T, CUBLAS_OP_N, int(out), int(n), int(in), &one,
                              static_cast<const double*>(wd), int(in), x.data<double>(), int(in), &zero,
                              y.data<double>(), int(out)));
  }
}

void CudaOps::linear_nf4_backward(const Tensor& dy, const Nf4Tensor& w, Tensor& dx) {
  const int64_t out = w.shape.at(0), in = w.shape.at(1);
  cuda::require_device(dy, "linear_nf4_backward dy");
  cuda::require_device(dx, "linear_nf4_backward dx");
  cuda::require(dy.dtype() == act_ && dx.dtype() == act_, "linear_nf4_backward: activation dtype");
  cuda::require(out > 0 && dy.numel() % out == 0, "linear_nf4_backward: dy width does not match W");
  const int64_t n = dy.numel() / out;
  cuda::require(dx.numel() == n * in, "linear_nf4_backward: dx size");
  cuda::require(n <= INT_MAX && in <= INT_MAX && out <= INT_MAX,
                "linear_nf4_backward: dimension exceeds cuBLAS int range");
  if (n == 0 || in == 0) return;
  const bool bf16 = act_ == DType::BF16 || bf16_for(n * out * in);
  const void* wd = nf4_dequantized(w, bf16);
  // dxᵀ[in,n] += (W's buffer [in,out])·(dy's buffer [out,n])
  if (act_ == DType::BF16) {
    lt().run(cuda::LtType::Bf16Bf16, false, false, in, n, out, wd, in, dy.raw(), out, 1.0, dx.raw(), in, nullptr);
    return;
  }
  if (bf16) {
    gemm_bf16(false, false, in, n, out, nullptr, in, dy.data<float>(), out, 1.0f, dx.data<float>(), in,
              static_cast<const uint16_t*>(wd));
    return;
  }
  if (act_ == DType::F32) {
    const float one = 1;
    TL_CUDA_CHECK(cublasSgemm(blas(), CUBLAS_OP_N, CUBLAS_OP_N, int(in), int(n), int(out), &one,
                              static_cast<const float*>(wd), int(in), dy.data<float>(), int(out), &one,
                              dx.data<float>(), int(in)));
  } else {
    const double one = 1;
    TL_CUDA_CHECK(cublasDgemm(blas(), CUBLAS_OP_N, CUBLAS_OP_N, int(in), int(n), int(out), &one,
                              static_cast<const double*>(wd), int(in), dy.data<double>(), int(out), &one,
                              dx.data<double>(), int(in)));
  }
}

Nf4Tensor CudaOps::quantize_nf4(const Tensor& w, bool double_quant) {
  cuda::require_device(w, "quantize_nf4 w");
  if (w.dtype() != DType::F32 && w.dtype() != DType::BF16 && w.dtype() != DType::F16)
    throw Error("CudaOps::quantize_nf4: dtype " + std::string(dtype_name(w.dtype())) + " (want F32, BF16 or F16)");
  Nf4Tensor t;
  t.shape = w.shape();
  t.orig_dtype = w.dtype();
  const int64_t n = w.numel(), nb = t.nblocks();
  auto packed = cuda::device_alloc(size_t((n + 1) / 2));
  auto absmax = cuda::device_alloc(size_t(nb) * 4);
  uint8_t* pk = static_cast<uint8_t*>(packed.get());
  float* am = static_cast<float*>(absmax.get());
  const unsigned blocks = blocks_for(nb, 128);
  if (w.dtype() == DType::F32) nf4_quantize_kernel<float><<<blocks, 128>>>(w.data<float>(), n, pk, am, nb);
  else if (w.dtype() == DType::BF16) nf4_quantize_kernel<uint16_t><<<blocks, 128>>>(w.data<uint16_t>(), n, pk, am, nb);
  else nf4_quantize_f16_kernel<<<blocks, 128>>>(w.data<uint16_t>(), n, pk, am, nb);
  TL_CUDA_LAUNCHED("nf4_quantize_kernel");
  // The host keeps the bytes too (checkpointing, merging and the CPU backend read them);
  // the device copy is made from them below, so both are the same bytes by construction.
  t.packed.resize(size_t((n + 1) / 2));
  std::vector<float> host_absmax(static_cast<size_t>(nb));
  TL_CUDA_CHECK(cudaMemcpy(t.packed.data(), pk, t.packed.size(), cudaMemcpyDeviceToHost));
  TL_CUDA_CHECK(cudaMemcpy(host_absmax.data(), am, size_t(nb) * 4, cudaMemcpyDeviceToHost));
  t.double_quant = double_quant;
  if (!double_quant) {
    t.absmax = std::move(host_absmax);
  } else {
    // compress_statistics on nblocks floats (1/64 of the weight): torch's CPU mean order and
    // the 8-bit blockwise codes, by the same host code as nf4_quantize.
    t.offset = torch_mean_f32(host_absmax.data(), nb);
    for (float& a : host_absmax) a -= t.offset;
    t.nested_map = nf4_dynamic_map();
    t.absmax_q.resize(size_t(nb));
    t.nested_absmax.resize(size_t((nb + kNf4NestedBlockSize - 1) / kNf4NestedBlockSize));
    quantize_blockwise_8bit(host_absmax.data(), nb, t.nested_map.data(), kNf4NestedBlockSize, t.absmax_q.data(),
                            t.nested_absmax.data());
  }
  nf4_to_device(t);
  return t;
}

}  // namespace tl
