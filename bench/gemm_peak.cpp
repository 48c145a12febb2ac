// The machine's matrix-product peak, the yardstick for bench_train_step's useful GFLOP/s:
// y = x·Wᵀ of the E2B MLP's shape (tokens × 1536 by 6144 × 1536, the size of the step's
// largest products) through the CPU backend's own paths: fp32 (OpenBLAS sgemm) and, where
// the CPU has bf16 instructions, bf16 inputs with fp32 sums (oneDNN; AMX where present).
//   bench_gemm_peak [M N K REPS]   (defaults 1024 6144 1536 20)
// Prints one JSON line: GFLOP/s of each path (best of REPS, after one warm-up product).
#include <algorithm>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/cpu/cpu_ops.h"
#include "core/cpu/gemm_bf16.h"
#include "core/cpu/thread_policy.h"

namespace {

double best_gflops(tl::CpuOps& ops, int64_t m, int64_t n, int64_t k, int reps) {
  tl::Tensor x = tl::Tensor::zeros({m, k}, tl::DType::F32), w = tl::Tensor::zeros({n, k}, tl::DType::F32),
             y = tl::Tensor::zeros({m, n}, tl::DType::F32);
  float* xs = x.data<float>();
  float* ws = w.data<float>();
  for (int64_t i = 0; i < m * k; ++i) xs[i] = float((i * 37) % 101) / 101.0f - 0.5f;
  for (int64_t i = 0; i < n * k; ++i) ws[i] = float((i * 53) % 97) / 97.0f - 0.5f;
  ops.linear_forward(x, w, y, false);  // warm-up: oneDNN builds its primitive here
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    ops.linear_forward(x, w, y, false);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 2.0 * double(m) * double(n) * double(k) / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);
  const int64_t m = argc > 1 ? std::stoll(argv[1]) : 1024, n = argc > 2 ? std::stoll(argv[2]) : 6144,
                k = argc > 3 ? std::stoll(argv[3]) : 1536;
  const int reps = argc > 4 ? std::stoi(argv[4]) : 20;
  tl::CpuOps f32(tl::DType::F32, tl::CpuMatmul::F32);
  nlohmann::json out{{"shape", {m, n, k}}, {"isa", tl::cpu::cpu_isa_name()}, {"kernels", tl::cpu::cpu_kernels_description()},
                     {"f32_gflop_per_s", best_gflops(f32, m, n, k, reps)}};
  if (tl::cpu::native_bf16()) {
    tl::CpuOps bf16(tl::DType::F32, tl::CpuMatmul::Bf16);
    out["bf16_gflop_per_s"] = best_gflops(bf16, m, n, k, reps);
  } else {
    out["bf16_gflop_per_s"] = nullptr;  // no bf16 instructions: the portable bf16 kernel runs at fp32 speed
  }
  std::cout << out.dump() << "\n";
  return 0;
}
