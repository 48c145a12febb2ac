// The tests' main: the thread wait policy the tools run with (core/cpu/thread_policy.h), so
// that tests running side by side (ctest -j) do not spin against each other; and every
// Ops::empty / Tensor::uninitialized buffer filled with NaN, so that a read of one before
// its write turns the values any test checks into NaN instead of passing on leftovers.
#include <gtest/gtest.h>

#include "core/cpu/thread_policy.h"
#include "core/tensor.h"

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);
  tl::Tensor::poison_uninitialized(true);
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
