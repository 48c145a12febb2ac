// Helpers shared by the GPU tests: random inputs, tolerance checks and a CPU/CUDA pair.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/cpu/cpu_ops.h"
#include "cuda/cuda_ops.h"

// Every GPU test starts with this: without a device it skips, saying so.
#define TL_REQUIRE_GPU() \
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped"

namespace tl::gpu_test {

constexpr DType kDTypes[] = {DType::F32, DType::F64};

// Mixed tolerance |gpu − cpu| ≤ tol·(1 + |cpu|): relative for large values, absolute near 0
// (where cancellation, e.g. in rope or a matmul, makes relative error meaningless).
inline double tol(DType dt) { return dt == DType::F32 ? 1e-5 : 1e-12; }
// Gradients accumulated over many terms: the reference adds each term in T, the GPU sums in
// double and adds once, so F32 results differ by a few more roundings.
inline double grad_tol(DType dt) { return dt == DType::F32 ? 5e-5 : 1e-11; }

inline Tensor random(const Shape& shape, DType dt, std::mt19937& rng, double lo = -1, double hi = 1) {
  Tensor t = Tensor::zeros(shape, DType::F64);
  std::uniform_real_distribution<double> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = u(rng);
  return t.to(dt);
}

inline Tensor ints(const std::vector<int32_t>& v, Shape shape = {}) {
  if (shape.empty()) shape = {int64_t(v.size())};
  Tensor t = Tensor::zeros(shape, DType::I32);
  for (size_t i = 0; i < v.size(); ++i) t.data<int32_t>()[i] = v[i];
  return t;
}

inline void expect_close(const Tensor& got, const Tensor& want, double tolerance, const std::string& what) {
  ASSERT_EQ(got.device(), Device::CPU) << what;
  ASSERT_EQ(got.shape(), want.shape()) << what;
  ASSERT_EQ(got.dtype(), want.dtype()) << what;
  double worst = 0;
  int64_t at = -1;
  for (int64_t i = 0; i < want.numel(); ++i) {
    double g = got.get(i), w = want.get(i);
    double err = std::abs(g - w) / (1 + std::abs(w));
    if (std::isnan(err)) err = INFINITY;  // a NaN on either side is a failure
    if (err > worst) {
      worst = err;
      at = i;
    }
  }
  EXPECT_LE(worst, tolerance) << what << ": worst at flat index " << at << ": gpu " << got.get(at)
                              << " vs cpu " << want.get(at);
}

inline void expect_equal_ints(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  for (int64_t i = 0; i < want.numel(); ++i)
    ASSERT_EQ(got.data<int32_t>()[i], want.data<int32_t>()[i]) << what << " at " << i;
}

// A reference and a CUDA backend of one activation dtype.
struct Pair {
  CpuOps cpu;
  CudaOps gpu;
  explicit Pair(DType dt) : cpu(dt), gpu(dt) {}
  Pair(DType dt, CpuMatmul cm, CudaMatmul gm) : cpu(dt, cm), gpu(dt, gm) {}
  Tensor up(const Tensor& host) { return gpu.upload(host, host.dtype()); }
  Tensor down(const Tensor& dev) { return gpu.download(dev); }
};

// A KV cache holding keys/values k, v [1, S, nkv, d] rotated by `shift` slots, plus one empty
// slot (position −1) at the end, as attention_cached_forward reads it: the rows, their
// positions, and the query positions 0…S−1.
struct RotatedCache {
  Tensor k, v;
  std::vector<int32_t> k_pos, q_pos;
};
inline RotatedCache rotated_cache(const Tensor& k, const Tensor& v, int64_t shift = 4) {
  const int64_t S = k.dim(1), nkv = k.dim(2), d = k.dim(3);
  RotatedCache c{Tensor::zeros({S + 1, nkv, d}, k.dtype()), Tensor::zeros({S + 1, nkv, d}, v.dtype()),
                 std::vector<int32_t>(size_t(S + 1), -1), {}};
  const size_t row = size_t(nkv * d) * dtype_size(k.dtype());
  for (int64_t j = 0; j < S; ++j) {
    const int64_t slot = (j + shift) % S;
    std::memcpy(static_cast<char*>(c.k.raw()) + slot * row, static_cast<const char*>(k.raw()) + j * row, row);
    std::memcpy(static_cast<char*>(c.v.raw()) + slot * row, static_cast<const char*>(v.raw()) + j * row, row);
    c.k_pos[size_t(slot)] = int32_t(j);
    c.q_pos.push_back(int32_t(j));
  }
  return c;
}

}  // namespace tl::gpu_test
