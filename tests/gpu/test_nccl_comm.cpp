// The NCCL comm with one rank (more need mpirun and GPUs): a sum over one rank leaves the
// values as they were, and a bucket packs and unpacks its parts in place through the
// communication stream. Both fail if packing offsets, the stream order or the NCCL call
// are wrong (values moved, lost or read before the reduction finished).
#include <gtest/gtest.h>

#include "cuda/cuda_ops.h"

#ifdef TL_HAVE_NCCL
#include <cuda_runtime.h>

#include <vector>

#include "train/dist/comm_nccl.h"

namespace {

std::vector<float> iota(size_t n, float start) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + float(i) * 0.5f;
  return v;
}

TEST(NcclComm, OneRankAllReduceAndBuckets) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  auto host = tl::make_single_comm();
  auto comm = tl::make_nccl_comm(*host, 60.0);
  EXPECT_EQ(comm->world(), 1);

  const std::vector<size_t> sizes = {7, 1000, 33};
  std::vector<float*> dev(sizes.size());
  tl::GradBucket bucket;
  for (size_t i = 0; i < sizes.size(); ++i) {
    ASSERT_EQ(cudaMalloc(&dev[i], sizes[i] * sizeof(float)), cudaSuccess);
    const auto h = iota(sizes[i], float(100 * i));
    cudaMemcpy(dev[i], h.data(), sizes[i] * sizeof(float), cudaMemcpyHostToDevice);
    bucket.parts.push_back({dev[i], sizes[i]});
    bucket.elems += sizes[i];
  }
  comm->all_reduce_sum(dev[1], sizes[1], "test all-reduce");
  for (int round = 0; round < 2; ++round) {  // the second reuses the bucket's buffer
    comm->start_bucket(bucket);
    EXPECT_TRUE(bucket.in_flight);
    comm->finish_bucket(bucket);
  }
  cudaDeviceSynchronize();
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::vector<float> got(sizes[i]);
    cudaMemcpy(got.data(), dev[i], sizes[i] * sizeof(float), cudaMemcpyDeviceToHost);
    EXPECT_EQ(got, iota(sizes[i], float(100 * i))) << "part " << i;
    cudaFree(dev[i]);
  }
}

}  // namespace
#else
TEST(NcclComm, OneRankAllReduceAndBuckets) { GTEST_SKIP() << "built without NCCL: NCCL test skipped"; }
#endif
