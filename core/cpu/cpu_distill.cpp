// Distillation's KL term on the CPU (Ops::distill_kl_sum, Ops::distill_kl_backward): the
// reference the CUDA backend is tested against. Per counted row, with a = t/T, b = s/T,
// ma = max a, mb = max b and S the teacher's top k (or the whole vocabulary):
//   Za = Σ_{j∈S} e^(a_j − ma),  Zb = Σ_j e^(b_j − mb)   (sums in double)
//   p_j = e^(a_j − ma)/Za on S,  q_j = e^(b_j − mb)/Zb
//   kl = Σ_{j∈S} p_j·(a_j − b_j) − (ma + log Za) + (mb + log Zb)
// (= Σ_S p_j·(log p_j − log q_j), since Σ_S p_j = 1), and the gradient of weight·T²·kl,
//   dstudent_j += weight·T·(q_j − p_j)·(1 − (s_j/cap)²).
// fp32 rows take their exponentials through the vectorized exp_f32, as the cross-entropy does.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/cpu_util.h"
#include "core/cpu/vector_math.h"

namespace tl {

namespace {

using cpu::dispatch;
using cpu::require;

// The teacher's top k of row t as indices in ascending order (so every sum over them runs in
// one order): value descending, ties to the lower index, as torch.topk on distinct values.
template <class T>
void top_k_indices(const T* t, int64_t v, int64_t k, std::vector<int32_t>& idx) {
  idx.resize(size_t(v));
  std::iota(idx.begin(), idx.end(), 0);
  auto before = [t](int32_t a, int32_t b) { return t[a] > t[b] || (t[a] == t[b] && a < b); };
  std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), before);
  idx.resize(size_t(k));
  std::sort(idx.begin(), idx.end());
}

// First maximum of a row (torch.argmax's tie rule).
template <class T>
int64_t argmax(const T* x, int64_t v) {
  return std::max_element(x, x + v) - x;
}

double sum_double(const float* x, int64_t n) { return cpu::sum_as_double(x, n); }
double sum_double(const double* x, int64_t n) {
  double z = 0;
  for (int64_t j = 0; j < n; ++j) z += x[j];
  return z;
}

// Per-thread scratch: the exponentials of one row, student and teacher.
template <class T>
struct Scratch {
  std::vector<T> es, et;
  std::vector<int32_t> idx;
};

// One counted row: returns kl, whether the two argmaxes agree and, when g is given, adds the
// gradient into it. The
// exponentials are taken in T (exp_f32 for float, libm for double) of differences formed in
// T, and summed in double.
template <class T>
double kl_row(const T* s, const T* t, int64_t v, double temperature, int64_t top_k, double weight, double cap,
              T* g, Scratch<T>& w, bool& agree) {
  const T inv_t = T(1.0 / temperature);
  const int64_t is = argmax(s, v), it = argmax(t, v);
  agree = is == it;
  const T ms = s[is], mt = t[it];
  w.es.resize(size_t(v));
  T* es = w.es.data();
  for (int64_t j = 0; j < v; ++j) es[j] = cpu::exp_of<T>((s[j] - ms) * inv_t);
  const double zb = sum_double(es, v);
  const double lse_b = double(ms) / temperature + std::log(zb);
  double za = 0, cross = 0;  // Σ_S e^(a_j − ma), Σ_S e^(a_j − ma)·(t_j − s_j)
  const bool full = top_k <= 0 || top_k >= v;
  if (full) {
    w.et.resize(size_t(v));
    T* et = w.et.data();
    for (int64_t j = 0; j < v; ++j) et[j] = cpu::exp_of<T>((t[j] - mt) * inv_t);
    za = sum_double(et, v);
    for (int64_t j = 0; j < v; ++j) cross += double(et[j]) * (double(t[j]) - double(s[j]));
  } else {
    top_k_indices(t, v, top_k, w.idx);
    w.et.resize(size_t(top_k));
    for (size_t m = 0; m < w.idx.size(); ++m) {
      const int32_t j = w.idx[m];
      w.et[m] = cpu::exp_of<T>((t[j] - mt) * inv_t);
      za += double(w.et[m]);
      cross += double(w.et[m]) * (double(t[j]) - double(s[j]));
    }
  }
  const double lse_a = double(mt) / temperature + std::log(za);
  const double kl = cross / za / temperature - lse_a + lse_b;
  if (!g) return kl;
  // dstudent_j += weight·T·(q_j − p_j)·c_j with c_j the soft-cap's derivative.
  const double wt = weight * temperature;
  const T cq = T(wt / zb), cp = T(wt / za), inv_cap = cap > 0 ? T(1.0 / cap) : T(0);
  auto capd = [&](int64_t j) { return T(1) - (s[j] * inv_cap) * (s[j] * inv_cap); };
  if (full) {
    const T* et = w.et.data();
    for (int64_t j = 0; j < v; ++j) g[j] += (es[j] * cq - et[j] * cp) * capd(j);
  } else {
    for (int64_t j = 0; j < v; ++j) g[j] += es[j] * cq * capd(j);
    for (size_t m = 0; m < w.idx.size(); ++m) {
      const int32_t j = w.idx[m];
      g[j] -= w.et[m] * cp * capd(j);
    }
  }
  return kl;
}

