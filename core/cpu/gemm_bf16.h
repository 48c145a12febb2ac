// The CPU backend's fast matrix product: inputs rounded to bf16, products accumulated in
// fp32 (as a GPU trains under bf16 autocast). Two kernels with those numerics, chosen at run
// time: oneDNN's matmul on the CPU's bf16 instructions (AVX512-BF16, AMX) where it has them,
// else a portable one (the bf16 operands widened to fp32, an fp32 product) at fp32 speed
// (oneDNN 2.6 has no bf16 matmul below AVX-512). Used by CpuOps with CpuMatmul::Bf16 for the
// projections; the fp32 path stays the reference for exactness.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/cpu/cpu_features.h"

namespace tl::cpu {

// C[m,n] = op(A)·op(B) + beta·C, row-major, op(X) = Xᵀ when the flag is set; A and B are
// fp32 and rounded to bf16 (nearest-even) on the way in, C is fp32.
void gemm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
               int64_t ldb, float beta, float* c, int64_t ldc);

// The same product from bf16 operands (pack_bf16, or weights held in bf16), each in its stored
// orientation with its leading dimension: A is [m,k] ([k,m] when ta), B is [k,n] ([n,k] when tb).
void gemm_bf16_packed(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const uint16_t* a16, int64_t lda,
                      const uint16_t* b16, int64_t ldb, float beta, float* c, int64_t ldc);
// Without padding: lda and ldb are the stored rows' lengths.
inline void gemm_bf16_packed(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const uint16_t* a16,
                             const uint16_t* b16, float beta, float* c, int64_t ldc) {
  gemm_bf16_packed(ta, tb, m, n, k, a16, ta ? m : k, b16, tb ? k : n, beta, c, ldc);
}

// rows × cols of `src` (leading dimension ld) → bf16 [rows, cols] at the start of `out`,
// nearest-even; `out` only grows (it may be longer than rows × cols).
void pack_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld, std::vector<uint16_t>& out);

// Which kernel gemm_bf16 runs: OneDnn where native_bf16() (cpu_features.h), else Portable.
enum class Bf16Kernel { Auto, OneDnn, Portable };
Bf16Kernel bf16_kernel();

// Tests: runs every product of this process on kernel `k` for the guard's lifetime (OneDnn
// throws in a build without oneDNN; on a CPU without AVX-512 oneDNN then fails its products).
class ScopedBf16Kernel {
 public:
  explicit ScopedBf16Kernel(Bf16Kernel k);
  ~ScopedBf16Kernel();
  ScopedBf16Kernel(const ScopedBf16Kernel&) = delete;
  ScopedBf16Kernel& operator=(const ScopedBf16Kernel&) = delete;

 private:
  Bf16Kernel previous_;
};

}  // namespace tl::cpu
