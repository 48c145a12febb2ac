// The CPU backend's fast matrix product: inputs rounded to bf16, products accumulated in
// fp32 (as a GPU trains under bf16 autocast), computed by oneDNN's matmul, which uses the
// CPU's bf16 instructions (AVX512-BF16, AMX) where it has them. Used by CpuOps with
// CpuMatmul::Bf16 for the projections; the fp32 path stays the reference for exactness.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

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

// Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), and oneDNN's name for
// the instruction set it will use. Without them oneDNN emulates bf16, slower than fp32.
bool native_bf16();
std::string cpu_isa_name();

}  // namespace tl::cpu
