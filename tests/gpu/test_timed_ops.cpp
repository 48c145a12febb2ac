// TimedOps over the CUDA backend: results equal the bare backend's, every call is counted
// and timed by CUDA events (Ops::make_clock), and blame mode's per-op wait
// (Ops::synchronize) passes on work that did not fail.
#include <gtest/gtest.h>

#include <random>

#include "core/timed_ops.h"
#include "gpu_test_util.h"

namespace tl {
namespace {

TEST(TimedOpsGpu, EventTimesAndCountsBesideUnchangedResults) {
  TL_REQUIRE_GPU();
  CudaOps cuda(DType::BF16, CudaMatmul::Bf16);
  std::mt19937 rng(7);
  const Tensor x = cuda.upload(gpu_test::random({2048, 2048}, DType::F32, rng), DType::BF16);
  const Tensor w = cuda.upload(gpu_test::random({4096, 2048}, DType::F32, rng), DType::BF16);
  Tensor bare = cuda.zeros({2048, 4096}), timed_y = cuda.zeros({2048, 4096});
  cuda.linear_forward(x, w, bare, false);

  for (bool blame : {false, true}) {
    TimedOps timed(cuda, blame);
    for (int i = 0; i < 3; ++i) timed.linear_forward(x, w, timed_y, false);
    timed.add(timed_y, timed_y, timed_y);
    timed.scale(timed_y, 0.5);
    timed.synchronize();
    const TimedOps::Times t = timed.collect();
    EXPECT_EQ(t.calls, 5);
    ASSERT_FALSE(t.by_family.empty());
    EXPECT_EQ(t.by_family.front().family, "matmul") << t.table();  // the slowest family
    EXPECT_EQ(t.by_family.front().calls, 3);
    EXPECT_GT(t.by_family.front().seconds, 0.0);
    EXPECT_EQ(timed.collect().calls, 0);  // collect starts afresh
  }
  const Tensor a = cuda.download(bare), b = cuda.download(timed_y);
  for (int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(a.get(i), b.get(i)) << i;  // (y + y)·½ = y exactly

  EXPECT_GT(cuda.memory_available(), 0.0);  // the device's free memory
  auto owned = cuda.make_clock();
  OpClock& clock = *owned;
  for (int round = 0; round < 2; ++round) {  // the second round reuses the cleared events
    const size_t m0 = clock.mark();
    cuda.linear_forward(x, w, bare, false);
    const size_t m1 = clock.mark();
    EXPECT_EQ(m0, 0u);
    EXPECT_GT(clock.seconds(m0, m1), 0.0);
    clock.clear();
  }
}

}  // namespace
}  // namespace tl
