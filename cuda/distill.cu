// Distillation's KL term on the GPU (Ops::distill_kl_sum, Ops::distill_kl_backward), the twin
// of core/cpu/cpu_distill.cpp. One block per row, statistics in double as the cross-entropy
// kernel keeps them. With a = t/T, b = s/T, ma = max a, mb = max b and S the teacher's top k
// (or the whole vocabulary):
//   Za = Σ_{j∈S} e^(a_j − ma),  Zb = Σ_j e^(b_j − mb)
//   kl = Σ_{j∈S} e^(a_j − ma)·(a_j − b_j)/Za − (ma + log Za) + (mb + log Zb)
//   dstudent_j += weight·T·(q_j − p_j)·(1 − (s_j/cap)²),  q = e^(b − mb)/Zb, p = e^(a − ma)/Za on S.
// The top k is found by a radix select over order-preserving 64-bit keys of the widened
// logits (8 passes of 8 bits), so no row is sorted; ties at the k-th value go to the lower
// indices, as on the CPU.
#include <cmath>

#include "cuda/cuda_util.cuh"

namespace tl {

namespace {

using cuda::widen;

// a > b ⇔ key(a) > key(b) for every non-NaN double.
__device__ __forceinline__ unsigned long long order_key(double x) {
  const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(x));
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

// The first maximum of a row (value and index), merged over the block: on equal values the
// lower index wins, as torch.argmax. Every thread gets the result.
template <class T>
__device__ void block_argmax(const T* x, int64_t v, double& best_out, int64_t& at_out) {
  double best = -INFINITY;
  int64_t at = v;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const double xj = double(widen(x[j]));
    if (xj > best || at == v) best = xj, at = j;  // strided: a later j never ties an earlier one here
  }
  __shared__ double vals[cuda::kThreads];
  __shared__ int64_t idx[cuda::kThreads];
  __syncthreads();  // an earlier call's readers are done
  vals[threadIdx.x] = best;
  idx[threadIdx.x] = at;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const double ov = vals[threadIdx.x + s];
      const int64_t oi = idx[threadIdx.x + s];
      if (ov > vals[threadIdx.x] || (ov == vals[threadIdx.x] && oi < idx[threadIdx.x])) {
        vals[threadIdx.x] = ov;
        idx[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  best_out = vals[0];
  at_out = idx[0];
}

// The key of the k-th largest value of x (1 ≤ k ≤ v) and `take`, how many of the elements
// holding that key belong to the top k. MSB-first radix select, one byte per pass.
template <class T>
__device__ void kth_largest_key(const T* x, int64_t v, int64_t k, unsigned long long& key, int64_t& take) {
  __shared__ unsigned long long hist[256];
  __shared__ unsigned long long prefix_s;
  __shared__ long long k_s;
  unsigned long long prefix = 0, mask = 0;
  long long kk = k;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
      const unsigned long long kj = order_key(double(widen(x[j])));
      if ((kj & mask) == prefix) atomicAdd(&hist[(kj >> shift) & 255ull], 1ull);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long above = 0;
      int b = 255;
      for (; b > 0; --b) {
        if (above + (long long)hist[b] >= kk) break;
        above += (long long)hist[b];
      }
      prefix_s = prefix | (static_cast<unsigned long long>(b) << shift);
      k_s = kk - above;
    }
    __syncthreads();
    prefix = prefix_s;
    kk = k_s;
    mask |= 255ull << shift;
    __syncthreads();  // every thread has read prefix_s and k_s before the next pass
  }
  key = prefix;
  take = kk;
}

// One block per row. kl_rows[n] and agree_rows[n] are set (0 on ignored rows); with g, the
// row's gradient is added to it.
template <class T>
__global__ void distill_kernel(const T* student, const T* teacher, const int32_t* labels, int64_t v,
                               double temperature, int64_t top_k, double weight, double cap, double* kl_rows,
                               double* agree_rows, T* g) {
  const int64_t n = blockIdx.x;
  if (labels[n] == -100) {  // block-uniform: no thread waits at a barrier below
    if (threadIdx.x == 0) kl_rows[n] = agree_rows[n] = 0;
    return;
  }
  const T* s = student + n * v;
  const T* t = teacher + n * v;
  double ms, mt;
  int64_t is, it;
  block_argmax(s, v, ms, is);
  block_argmax(t, v, mt, it);
  const double inv_t = 1.0 / temperature;

  double zb = 0;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) zb += exp((double(widen(s[j])) - ms) * inv_t);
  zb = cuda::block_reduce(zb, cuda::Sum{});

