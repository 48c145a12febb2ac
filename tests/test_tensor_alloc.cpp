// Ops::empty's contract and the tests' guard on it (tests/test_main.cpp): an empty buffer is
// NaN-filled in tests, so a model op that read one before writing it would poison the values
// every forward/gradient test compares; and the outputs that the model takes from empty are
// written whole by the op that fills them.
#include <gtest/gtest.h>

#include <cmath>

#include "core/cpu/cpu_ops.h"
#include "core/tensor.h"

using tl::DType;
using tl::Tensor;

TEST(TensorAlloc, UninitializedIsNanUnderTheTestsPoisonAndZerosIsZero) {
  Tensor u = Tensor::uninitialized({3, 70}, DType::F32);
  for (int64_t i = 0; i < u.numel(); ++i) EXPECT_TRUE(std::isnan(u.data<float>()[i])) << i;
  Tensor b = Tensor::uninitialized({5}, DType::BF16);
  for (int64_t i = 0; i < b.numel(); ++i) EXPECT_TRUE(std::isnan(b.get(i))) << i;
  Tensor z = Tensor::zeros({3, 70}, DType::F32);
  for (int64_t i = 0; i < z.numel(); ++i) EXPECT_EQ(z.data<float>()[i], 0.0f) << i;
}

TEST(TensorAlloc, CpuOpsEmptyIsUninitializedAndAProductOverwritesItWhole) {
  tl::CpuOps ops(DType::F32);
  Tensor e = ops.empty({4, 3});
  EXPECT_EQ(e.dtype(), DType::F32);
  EXPECT_TRUE(std::isnan(e.data<float>()[0]));
  Tensor x = Tensor::zeros({4, 2}, DType::F32), w = Tensor::zeros({3, 2}, DType::F32);
  for (int i = 0; i < 8; ++i) x.data<float>()[i] = float(i);
  for (int i = 0; i < 6; ++i) w.data<float>()[i] = float(i % 3) - 1.0f;
  ops.linear_forward(x, w, e, false);  // beta 0: C is never read
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t c = 0; c < 3; ++c) {
      const float want = x.data<float>()[r * 2] * w.data<float>()[c * 2] + x.data<float>()[r * 2 + 1] * w.data<float>()[c * 2 + 1];
      EXPECT_EQ(e.data<float>()[r * 3 + c], want) << r << "," << c;
    }
}
