// Tests of the CPU's bf16 products, run once per kernel (core/cpu/gemm_bf16.h): the oneDNN
// kernel where this CPU has bf16 instructions (skipped elsewhere, saying why), the portable
// one everywhere. Each test body runs with every product of the process on its kernel.
#pragma once
#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "core/cpu/gemm_bf16.h"

namespace tl::test {

class Bf16KernelTest : public ::testing::TestWithParam<cpu::Bf16Kernel> {
 protected:
  void SetUp() override {
    if (GetParam() == cpu::Bf16Kernel::OneDnn && !cpu::native_bf16())
      GTEST_SKIP() << "the oneDNN bf16 kernel needs bf16 instructions (AVX512-BF16 or AMX); this CPU offers "
                   << cpu::cpu_isa_name()
                   << " (ONEDNN_MAX_CPU_ISA caps it), or the build has no oneDNN; the portable kernel's case runs";
    kernel_ = std::make_unique<cpu::ScopedBf16Kernel>(GetParam());
  }
  void TearDown() override { kernel_.reset(); }

 private:
  std::unique_ptr<cpu::ScopedBf16Kernel> kernel_;
};

inline std::string bf16_kernel_name(const ::testing::TestParamInfo<cpu::Bf16Kernel>& info) {
  return info.param == cpu::Bf16Kernel::OneDnn ? "OneDnn" : "Portable";
}

}  // namespace tl::test

// INSTANTIATE_TEST_SUITE_P for a Bf16KernelTest subclass over both kernels.
#define TL_INSTANTIATE_BF16_KERNELS(Suite)                                                                   \
  INSTANTIATE_TEST_SUITE_P(Kernels, Suite,                                                                   \
                           ::testing::Values(::tl::cpu::Bf16Kernel::OneDnn, ::tl::cpu::Bf16Kernel::Portable), \
                           ::tl::test::bf16_kernel_name)
