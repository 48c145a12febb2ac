// GEMMs through cuBLASLt:  C[m,n] = op(A)·op(B) + beta·C   (column-major, as cublasSgemm)
//   Bf16F32:  A, B bf16, C fp32, fp32 compute and scale (tensor cores);
//   Bf16Bf16: A, B, C bf16, fp32 compute and scale: op(A)·op(B) + beta·C is formed in fp32
//             and rounded to bf16 once (bf16 activations);
//   F32 / F64: everything in that type.
// A training step multiplies a handful of shapes over and over, so each shape's matmul
// descriptor, matrix layouts and the heuristic's algorithm are made once and cached.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>

namespace tl::cuda {

enum class LtType { Bf16F32, Bf16Bf16, F32, F64 };

class LtGemm {
 public:
  LtGemm();
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  void run(LtType type, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
           const void* b, int64_t ldb, double beta, void* c, int64_t ldc, cudaStream_t stream);
  size_t cached() const { return plans_.size(); }

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  // (type, ta, tb, m, n, k, lda, ldb, ldc, alignment of A, B, C in bytes): the algorithm
  // the heuristic picks depends on the pointers' alignment, so it is part of the shape.
  using Key = std::array<int64_t, 12>;
  Plan& plan(const Key& key);

  cublasLtHandle_t handle_ = nullptr;
  std::shared_ptr<void> workspace_;
  std::map<Key, Plan> plans_;
};

}  // namespace tl::cuda
