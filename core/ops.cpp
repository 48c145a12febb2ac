#include "core/ops.h"

#include <cstring>

#include "core/math.h"
#include "core/nf4.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cmath>
#include <vector>

namespace tl {

void Ops::dropout_mask(uint64_t seed, double p, Tensor& mask) {
  Tensor host = Tensor::zeros(mask.shape(), mask.dtype());
  for (int64_t i = 0; i < host.numel(); ++i) {
    const double keep = dropout_keep(seed, i, p);
    if (host.dtype() == DType::F64) host.data<double>()[i] = keep;
    else if (host.dtype() == DType::F32) host.data<float>()[i] = float(keep);
    else throw std::invalid_argument("dropout_mask: mask must be F32 or F64");
  }
  if (mask.device() == Device::CPU) std::memcpy(mask.raw(), host.raw(), host.nbytes());
  else mask = upload(host, mask.dtype());
}

void Ops::attention_cached_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos,
                                   const Tensor& k_pos, int64_t window, Tensor& out) {
  const int64_t S = q.dim(0), nh = q.dim(1), d = q.dim(2), L = k.dim(0), nkv = k.dim(1);
  if (nkv < 1 || nh % nkv != 0 || v.dim(0) != L || k_pos.numel() != L || q_pos.numel() != S)
    throw std::logic_error("attention_cached_forward: inconsistent shapes");
  const Tensor qh = download(q).to(DType::F64), kh = download(k).to(DType::F64), vh = download(v).to(DType::F64);
  const double *Q = qh.data<double>(), *K = kh.data<double>(), *V = vh.data<double>();
  const int32_t *qp = q_pos.data<int32_t>(), *kp = k_pos.data<int32_t>();
  Tensor o = Tensor::zeros({S * nh, d}, DType::F64);
  std::vector<double> p(static_cast<size_t>(L));
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < nh; ++h) {
      const int64_t g = h / (nh / nkv);
      const double* qv = Q + (s * nh + h) * d;
      double top = -INFINITY;
      for (int64_t j = 0; j < L; ++j) {
        const bool seen = kp[j] >= 0 && kp[j] <= qp[s] && (window <= 0 || qp[s] - kp[j] < window);
        double dot = -INFINITY;
        if (seen) {
          dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += qv[c] * K[(j * nkv + g) * d + c];
        }
        p[size_t(j)] = dot;
        top = std::max(top, dot);
      }
      // softmax(p) · V, shifted by the largest score for range.
      double sum = 0;
      for (auto& x : p) sum += (x = std::isinf(x) ? 0.0 : std::exp(x - top));
      double* ov = o.data<double>() + (s * nh + h) * d;
      for (int64_t j = 0; j < L; ++j)
        if (p[size_t(j)] > 0)
          for (int64_t c = 0; c < d; ++c) ov[c] += p[size_t(j)] / sum * V[(j * nkv + g) * d + c];
    }
  out = upload(o.view(out.shape()), out.dtype());
}

namespace {
// Rows per dequantized tile: enough for an efficient GEMM, small next to the whole weight.
constexpr int64_t kNf4TileRows = 256;

// Rows [r0, r1) of W as an activation-dtype tensor on this backend ([rows, in]), or its
// transpose ([in, rows]).
Tensor nf4_tile(Ops& ops, const Nf4Tensor& w, int64_t r0, int64_t r1, bool transposed = false) {
  const int64_t in = w.shape[1], rows = r1 - r0;
  Tensor host = Tensor::zeros({rows, in}, DType::F32);
  nf4_dequantize_rows(w, r0, r1, host.data<float>(), w.orig_dtype);
  if (transposed) {
    Tensor t = Tensor::zeros({in, rows}, DType::F32);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < in; ++c) t.data<float>()[c * rows + r] = host.data<float>()[r * in + c];
    host = t;
  }
  return ops.upload(host, ops.act_dtype());
}
}  // namespace

void Ops::linear_nf4_forward(const Tensor& x, const Nf4Tensor& w, Tensor& y) {
  const int64_t out = w.shape[0], n = y.dim(0);
  for (int64_t r0 = 0; r0 < out; r0 += kNf4TileRows) {
    const int64_t r1 = std::min(out, r0 + kNf4TileRows);
    Tensor part = zeros({n, r1 - r0});
    linear_forward(x, nf4_tile(*this, w, r0, r1), part);  // y[:, r0:r1] = x·W[r0:r1]ᵀ
    copy_columns(part, 0, y, r0, r1 - r0);
  }
}

void Ops::linear_nf4_backward(const Tensor& dy, const Nf4Tensor& w, Tensor& dx) {
  const int64_t out = w.shape[0], n = dy.dim(0);
  for (int64_t r0 = 0; r0 < out; r0 += kNf4TileRows) {
    const int64_t r1 = std::min(out, r0 + kNf4TileRows);
    Tensor dy_part = zeros({n, r1 - r0});
    copy_columns(dy, r0, dy_part, 0, r1 - r0);
    // dx += dy[:, r0:r1]·W[r0:r1] = dy_part·(W[r0:r1]ᵀ)ᵀ
    linear_forward(dy_part, nf4_tile(*this, w, r0, r1, true), dx, true);
  }
}

namespace {
// Marks are host times: the CPU's ops are done when they return.
class HostClock final : public OpClock {
 public:
  size_t mark() override {
    marks_.push_back(std::chrono::steady_clock::now());
    return marks_.size() - 1;
  }
  double seconds(size_t a, size_t b) override {
    return std::chrono::duration<double>(marks_.at(b) - marks_.at(a)).count();
  }
  void clear() override { marks_.clear(); }

 private:
  std::vector<std::chrono::steady_clock::time_point> marks_;
};
}  // namespace

std::unique_ptr<OpClock> Ops::make_clock() { return std::make_unique<HostClock>(); }

double Ops::memory_available() {
  // /proc/meminfo's MemAvailable (kB): what the kernel can hand out without swapping.
  if (std::FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    unsigned long long kb = 0;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    std::fclose(f);
    if (kb > 0) return double(kb) * 1024.0;
  }
  return double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGESIZE));
}

}  // namespace tl
