#include "core/cpu/cpu_ops.h"
#include "core/cpu/gemm_bf16.h"
#include "core/cpu/vector_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "core/cpu/cpu_util.h"
#include "core/half.h"
#include "core/math.h"

namespace tl {

using cpu::dispatch;
using cpu::require;

CpuOps::CpuOps(DType act, CpuMatmul matmul) : act_(act), matmul_(matmul) {
  require(act == DType::F32 || act == DType::F64, "activation dtype must be F32 or F64");
  require(matmul == CpuMatmul::F32 || act == DType::F32, "bf16 matmul needs F32 activations");
}

void CpuOps::hold_matmul_input(const Tensor& x) {
  HeldInput h;
  if (x.dtype() == DType::F32) {
    h.data = static_cast<const float*>(x.raw());
    h.numel = x.numel();
  }
  held_.push_back(std::move(h));
}

void CpuOps::release_matmul_input() {
  require(!held_.empty(), "release_matmul_input without a hold");
  held_.pop_back();
}

const uint16_t* CpuOps::as_bf16(const float* p, int64_t rows, int64_t cols, int64_t ld,
                                std::vector<uint16_t>& scratch) const {
  if (ld == cols)
    for (HeldInput& h : held_)
      if (h.data == p && h.numel == rows * cols) {
        if (h.bf16.empty()) cpu::pack_bf16(p, rows, cols, cols, h.bf16);
        return h.bf16.data();
      }
  cpu::pack_bf16(p, rows, cols, ld, scratch);
  return scratch.data();
}

void CpuOps::gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float beta, float* c, int64_t ldc) const {
  if (!bf16_for(m * n * k)) return cpu::gemm(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  thread_local std::vector<uint16_t> a16, b16;
  // A is stored [m,k] ([k,m] when ta), B [k,n] ([n,k] when tb).
  const uint16_t* pa = as_bf16(a, ta ? k : m, ta ? m : k, lda, a16);
  const uint16_t* pb = as_bf16(b, tb ? n : k, tb ? k : n, ldb, b16);
  cpu::gemm_bf16_packed(ta, tb, m, n, k, pa, pb, beta, c, ldc);
}

void CpuOps::gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
                  int64_t ldb, double beta, double* c, int64_t ldc) const {
  cpu::gemm(ta, tb, m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc);
}

Tensor CpuOps::zeros(Shape shape, DType dtype) { return Tensor::zeros(std::move(shape), dtype); }
Tensor CpuOps::empty(Shape shape, DType dtype) { return Tensor::uninitialized(std::move(shape), dtype); }
Tensor CpuOps::upload(const Tensor& host, DType dtype) { return host.to(dtype); }
Tensor CpuOps::download(const Tensor& t) { return t.clone(); }

void CpuOps::linear_forward(const Tensor& x, const Tensor& w, Tensor& y, bool accumulate) {
  const bool frozen_bf16 = w.dtype() == DType::BF16 && x.dtype() == DType::F32;
  require(w.rank() == 2 && (x.dtype() == w.dtype() || frozen_bf16) && y.dtype() == x.dtype(), "linear dtypes/rank");
  int64_t in = w.dim(1), out = w.dim(0);
  require(x.numel() % in == 0, "linear: x width does not match W");
  int64_t n = x.numel() / in;
  require(y.numel() == n * out, "linear: y size");
  if (n == 0) return;
  if (frozen_bf16) {  // a frozen weight held in bf16 (frozen_dtype): only x is rounded here
    thread_local std::vector<uint16_t> x16;
    cpu::gemm_bf16_packed(false, true, n, out, in, as_bf16(x.data<float>(), n, in, in, x16), w.data<uint16_t>(),
                          accumulate ? 1.0f : 0.0f, y.data<float>(), out);
    return;
  }
  dispatch(x.dtype(), [&]<class T>() {
    // y[n,out] = x[n,in]·W[out,in]ᵀ
    gemm(false, true, n, out, in, x.data<T>(), in, w.data<T>(), in, accumulate ? T(1) : T(0), y.data<T>(), out);
  });
}

namespace {
// out[i,:] = read(table[ids[i],:])·s, where `read` turns a stored element into T (the
// identity, or bf16 → fp32 for a frozen table held in bf16).
template <class T, class Stored, class Read>
void gather_scaled_rows(const Stored* table, int64_t v, int64_t d, const int32_t* ids, int64_t n, T s, T* out,
                        Read read) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= v) throw std::out_of_range("token id " + std::to_string(id) + " outside vocab of " + std::to_string(v));
    const Stored* src = table + int64_t(id) * d;
    T* dst = out + i * d;
    for (int64_t j = 0; j < d; ++j) dst[j] = read(src[j]) * s;
  }
}
}  // namespace

