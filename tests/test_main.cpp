// The tests' main: the thread wait policy the tools run with (core/cpu/thread_policy.h), so
// that tests running side by side (ctest -j) do not spin against each other.
#include <gtest/gtest.h>

#include "core/cpu/thread_policy.h"

int main(int argc, char** argv) {
  tl::apply_thread_wait_policy(argv);
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
