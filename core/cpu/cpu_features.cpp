#include "core/cpu/cpu_features.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string_view>

#if defined(TL_HAVE_ONEDNN)
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace tl::cpu {

namespace {

// The ladder ONEDNN_MAX_CPU_ISA climbs, as far as our paths care.
enum Level { kBelowAvx2, kAvx2, kAvx512, kAvx512Bf16, kAll };

// The level ONEDNN_MAX_CPU_ISA allows (kAll when unset, ALL, DEFAULT or a name we do not know:
// oneDNN itself ignores those).
Level isa_cap() {
  const char* env = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (!env) env = std::getenv("DNNL_MAX_CPU_ISA");  // oneDNN's older spelling
  if (!env) return kAll;
  std::string v(env);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return char(std::toupper(c)); });
  auto starts = [&](std::string_view p) { return std::string_view(v).substr(0, p.size()) == p; };
  if (v == "SSE41" || v == "AVX") return kBelowAvx2;
  if (starts("AVX2")) return kAvx2;
  if (v == "AVX512_CORE" || v == "AVX512_CORE_VNNI") return kAvx512;
  if (v == "AVX512_CORE_BF16" || v == "AVX512_CORE_FP16") return kAvx512Bf16;
  return kAll;
}

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const Level cap = isa_cap();
  f.avx2 = cap >= kAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512bw = cap >= kAvx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  f.avx512_bf16 = cap >= kAvx512Bf16 && f.avx512bw && __builtin_cpu_supports("avx512bf16");
  f.amx_bf16 = cap >= kAll && f.avx512bw && __builtin_cpu_supports("amx-bf16");
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

#if defined(TL_HAVE_ONEDNN)
bool native_bf16() {
  const auto isa = dnnl::get_effective_cpu_isa();
  return isa == dnnl::cpu_isa::avx512_core_bf16 || isa == dnnl::cpu_isa::avx512_core_amx;
}

std::string cpu_isa_name() {
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::avx512_core_amx: return "AMX";
    case dnnl::cpu_isa::avx512_core_bf16: return "AVX512-BF16";
    case dnnl::cpu_isa::avx512_core_vnni:
    case dnnl::cpu_isa::avx512_core: return "AVX-512";
    case dnnl::cpu_isa::avx2_vnni:
    case dnnl::cpu_isa::avx2: return "AVX2";
    default: return "baseline";
  }
}
#else
bool native_bf16() { return false; }  // no bf16 kernel in this build: the portable one

std::string cpu_isa_name() {
  const CpuFeatures& f = cpu_features();
  return f.amx_bf16 ? "AMX" : f.avx512_bf16 ? "AVX512-BF16" : f.avx512bw ? "AVX-512" : f.avx2 ? "AVX2" : "baseline";
}
#endif

std::string cpu_kernels_description() {
  std::string s = "bf16 products: ";
  s += native_bf16() ? "oneDNN" : "portable (bf16-rounded operands, fp32 product)";
#if defined(TL_HAVE_OPENBLAS)
  s += "; fp32 products: OpenBLAS";
#else
  s += "; fp32 products: plain loops (built without OpenBLAS)";
#endif
  s += cpu_features().avx512bw ? "; NF4 lookups: AVX-512" : "; NF4 lookups: scalar";
  return s;
}

}  // namespace tl::cpu