void CpuOps::embedding_forward(const Tensor& table, const Tensor& ids, double scale, Tensor& out) {
  require(table.rank() == 2 && ids.dtype() == DType::I32, "embedding args");
  int64_t v = table.dim(0), d = table.dim(1), n = ids.numel();
  require(out.numel() == n * d, "embedding out");
  if (table.dtype() == DType::BF16 && out.dtype() == DType::F32) {  // a frozen table held in bf16
    gather_scaled_rows(table.data<uint16_t>(), v, d, ids.data<int32_t>(), n, float(scale), out.data<float>(),
                       [](uint16_t b) { return bf16_to_float(b); });
    return;
  }
  require(out.dtype() == table.dtype(), "embedding out dtype");
  dispatch(table.dtype(), [&]<class T>() {
    gather_scaled_rows(table.data<T>(), v, d, ids.data<int32_t>(), n, T(scale), out.data<T>(), [](T x) { return x; });
  });
}

void CpuOps::rmsnorm_forward(const Tensor& x, const Tensor& w, int64_t width, double eps, Tensor& y) {
  int64_t d = w.defined() ? w.numel() : width;
  require(d > 0 && x.numel() % d == 0 && y.numel() == x.numel(), "rmsnorm shapes");
  int64_t rows = x.numel() / d;
  dispatch(x.dtype(), [&]<class T>() {
    const T* wp = w.defined() ? w.data<T>() : nullptr;
#pragma omp parallel for schedule(static) if(x.numel() >= cpu::kParallelMin)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x.data<T>() + r * d;
      T* yr = y.data<T>() + r * d;
      double ss = 0;
#pragma omp simd reduction(+ : ss)  // double: reordering moves it ~1e-16, far below fp32
      for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * double(xr[j]);
      // HF: x · pow(mean(x²) + eps, -0.5) · w, in fp32.
      T rstd = T(1.0 / std::sqrt(ss / double(d) + eps));
      for (int64_t j = 0; j < d; ++j) yr[j] = wp ? xr[j] * rstd * wp[j] : xr[j] * rstd;
    }
  });
}

namespace cpu {
void rope_rotate(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq, bool inverse) {
  const int64_t half = inv_freq.numel(), d = 2 * half, n = positions.numel();
  require(x.numel() == n * heads * d && inv_freq.dtype() == DType::F64, "rope shapes");
  dispatch(x.dtype(), [&]<class T>() {
#pragma omp parallel for schedule(static) if(x.numel() >= cpu::kParallelMin)
    for (int64_t t = 0; t < n; ++t) {
      // θ = pos·inv_freq and cos/sin in the activation dtype: fp32 as HF computes them for
      // fp32 and bf16 models; fp64 in our F64 mode (the golden fp64 run lifts HF's too).
      T pos = T(positions.data<int32_t>()[t]);
      for (int64_t i = 0; i < half; ++i) {
        T theta = pos * T(inv_freq.data<double>()[i]);
        T c = std::cos(theta), s = inverse ? -std::sin(theta) : std::sin(theta);
        for (int64_t h = 0; h < heads; ++h) {
          T* p = x.data<T>() + (t * heads + h) * d;
          T a = p[i], b = p[i + half];
          p[i] = a * c - b * s;
          p[i + half] = b * c + a * s;
        }
      }
    }
  });
}
}  // namespace cpu

void CpuOps::rope_forward(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq) {
  cpu::rope_rotate(x, heads, positions, inv_freq, false);
}

void CpuOps::gelu_tanh_mul_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  require(gate.numel() == up.numel() && out.numel() == up.numel(), "gelu_mul sizes");
  dispatch(gate.dtype(), [&]<class T>() {
    const T* g = gate.data<T>();
    const T* u = up.data<T>();
    T* o = out.data<T>();
    int64_t n = gate.numel();
    if constexpr (std::is_same_v<T, float>) {
#pragma omp parallel for simd schedule(static) if(n >= cpu::kParallelMin)
      for (int64_t i = 0; i < n; ++i) {
        float s;
        o[i] = cpu::gelu_tanh_sigmoid(g[i], s) * u[i];
      }
    } else {
#pragma omp parallel for schedule(static) if(n >= cpu::kParallelMin)
      for (int64_t i = 0; i < n; ++i) o[i] = gelu_tanh(g[i]) * u[i];
    }
  });
}

void CpuOps::add(const Tensor& a, const Tensor& b, Tensor& out) {
  require(a.numel() == b.numel() && out.numel() == a.numel(), "add sizes");
  dispatch(a.dtype(), [&]<class T>() {
    const int64_t n = a.numel();
    const T *pa = a.data<T>(), *pb = b.data<T>();
    T* po = out.data<T>();
#pragma omp parallel for simd schedule(static) if(n >= cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) po[i] = pa[i] + pb[i];
  });
}