  // Membership in S: key > cut_key, or key == cut_key at an index ≤ cut_index.
  unsigned long long cut_key = 0;
  int64_t cut_index = v;
  const bool full = top_k <= 0 || top_k >= v;
  if (!full) {
    int64_t take = 0;
    kth_largest_key(t, v, top_k, cut_key, take);
    __shared__ long long equal_s, cut_s;
    if (threadIdx.x == 0) equal_s = 0;
    __syncthreads();
    long long equal = 0;
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) equal += order_key(double(widen(t[j]))) == cut_key;
    atomicAdd(reinterpret_cast<unsigned long long*>(&equal_s), static_cast<unsigned long long>(equal));
    __syncthreads();
    if (threadIdx.x == 0) {
      cut_s = v;
      if (equal_s > take) {  // ties straddle the k-th place: the lowest `take` indices are in (rare)
        long long seen = 0;
        for (int64_t j = 0; j < v; ++j)
          if (order_key(double(widen(t[j]))) == cut_key && ++seen == take) {
            cut_s = j;
            break;
          }
      }
    }
    __syncthreads();
    cut_index = cut_s;
  }
  auto member = [&](int64_t j, double tj) {
    if (full) return true;
    const unsigned long long kj = order_key(tj);
    return kj > cut_key || (kj == cut_key && j <= cut_index);
  };

  double za = 0, cross = 0;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const double tj = double(widen(t[j]));
    if (!member(j, tj)) continue;
    const double e = exp((tj - mt) * inv_t);
    za += e;
    cross += e * (tj - double(widen(s[j])));
  }
  za = cuda::block_reduce(za, cuda::Sum{});
  cross = cuda::block_reduce(cross, cuda::Sum{});
  if (threadIdx.x == 0) {
    kl_rows[n] = cross / za * inv_t - (mt * inv_t + log(za)) + (ms * inv_t + log(zb));
    agree_rows[n] = is == it ? 1.0 : 0.0;
  }
  if (!g) return;
  T* gr = g + n * v;
  const double wt = weight * temperature;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const double sj = double(widen(s[j])), tj = double(widen(t[j]));
    const double q = exp((sj - ms) * inv_t) / zb;
    const double p = member(j, tj) ? exp((tj - mt) * inv_t) / za : 0.0;
    const double c = cap > 0 ? 1.0 - (sj / cap) * (sj / cap) : 1.0;
    gr[j] = cuda::narrow<T>(double(widen(gr[j])) + wt * (q - p) * c);
  }
}

// Launches the kernel over every row; returns the device rows kl[n] then agree[n] (0 on
// ignored rows). Labels stay on the device: the caller checked them before their upload.
std::shared_ptr<void> launch(const Tensor& student, const Tensor& teacher, const Tensor& labels, double temperature,
                             int64_t top_k, double weight, double cap, Tensor* dstudent) {
  const int64_t n = labels.numel(), v = student.dim(-1);
  cuda::require(student.rank() >= 1 && student.numel() == n * v && teacher.numel() == n * v &&
                    student.dtype() == teacher.dtype(),
                "distill_kl shapes");
  cuda::require(temperature > 0 && std::isfinite(temperature), "distillation temperature must be positive");
  cuda::require(top_k >= 0, "distillation top_k must be at least 0");
  cuda::require(n > 0 && n <= INT32_MAX, "distill_kl: rows out of range");
  cuda::require_device(student, "distill_kl student logits");
  cuda::require_device(teacher, "distill_kl teacher logits");
  if (dstudent) {
    cuda::require(dstudent->numel() == n * v && dstudent->dtype() == student.dtype(), "distill_kl_backward dstudent");
    cuda::require_device(*dstudent, "distill_kl_backward dstudent");
  }
  cuda::DeviceInts dl = cuda::device_ints(labels, "distill_kl labels must be I32");
  std::shared_ptr<void> rows = cuda::device_alloc(2 * size_t(n) * sizeof(double));
  double* kl_rows = static_cast<double*>(rows.get());
  cuda::dispatch(student.dtype(), [&]<class T>() {
    distill_kernel<T><<<unsigned(n), cuda::kThreads>>>(student.data<T>(), teacher.data<T>(), dl.ptr, v, temperature,
                                                       top_k, weight, cap, kl_rows, kl_rows + n,
                                                       dstudent ? dstudent->data<T>() : nullptr);
    TL_CUDA_LAUNCHED("distill_kernel");
  });
  return rows;
}

}  // namespace

// Evaluation reads its sums back (one copy per chunk).
Ops::DistillSums CudaOps::distill_kl_sum(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                         double temperature, int64_t top_k) {
  DistillSums r;
  const std::vector<int32_t> y = cuda::host_ints(labels, "distill_kl labels must be I32");
  for (int32_t l : y) r.count += l != -100;
  if (r.count == 0) return r;
  const int64_t n = labels.numel();
  std::shared_ptr<void> rows = launch(student, teacher, labels, temperature, top_k, 0.0, 0.0, nullptr);
  std::vector<double> host(2 * size_t(n));
  TL_CUDA_CHECK(cudaMemcpy(host.data(), rows.get(), host.size() * sizeof(double), cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < n; ++i) {  // in row order: deterministic
    if (y[size_t(i)] == -100) continue;
    r.kl += host[size_t(i)];
    r.agree += host[size_t(n + i)] != 0.0;
  }
  return r;
}

// Training leaves its sum on the device, in sums[0].
void CudaOps::distill_kl_backward(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                  double temperature, int64_t top_k, double weight, double cap, Tensor& dstudent,
                                  Tensor& sums) {
  cuda::require(sums.dtype() == DType::F64 && sums.numel() >= 1, "distill_kl_backward sums must be F64 [1]");
  cuda::require_device(sums, "distill_kl_backward sums");
  const int64_t n = labels.numel();
  if (n == 0) return;
  std::shared_ptr<void> rows = launch(student, teacher, labels, temperature, top_k, weight, cap, &dstudent);
  cuda::add_sum_in_order(static_cast<const double*>(rows.get()), n, sums.data<double>());  // the kl rows
}

}  // namespace tl
