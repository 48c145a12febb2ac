// Backward of every CpuOps primitive; each adds into the gradients it is given.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/gemm_bf16.h"
#include "core/cpu/vector_math.h"
#include "core/cpu/cpu_util.h"
#include "core/math.h"

namespace tl {

using cpu::dispatch;
using cpu::require;

void CpuOps::linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw) {
  const int64_t in = w.dim(1), out = w.dim(0), n = x.numel() / in;
  require(dy.numel() == n * out, "linear_backward: dy size");
  if (n == 0) return;
  if (w.dtype() == DType::BF16) {  // a frozen weight held in bf16 (frozen_dtype): dx only
    require(!dw.defined(), "linear_backward: a weight held in bf16 is frozen and has no gradient");
    require(dy.dtype() == DType::F32 && (!dx.defined() || dx.dtype() == DType::F32), "linear_backward dtypes");
    if (!dx.defined()) return;
    thread_local std::vector<uint16_t> dy16;
    cpu::gemm_bf16_packed(false, false, n, in, out, as_bf16(dy.data<float>(), n, out, out, dy16),
                          w.data<uint16_t>(), 1.0f, dx.data<float>(), in);
    return;
  }
  dispatch(x.dtype(), [&]<class T>() {
    // dx[n,in] += dy[n,out]·W[out,in]
    if (dx.defined()) gemm(false, false, n, in, out, dy.data<T>(), out, w.data<T>(), in, T(1), dx.data<T>(), in);
    // dW[out,in] += dy[n,out]ᵀ·x[n,in]
    if (dw.defined()) gemm(true, false, out, in, n, dy.data<T>(), out, x.data<T>(), in, T(1), dw.data<T>(), in);
  });
}

void CpuOps::embedding_backward(const Tensor& ids, const Tensor& dout, double scale, int64_t skip_id,
                                Tensor& dtable) {
  if (!dtable.defined()) return;
  const int64_t d = dtable.dim(1), n = ids.numel();
  require(dout.numel() == n * d, "embedding_backward sizes");
  dispatch(dtable.dtype(), [&]<class T>() {
    for (int64_t i = 0; i < n; ++i) {
      int32_t id = ids.data<int32_t>()[i];
      if (id == skip_id) continue;
      T* dst = dtable.data<T>() + int64_t(id) * d;
      const T* src = dout.data<T>() + i * d;
      for (int64_t j = 0; j < d; ++j) dst[j] += T(scale) * src[j];
    }
  });
}

void CpuOps::rmsnorm_backward(const Tensor& x, const Tensor& w, int64_t width, double eps, const Tensor& dy,
                              Tensor& dx, Tensor& dw) {
  const int64_t d = w.defined() ? w.numel() : width, rows = x.numel() / d;
  require(dy.numel() == x.numel(), "rmsnorm_backward sizes");
  dispatch(x.dtype(), [&]<class T>() {
    const T* wp = w.defined() ? w.data<T>() : nullptr;
    // Per-thread dw partials, summed at the end (rows are split across threads).
    std::vector<double> dw_acc(dw.defined() ? size_t(d) : 0, 0.0);
#pragma omp parallel if(x.numel() >= cpu::kParallelMin)
    {
      std::vector<double> local(dw_acc.size(), 0.0);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x.data<T>() + r * d;
        const T* gr = dy.data<T>() + r * d;
        double ss = 0, dot = 0;
#pragma omp simd reduction(+ : ss)  // double: reordering moves it ~1e-16, far below fp32
        for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * double(xr[j]);
        const double rstd = 1.0 / std::sqrt(ss / double(d) + eps);
        if (wp) {
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < d; ++j) dot += double(xr[j]) * double(gr[j]) * double(wp[j]);
        } else {
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < d; ++j) dot += double(xr[j]) * double(gr[j]);
        }
        if (dx.defined()) {
          T* dr = dx.data<T>() + r * d;
          const double c = rstd * rstd * rstd * dot / double(d);
          for (int64_t j = 0; j < d; ++j)
            dr[j] += T(rstd * double(gr[j]) * (wp ? double(wp[j]) : 1.0) - double(xr[j]) * c);
        }
        if (!local.empty())
          for (int64_t j = 0; j < d; ++j) local[size_t(j)] += double(gr[j]) * double(xr[j]) * rstd;
      }
#pragma omp critical
      for (size_t j = 0; j < local.size(); ++j) dw_acc[j] += local[j];
    }
    for (size_t j = 0; j < dw_acc.size(); ++j) dw.data<T>()[j] += T(dw_acc[j]);
  });
}

