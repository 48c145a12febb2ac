// cuBLASLt bf16 GEMMs with cached descriptors and heuristics (see gemm_lt.h).
#include "cuda/gemm_lt.h"

#include <string>

#include "cuda/cuda_util.cuh"

namespace tl::cuda {

namespace {

// 32 MiB: what cuBLAS itself reserves per handle on Hopper; enough for split-K algorithms.
constexpr size_t kWorkspaceBytes = size_t(32) << 20;

// cuBLASLt's own status type is cublasStatus_t, checked like cuBLAS calls.
#define TL_LT_CHECK(call) ::tl::cuda::check((call), #call, __FILE__, __LINE__)

// Largest power of two (up to 256) dividing the address: what the heuristic must assume.
int64_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int64_t al = 256;
  while (al > 1 && a % uintptr_t(al) != 0) al /= 2;
  return al;
}

}  // namespace

LtGemm::LtGemm() {
  TL_LT_CHECK(cublasLtCreate(&handle_));
  workspace_ = device_alloc(kWorkspaceBytes);
}

LtGemm::~LtGemm() {
  for (auto& [key, p] : plans_) {
    (void)cublasLtMatrixLayoutDestroy(p.a);
    (void)cublasLtMatrixLayoutDestroy(p.b);
    (void)cublasLtMatrixLayoutDestroy(p.c);
    (void)cublasLtMatmulDescDestroy(p.desc);
  }
  if (handle_) (void)cublasLtDestroy(handle_);
}

LtGemm::Plan& LtGemm::plan(const Key& key) {
  if (auto it = plans_.find(key); it != plans_.end()) return it->second;
  const auto [type, ta, tb, m, n, k, lda, ldb, ldc, al_a, al_b, al_c] = key;
  const bool f64 = type == int64_t(LtType::F64);
  const bool bf16_in = type == int64_t(LtType::Bf16F32) || type == int64_t(LtType::Bf16Bf16);
  const cudaDataType_t in_t = f64 ? CUDA_R_64F : bf16_in ? CUDA_R_16BF : CUDA_R_32F;
  const cudaDataType_t out_t = f64 ? CUDA_R_64F : type == int64_t(LtType::Bf16Bf16) ? CUDA_R_16BF : CUDA_R_32F;
  // The scale type (of alpha and beta) follows the compute type, not C's: fp32 for bf16 C.
  const cudaDataType_t scale_t = f64 ? CUDA_R_64F : CUDA_R_32F;
  Plan p;
  TL_LT_CHECK(cublasLtMatmulDescCreate(&p.desc, f64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F, scale_t));
  const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  TL_LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
  TL_LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
  // Stored (column-major) shapes: op(A) is m×k, so A is k×m when transposed.
  TL_LT_CHECK(cublasLtMatrixLayoutCreate(&p.a, in_t, uint64_t(ta ? k : m), uint64_t(ta ? m : k), lda));
  TL_LT_CHECK(cublasLtMatrixLayoutCreate(&p.b, in_t, uint64_t(tb ? n : k), uint64_t(tb ? k : n), ldb));
  TL_LT_CHECK(cublasLtMatrixLayoutCreate(&p.c, out_t, uint64_t(m), uint64_t(n), ldc));

  cublasLtMatmulPreference_t pref = nullptr;
  TL_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kWorkspaceBytes;
  const uint32_t aa = uint32_t(al_a), ab = uint32_t(al_b), ac = uint32_t(al_c);
  TL_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  TL_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof(aa)));
  TL_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof(ab)));
  TL_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof(ac)));
  TL_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof(ac)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
  (void)cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
    (void)cublasLtMatrixLayoutDestroy(p.a);
    (void)cublasLtMatrixLayoutDestroy(p.b);
    (void)cublasLtMatrixLayoutDestroy(p.c);
    (void)cublasLtMatmulDescDestroy(p.desc);
    throw std::runtime_error("cuBLASLt: no algorithm for type " + std::to_string(type) + " m=" + std::to_string(m) + " n=" + std::to_string(n) +
                             " k=" + std::to_string(k) + " (" + cublasGetStatusName(st) + ")");
  }
  p.algo = result.algo;
  return plans_.emplace(key, p).first->second;
}

void LtGemm::run(LtType type, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                 const void* b, int64_t ldb, double beta, void* c, int64_t ldc, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  const Plan& p =
      plan({int64_t(type), ta, tb, m, n, k, lda, ldb, ldc, alignment(a), alignment(b), alignment(c)});
  // alpha and beta in the scale type: double for F64, float otherwise.
  const double alpha_d = 1.0, beta_d = beta;
  const float alpha_f = 1.0f, beta_f = float(beta);
  const bool f64 = type == LtType::F64;
  TL_LT_CHECK(cublasLtMatmul(handle_, p.desc, f64 ? static_cast<const void*>(&alpha_d) : &alpha_f, a, p.a, b, p.b,
                             f64 ? static_cast<const void*>(&beta_d) : &beta_f, c, p.c, c, p.c, &p.algo,
                             workspace_.get(), kWorkspaceBytes, stream));
}

}  // namespace tl::cuda
