// The CPU backend's fp32 and fp64 matrix products: OpenBLAS where the build has it (the
// OpenMP build, sharing our threads), else plain loops, which are enough for a build whose
// CPU products are only a reference (the GPU bundle, where the test shapes are small).
#include "core/cpu/cpu_util.h"

#include <vector>

#if defined(TL_HAVE_OPENBLAS)
#include <cblas.h>
#endif

namespace tl::cpu {

#if defined(TL_HAVE_OPENBLAS)

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m), int(n),
              int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m), int(n),
              int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

#else

namespace {

// Row i of C: c ← beta·c + alpha·Σ_p A(i,p)·B(p,:), with B given row-major [k, n] (ld n).
// As BLAS does, beta = 0 overwrites C without reading it (NaN in C does not survive).
template <class T>
void gemm_loops(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                int64_t ldb, T beta, T* c, int64_t ldc) {
  std::vector<T> bt;  // op(B) made contiguous [k, n] once, so the inner loop runs along rows
  const T* brows = b;
  int64_t ldbr = ldb;
  if (tb) {
    bt.resize(size_t(k * n));
    for (int64_t j = 0; j < n; ++j)
      for (int64_t p = 0; p < k; ++p) bt[size_t(p * n + j)] = b[j * ldb + p];
    brows = bt.data();
    ldbr = n;
  }
#pragma omp parallel for schedule(static) if (m * n * k >= (int64_t(1) << 18))
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    if (beta == T(0))
      for (int64_t j = 0; j < n; ++j) ci[j] = T(0);
    else if (beta != T(1))
      for (int64_t j = 0; j < n; ++j) ci[j] *= beta;
    for (int64_t p = 0; p < k; ++p) {
      const T aip = alpha * (ta ? a[p * lda + i] : a[i * lda + p]);
      const T* bp = brows + p * ldbr;
      for (int64_t j = 0; j < n; ++j) ci[j] += aip * bp[j];
    }
  }
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_loops(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_loops(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

#endif

}  // namespace tl::cpu