void CpuOps::rope_backward(Tensor& dx, int64_t heads, const Tensor& positions, const Tensor& inv_freq) {
  cpu::rope_rotate(dx, heads, positions, inv_freq, true);  // Rᵀ: the rotation by −θ
}

void CpuOps::gelu_tanh_mul_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                                    Tensor& dup) {
  require(gate.numel() == up.numel() && dout.numel() == up.numel(), "gelu_mul_backward sizes");
  dispatch(gate.dtype(), [&]<class T>() {
    const int64_t n = gate.numel();
    const T *g = gate.data<T>(), *u = up.data<T>(), *go = dout.data<T>();
    T* dg = dgate.defined() ? dgate.data<T>() : nullptr;
    T* du = dup.defined() ? dup.data<T>() : nullptr;
    if constexpr (std::is_same_v<T, float>) {
      if (dg && du) {
#pragma omp parallel for simd schedule(static) if(n >= cpu::kParallelMin)
        for (int64_t i = 0; i < n; ++i) {
          float s;
          const float gelu = cpu::gelu_tanh_sigmoid(g[i], s);
          dg[i] += go[i] * u[i] * cpu::gelu_tanh_grad_from(g[i], s);
          du[i] += go[i] * gelu;
        }
        return;
      }
    }
#pragma omp parallel for schedule(static) if(n >= cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      if (dg) dg[i] += go[i] * u[i] * gelu_tanh_grad(g[i]);
      if (du) du[i] += go[i] * gelu_tanh(g[i]);
    }
  });
}

void CpuOps::softcap_backward(const Tensor& y, double cap, Tensor& dy) {
  dispatch(y.dtype(), [&]<class T>() {
    const int64_t n = y.numel();
    for (int64_t i = 0; i < n; ++i) {
      T t = y.data<T>()[i] / T(cap);
      dy.data<T>()[i] *= T(1) - t * t;
    }
  });
}

void CpuOps::moe_route_backward(const Tensor& logits, const Tensor& per_expert_scale, const Tensor& idx,
                                const Tensor& dweights, Tensor& dlogits, Tensor& dscale) {
  const int64_t n = logits.dim(0), e = logits.dim(1), k = idx.numel() / n;
  dispatch(logits.dtype(), [&]<class T>() {
    std::vector<double> pt(static_cast<size_t>(k)), dpt(static_cast<size_t>(k));
    for (int64_t t = 0; t < n; ++t) {
      const T* l = logits.data<T>() + t * e;
      const int32_t* ix = idx.data<int32_t>() + t * k;
      // p̃ = softmax over the chosen logits (equal to p_k / Σ_top p).
      double mx = -std::numeric_limits<double>::infinity(), z = 0, dot = 0;
      for (int64_t j = 0; j < k; ++j) mx = std::max(mx, double(l[ix[j]]));
      for (int64_t j = 0; j < k; ++j) z += (pt[size_t(j)] = std::exp(double(l[ix[j]]) - mx));
      for (int64_t j = 0; j < k; ++j) {
        pt[size_t(j)] /= z;
        double dw = double(dweights.data<T>()[t * k + j]);
        dpt[size_t(j)] = dw * double(per_expert_scale.data<T>()[ix[j]]);
        dot += pt[size_t(j)] * dpt[size_t(j)];
        if (dscale.defined()) dscale.data<T>()[ix[j]] += T(dw * pt[size_t(j)]);
      }
      if (dlogits.defined())
        for (int64_t j = 0; j < k; ++j)
          dlogits.data<T>()[t * e + ix[j]] += T(pt[size_t(j)] * (dpt[size_t(j)] - dot));
    }
  });
}

void CpuOps::scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) {
  const int64_t d = dst.dim(-1), m = rows.numel();
  require(src.numel() == m * d, "scatter_rows sizes");
  dispatch(dst.dtype(), [&]<class T>() {
    for (int64_t i = 0; i < m; ++i) {
      T* out = dst.data<T>() + int64_t(rows.data<int32_t>()[i]) * d;
      const T* in = src.data<T>() + i * d;
      for (int64_t j = 0; j < d; ++j) out[j] += in[j];
    }
  });
}

