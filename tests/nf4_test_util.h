// Byte-for-byte comparison of two NF4 tensors (tests).
#pragma once
#include <gtest/gtest.h>

#include <string>

#include "core/nf4.h"

namespace tl::test {

// Every stored field equal: shape, dtype, packed codes, (nested) absmax, offset and maps, the
// floats compared by their bits.
inline void expect_same_nf4(const Nf4Tensor& got, const Nf4Tensor& want, const std::string& what) {
  auto bits = [](const std::vector<float>& v) {
    std::vector<uint32_t> b;
    for (float f : v) b.push_back(float_bits(f));
    return b;
  };
  EXPECT_EQ(got.shape, want.shape) << what;
  EXPECT_EQ(got.orig_dtype, want.orig_dtype) << what;
  EXPECT_EQ(got.double_quant, want.double_quant) << what;
  int64_t differing = 0;
  for (size_t i = 0; i < std::min(got.packed.size(), want.packed.size()); ++i)
    differing += got.packed[i] != want.packed[i];
  EXPECT_EQ(got.packed.size(), want.packed.size()) << what;
  EXPECT_EQ(differing, 0) << what << ": packed bytes that differ";
  EXPECT_EQ(got.absmax_q, want.absmax_q) << what;
  EXPECT_EQ(bits(got.absmax), bits(want.absmax)) << what;
  EXPECT_EQ(bits(got.nested_absmax), bits(want.nested_absmax)) << what;
  EXPECT_EQ(float_bits(got.offset), float_bits(want.offset)) << what;
  EXPECT_EQ(bits(got.nested_map), bits(want.nested_map)) << what;
}

}  // namespace tl::test