struct Rows {
  std::vector<double> kl;
  std::vector<uint8_t> agree;
};

// Runs kl_row over the counted rows in parallel; per-row results, summed in row order by the
// callers, so the totals do not depend on the threads.
Rows run(const Tensor& student, const Tensor& teacher, const Tensor& labels, double temperature, int64_t top_k,
         double weight, double cap, Tensor* dstudent, const char* what) {
  const int64_t n = labels.numel(), v = student.dim(-1);
  require(student.numel() == n * v && teacher.numel() == n * v && student.dtype() == teacher.dtype() &&
              labels.dtype() == DType::I32,
          what);
  require(!dstudent || (dstudent->numel() == n * v && dstudent->dtype() == student.dtype()), what);
  require(temperature > 0 && std::isfinite(temperature), "distillation temperature must be positive");
  require(top_k >= 0, "distillation top_k must be at least 0");
  Rows r{std::vector<double>(size_t(n), 0.0), std::vector<uint8_t>(size_t(n), 0)};
  const int32_t* y = labels.data<int32_t>();
  dispatch(student.dtype(), [&]<class T>() {
    const T* s = student.data<T>();
    const T* t = teacher.data<T>();
    T* g = dstudent ? dstudent->data<T>() : nullptr;
#pragma omp parallel if(n * v >= cpu::kParallelMin)
    {
      Scratch<T> w;
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n; ++i) {
        if (y[i] == -100) continue;
        const T* si = s + i * v;
        const T* ti = t + i * v;
        bool agree = false;
        r.kl[size_t(i)] = kl_row(si, ti, v, temperature, top_k, weight, cap, g ? g + i * v : nullptr, w, agree);
        r.agree[size_t(i)] = agree;
      }
    }
  });
  return r;
}

}  // namespace

Ops::DistillSums CpuOps::distill_kl_sum(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                        double temperature, int64_t top_k) {
  const Rows r = run(student, teacher, labels, temperature, top_k, 0.0, 0.0, nullptr, "distill_kl_sum shapes");
  DistillSums out;
  for (int64_t i = 0; i < labels.numel(); ++i) {
    if (labels.data<int32_t>()[i] == -100) continue;
    out.kl += r.kl[size_t(i)];
    out.agree += r.agree[size_t(i)];
    ++out.count;
  }
  return out;
}

void CpuOps::distill_kl_backward(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                 double temperature, int64_t top_k, double weight, double cap, Tensor& dstudent,
                                 Tensor& sums) {
  require(sums.dtype() == DType::F64 && sums.numel() >= 1, "distill_kl_backward sums must be F64 [1]");
  const Rows r =
      run(student, teacher, labels, temperature, top_k, weight, cap, &dstudent, "distill_kl_backward shapes");
  double total = 0;
  for (int64_t i = 0; i < labels.numel(); ++i)
    if (labels.data<int32_t>()[i] != -100) total += r.kl[size_t(i)];
  sums.data<double>()[0] += total;
}

}  // namespace tl