void CpuOps::rowwise_dot(const Tensor& a, const Tensor& rows, const Tensor& b, Tensor& out) {
  const int64_t d = a.dim(-1), m = rows.numel();
  require(a.numel() == m * d && out.numel() == m, "rowwise_dot sizes");
  dispatch(a.dtype(), [&]<class T>() {
    for (int64_t i = 0; i < m; ++i) {
      const T* x = a.data<T>() + i * d;
      const T* y = b.data<T>() + int64_t(rows.data<int32_t>()[i]) * d;
      double acc = 0;
      for (int64_t j = 0; j < d; ++j) acc += double(x[j]) * double(y[j]);
      out.data<T>()[i] = T(acc);
    }
  });
}

void CpuOps::cross_entropy_backward(const Tensor& logits, const Tensor& labels, double grad_scale, double cap,
                                    Tensor& dlogits, Tensor& sums) {
  const int64_t n = labels.numel(), v = logits.dim(-1);
  require(logits.numel() == n * v && dlogits.numel() == n * v, "cross_entropy_backward shapes");
  require(sums.dtype() == DType::F64 && sums.numel() >= 2, "cross_entropy_backward sums must be F64 [2]");
  for (int64_t t = 0; t < n; ++t) {
    const int32_t y = labels.data<int32_t>()[t];
    if (y != -100 && (y < 0 || y >= v)) throw std::out_of_range("label " + std::to_string(y) + " outside vocab");
  }
  // Per-row losses and hits, summed in row order afterwards: the same total whatever the threads.
  std::vector<double> row_loss(size_t(n), 0.0);
  std::vector<char> row_hit(size_t(n), 0);
  dispatch(logits.dtype(), [&]<class T>() {
    // Rows in parallel (a row is a whole vocabulary: 262,144 logits in Gemma 4). Per row,
    // e_j = exp(l_j − max) once, kept in dlogits, z = Σ e_j in double; then
    // dl_j = (e_j / z − [j = y]) · grad_scale · (1 − (l_j/cap)²), the softcap's derivative
    // from the capped logit itself (tanh' = 1 − tanh²). The first maximum is the argmax.
#pragma omp parallel for schedule(dynamic, 1) if(n * v >= cpu::kParallelMin)
    for (int64_t t = 0; t < n; ++t) {
      const int32_t y = labels.data<int32_t>()[t];
      T* g = dlogits.data<T>() + t * v;
      const T* l = logits.data<T>() + t * v;
      if (y == -100) {
        std::fill(g, g + v, T(0));
        continue;
      }
      const T* top = std::max_element(l, l + v);
      row_hit[size_t(t)] = top - l == y;
      const double mx = *top;
      if constexpr (std::is_same_v<T, float>) {
        // fp32 rows: e_j in float through the vectorized exp_f32 (libm's double exp was 8% of
        // the E2B-shaped step), z still summed in double, in 16 fixed lanes so that the sum
        // does not depend on the threads.
        const float mxf = float(mx);
        for (int64_t j = 0; j < v; ++j) g[j] = cpu::exp_f32(l[j] - mxf);
        const double z = cpu::sum_as_double(g, v);
        row_loss[size_t(t)] = mx + std::log(z) - double(l[y]);
        const float inv_z = float(grad_scale / z), inv_cap = cap > 0 ? float(1.0 / cap) : 0.0f;
        for (int64_t j = 0; j < v; ++j) {
          const float u = l[j] * inv_cap;
          g[j] = g[j] * inv_z * (1.0f - u * u);
        }
        g[y] -= float(grad_scale) * (1.0f - (l[y] * inv_cap) * (l[y] * inv_cap));
      } else {
        double z = 0;
        for (int64_t j = 0; j < v; ++j) {
          const double e = std::exp(double(l[j]) - mx);
          g[j] = T(e);
          z += e;
        }
        row_loss[size_t(t)] = mx + std::log(z) - double(l[y]);
        const double inv_z = grad_scale / z;
        for (int64_t j = 0; j < v; ++j) {
          const double c = cap > 0 ? 1.0 - (double(l[j]) / cap) * (double(l[j]) / cap) : 1.0;
          g[j] = T((double(g[j]) * inv_z - (j == y ? grad_scale : 0.0)) * c);
        }
      }
    }
  });
  double total = 0, hits = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (labels.data<int32_t>()[t] == -100) continue;
    total += row_loss[size_t(t)];
    hits += row_hit[size_t(t)];
  }
  sums.data<double>()[0] += total;
  sums.data<double>()[1] += hits;
}

}  // namespace tl
