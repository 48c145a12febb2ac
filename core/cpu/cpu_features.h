// What this CPU offers the CPU backend, read at run time (never assumed at compile time), so
// that one binary runs on every x86-64 CPU and takes each fast path only where it exists.
//
// ONEDNN_MAX_CPU_ISA caps the answer as it caps oneDNN (AVX2, AVX512_CORE, AVX512_CORE_BF16,
// AVX512_CORE_AMX, …): one variable makes an AVX-512 machine run every path an AVX2 machine
// runs, which is how CI proves the AVX2 paths wherever it runs.
#pragma once
#include <string>

namespace tl::cpu {

struct CpuFeatures {
  bool avx2 = false;         // and FMA: the x86-64-v3 level
  bool avx512bw = false;     // AVX-512 F and BW: the NF4 table lookups (vpermw, vpermps)
  bool avx512_bf16 = false;  // bf16 dot products (vdpbf16ps)
  bool amx_bf16 = false;     // AMX tiles with bf16
};

// The CPU's flags, capped by ONEDNN_MAX_CPU_ISA; read once.
const CpuFeatures& cpu_features();

// Whether gemm_bf16 runs on the CPU's own bf16 instructions (oneDNN with AVX512-BF16 or
// AMX). Elsewhere it runs a portable kernel with the same numerics at fp32 speed, so the
// trainer keeps exact fp32 there.
bool native_bf16();

// The instruction set the products use: "AMX", "AVX512-BF16", "AVX-512", "AVX2" or
// "baseline" (oneDNN's choice where the build has oneDNN).
std::string cpu_isa_name();

// The libraries and kernels this build and CPU use, for the backend line and the bench:
// e.g. "bf16 products: oneDNN; fp32 products: OpenBLAS; NF4 lookups: AVX-512".
std::string cpu_kernels_description();

}  // namespace tl::cpu