void CpuOps::mul(const Tensor& a, const Tensor& b, Tensor& out) {
  require(a.numel() == b.numel() && out.numel() == a.numel(), "mul sizes");
  dispatch(a.dtype(), [&]<class T>() {
    const int64_t n = a.numel();
    const T *pa = a.data<T>(), *pb = b.data<T>();
    T* po = out.data<T>();
#pragma omp parallel for simd schedule(static) if(n >= cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) po[i] = pa[i] * pb[i];
  });
}

void CpuOps::scale(Tensor& x, double s) {
  dispatch(x.dtype(), [&]<class T>() {
    const int64_t n = x.numel();
    const T st = T(s);
    T* px = x.data<T>();
#pragma omp parallel for simd schedule(static) if(n >= cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) px[i] *= st;
  });
}

void CpuOps::fill(Tensor& x, double value) {
  dispatch(x.dtype(), [&]<class T>() {
    const int64_t n = x.numel();
    const T v = T(value);
    T* px = x.data<T>();
#pragma omp parallel for simd schedule(static) if(n >= cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) px[i] = v;
  });
}

void CpuOps::scale_rows(Tensor& x, const Tensor& s) {
  const int64_t m = s.numel(), d = m ? x.numel() / m : 0;
  require(x.numel() == m * d, "scale_rows sizes");
  dispatch(x.dtype(), [&]<class T>() {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < d; ++j) x.data<T>()[i * d + j] *= s.data<T>()[i];
  });
}

void CpuOps::softcap_forward(Tensor& x, double cap) {
  dispatch(x.dtype(), [&]<class T>() {
    int64_t n = x.numel();
    T* p = x.data<T>();
    if constexpr (std::is_same_v<T, float>) {  // the logits: [tokens, 262144] on Gemma 4
      const float c = float(cap);
#pragma omp parallel for schedule(static) if(n >= cpu::kParallelMin)
      for (int64_t i = 0; i < n; ++i) p[i] = c * cpu::tanh_f32(p[i] / c);
    } else {
#pragma omp parallel for schedule(static) if(n >= cpu::kParallelMin)
      for (int64_t i = 0; i < n; ++i) p[i] = softcap(p[i], T(cap));
    }
  });
}

void CpuOps::copy_columns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t w) {
  require(src.rank() == 2 && dst.rank() == 2 && src.dim(0) == dst.dim(0), "copy_columns shapes");
  require(src_col + w <= src.dim(1) && dst_col + w <= dst.dim(1), "copy_columns range");
  size_t es = dtype_size(src.dtype());
  for (int64_t r = 0; r < src.dim(0); ++r)
    std::memcpy(static_cast<char*>(dst.raw()) + (r * dst.dim(1) + dst_col) * es,
                static_cast<const char*>(src.raw()) + (r * src.dim(1) + src_col) * es, size_t(w) * es);
}

void CpuOps::moe_route_forward(const Tensor& logits, const Tensor& per_expert_scale, int64_t k,
                               Tensor& weights, Tensor& idx) {
  int64_t n = logits.dim(0), e = logits.dim(1);
  require(k <= e && weights.numel() == n * k && idx.numel() == n * k && idx.dtype() == DType::I32,
          "moe_route shapes");
  dispatch(logits.dtype(), [&]<class T>() {
    std::vector<T> p(static_cast<size_t>(e));
    std::vector<int32_t> order(static_cast<size_t>(e));
    for (int64_t t = 0; t < n; ++t) {
      const T* l = logits.data<T>() + t * e;
      T mx = *std::max_element(l, l + e);
      T z = 0;
      for (int64_t j = 0; j < e; ++j) z += (p[size_t(j)] = std::exp(l[j] - mx));
      for (int64_t j = 0; j < e; ++j) p[size_t(j)] /= z;
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)]; });
      T top = 0;
      for (int64_t j = 0; j < k; ++j) top += p[size_t(order[size_t(j)])];
      for (int64_t j = 0; j < k; ++j) {
        int32_t ex = order[size_t(j)];
        idx.data<int32_t>()[t * k + j] = ex;
        weights.data<T>()[t * k + j] = p[size_t(ex)] / top * per_expert_scale.data<T>()[ex];
      }
    }
  });
}

void CpuOps::gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) {
  int64_t d = src.dim(-1), m = rows.numel();
  require(out.numel() == m * d, "gather_rows out");
  size_t bytes = size_t(d) * dtype_size(src.dtype());
  for (int64_t i = 0; i < m; ++i)
    std::memcpy(static_cast<char*>(out.raw()) + size_t(i) * bytes,
                static_cast<const char*>(src.raw()) + size_t(rows.data<int32_t>()[i]) * bytes, bytes);
}

