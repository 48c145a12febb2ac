#include "core/cpu/gemm_bf16.h"

#include <map>
#include <stdexcept>
#include <mutex>
#include <tuple>
#include <vector>

#if defined(TL_HAVE_ONEDNN)
#include <oneapi/dnnl/dnnl.hpp>
#endif

#include "core/cpu/cpu_util.h"
#include "core/half.h"

namespace tl::cpu {

namespace {

Bf16Kernel& forced_kernel() {
  static Bf16Kernel k = Bf16Kernel::Auto;
  return k;
}

// The portable kernel: the bf16 operands widened to fp32 (exactly), then an fp32 product. A
// product of two bf16 values is exact in fp32 (8 + 8 significant bits), so this is "bf16
// inputs, fp32 sums" as oneDNN computes it; only the order of the sums may differ.
void widen(const uint16_t* src, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& out) {
  if (out.size() < size_t(rows * cols)) out.resize(size_t(rows * cols));
  float* o = out.data();
#pragma omp parallel for schedule(static) if (rows * cols >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = bf16_to_float(src[r * ld + c]);
}

void gemm_bf16_portable(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const uint16_t* a16, int64_t lda,
                        const uint16_t* b16, int64_t ldb, float beta, float* c, int64_t ldc) {
  thread_local std::vector<float> a32, b32;
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
  widen(a16, a_rows, a_cols, lda, a32);
  widen(b16, b_rows, b_cols, ldb, b32);
  gemm(ta, tb, m, n, k, 1.0f, a32.data(), a_cols, b32.data(), b_cols, beta, c, ldc);
}

}  // namespace

Bf16Kernel bf16_kernel() {
  if (forced_kernel() != Bf16Kernel::Auto) return forced_kernel();
  return native_bf16() ? Bf16Kernel::OneDnn : Bf16Kernel::Portable;
}

ScopedBf16Kernel::ScopedBf16Kernel(Bf16Kernel k) : previous_(forced_kernel()) {
#if !defined(TL_HAVE_ONEDNN)
  if (k == Bf16Kernel::OneDnn) throw std::invalid_argument("gemm_bf16: this build has no oneDNN kernel");
#endif
  forced_kernel() = k;
}
ScopedBf16Kernel::~ScopedBf16Kernel() { forced_kernel() = previous_; }

void pack_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld, std::vector<uint16_t>& out) {
  // Grow only: a thread's buffer serves products of several sizes in turn, and shrinking
  // then growing it again would zero-fill the new part on every call.
  if (out.size() < size_t(rows * cols)) out.resize(size_t(rows * cols));
  uint16_t* o = out.data();
#pragma omp parallel for schedule(static) if(rows * cols >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = float_to_bf16(src[r * ld + c]);
}

#if defined(TL_HAVE_ONEDNN)
namespace {

using dt = dnnl::memory::data_type;

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

}  // namespace

namespace {

// One matmul primitive per shape, with its operand descriptions: oneDNN's descriptor
// creation is too slow to repeat for every call, and a training step uses a handful of
// shapes over and over.
// The scratchpad is the caller's (scratchpad_mode::user, one buffer per thread), so that
// OpenMP tasks (attention's heads) may run the same primitive at once: with the library's
// own scratchpad they would share it.
struct Matmul {
  dnnl::memory::desc a, b, c, scratch;
  dnnl::matmul primitive;
};
using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool>;

const Matmul& matmul_for(bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                         bool accumulate) {
  static std::map<Key, Matmul> cache;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  const Key key{ta, tb, m, n, k, lda, ldb, ldc, accumulate};
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  // Logical A [m,k], B [k,n], C [m,n]; the buffers keep the stored orientation, so a
  // transposed operand is described by swapped strides.
  Matmul mm;
  mm.a = dnnl::memory::desc({m, k}, dt::bf16, ta ? dnnl::memory::dims{1, lda} : dnnl::memory::dims{lda, 1});
  mm.b = dnnl::memory::desc({k, n}, dt::bf16, tb ? dnnl::memory::dims{1, ldb} : dnnl::memory::dims{ldb, 1});
  mm.c = dnnl::memory::desc({m, n}, dt::f32, dnnl::memory::dims{ldc, 1});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (accumulate) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(mm.a, mm.b, mm.c), attr, engine());
  mm.scratch = pd.scratchpad_desc();
  mm.primitive = dnnl::matmul(pd);
  return cache.emplace(key, std::move(mm)).first->second;
}

void gemm_bf16_onednn(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const uint16_t* a16, int64_t lda,
                      const uint16_t* b16, int64_t ldb, float beta, float* c, int64_t ldc) {
  const Matmul& mm = matmul_for(ta, tb, m, n, k, lda, ldb, ldc, beta != 0.0f);
  dnnl::memory am(mm.a, engine(), const_cast<uint16_t*>(a16)), bm(mm.b, engine(), const_cast<uint16_t*>(b16)),
      cm(mm.c, engine(), c);
  thread_local dnnl::stream stream(engine());  // attention calls this from OpenMP tasks
  thread_local std::vector<uint8_t> scratch;
  if (scratch.size() < mm.scratch.get_size()) scratch.resize(mm.scratch.get_size());
  dnnl::memory sm(mm.scratch, engine(), scratch.data());
  mm.primitive.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}, {DNNL_ARG_SCRATCHPAD, sm}});
  stream.wait();
}

}  // namespace
#endif

void gemm_bf16_packed(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const uint16_t* a16, int64_t lda,
                      const uint16_t* b16, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (beta != 0.0f && beta != 1.0f) throw std::invalid_argument("gemm_bf16: beta must be 0 or 1");
#if defined(TL_HAVE_ONEDNN)
  if (bf16_kernel() == Bf16Kernel::OneDnn) return gemm_bf16_onednn(ta, tb, m, n, k, a16, lda, b16, ldb, beta, c, ldc);
#endif
  gemm_bf16_portable(ta, tb, m, n, k, a16, lda, b16, ldb, beta, c, ldc);
}

void gemm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
               int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  thread_local std::vector<uint16_t> a16, b16;
  pack_bf16(a, ta ? k : m, ta ? m : k, lda, a16);
  pack_bf16(b, tb ? n : k, tb ? k : n, ldb, b16);
  gemm_bf16_packed(ta, tb, m, n, k, a16.data(), b16.data(), beta, c, ldc);
}

}  // namespace tl::cpu