void CpuOps::scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, Tensor& dst) {
  int64_t d = dst.dim(-1), m = rows.numel();
  require(src.numel() == m * d && scale.numel() == m, "scatter_add_rows shapes");
  dispatch(dst.dtype(), [&]<class T>() {
    for (int64_t i = 0; i < m; ++i) {
      T* out = dst.data<T>() + int64_t(rows.data<int32_t>()[i]) * d;
      const T* in = src.data<T>() + i * d;
      T s = scale.data<T>()[i];
      for (int64_t j = 0; j < d; ++j) out[j] += s * in[j];
    }
  });
}

double CpuOps::cross_entropy_sum(const Tensor& logits, const Tensor& labels, int64_t& count) {
  int64_t n = labels.numel(), v = logits.dim(-1);
  require(logits.numel() == n * v && labels.dtype() == DType::I32, "cross_entropy shapes");
  double total = 0;
  count = 0;
  dispatch(logits.dtype(), [&]<class T>() {
    for (int64_t t = 0; t < n; ++t) {
      int32_t y = labels.data<int32_t>()[t];
      if (y == -100) continue;
      if (y < 0 || y >= v) throw std::out_of_range("label " + std::to_string(y) + " outside vocab");
      const T* l = logits.data<T>() + t * v;
      double mx = *std::max_element(l, l + v), z = 0;
      if constexpr (std::is_same_v<T, float>) {
        double lane[16] = {};  // fixed lanes, as cpu::sum_as_double: vectorizes, same sum every run
        const float mxf = float(mx);
        int64_t j = 0;
        for (; j + 16 <= v; j += 16)
          for (int k = 0; k < 16; ++k) lane[k] += double(cpu::exp_f32(l[j + k] - mxf));
        for (; j < v; ++j) lane[j % 16] += double(cpu::exp_f32(l[j] - mxf));
        for (double e : lane) z += e;
      } else {
        for (int64_t j = 0; j < v; ++j) z += std::exp(double(l[j]) - mx);
      }
      total += mx + std::log(z) - double(l[y]);
      ++count;
    }
  });
  return total;
}


void CpuOps::dropout_mask(uint64_t seed, double p, Tensor& mask) {
  dispatch(mask.dtype(), [&]<class T>() {
    T* m = mask.data<T>();
    for (int64_t i = 0; i < mask.numel(); ++i) m[i] = T(dropout_keep(seed, i, p));
  });
}

namespace {
// Σ x², in double, in index order.
double sum_squares(const Tensor& x) {
  double sq = 0;
  dispatch(x.dtype(), [&]<class T>() {
    for (int64_t i = 0; i < x.numel(); ++i) sq += double(x.data<T>()[i]) * double(x.data<T>()[i]);
  });
  return sq;
}
}  // namespace

double CpuOps::norm2(const Tensor& x) { return std::sqrt(sum_squares(x)); }

void CpuOps::add_sum_squares(const Tensor& x, Tensor& acc, int64_t index) {
  require(acc.dtype() == DType::F64 && index >= 0 && index < acc.numel(), "add_sum_squares acc must be F64 [> index]");
  acc.data<double>()[index] += sum_squares(x);
}

void CpuOps::adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                    double eps, double wd, double bc1, double bc2, double grad_scale) {
  require(p.numel() == g.numel() && m.numel() == p.numel() && v.numel() == p.numel(), "adamw sizes");
  dispatch(p.dtype(), [&]<class T>() {
    // Scalars as torch's single-tensor path forms them: step_size = lr/bc1, √bc2 in double.
    const T decay = T(1.0 - lr * wd), b1 = T(beta1), b2 = T(beta2), step_size = T(lr / bc1),
            sqrt_bc2 = T(std::sqrt(bc2)), e = T(eps), gs = T(grad_scale);
    T *pp = p.data<T>(), *mp = m.data<T>(), *vp = v.data<T>();
    const T* gp = g.data<T>();
    for (int64_t i = 0; i < p.numel(); ++i) {
      const T gi = gp[i] * gs;  // grad.mul_(clip_coef), rounded to T
      pp[i] *= decay;
      mp[i] = mp[i] + (gi - mp[i]) * (T(1) - b1);  // m.lerp_(g, 1−β1)
      vp[i] = vp[i] * b2 + gi * gi * (T(1) - b2);
      const T denom = std::sqrt(vp[i]) / sqrt_bc2 + e;
      pp[i] -= step_size * mp[i] / denom;
    }
  });
}

}  // namespace tl
