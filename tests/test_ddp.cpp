// Data-parallel pieces that need no second process: the fingerprint, the start-up agreement
// check against a simulated second rank, and the gradient buckets' layout and start order.
// (Two real ranks: tests/cli/ddp_*.sh under mpirun.)
#include <gtest/gtest.h>

#include "train/dist/ddp.h"

namespace tl {
namespace {

// Rank 0 of a pretend 2-rank job: gathers return rank 1's values from `other`, buckets
// record the order they start in.
struct FakeComm : Comm {
  std::vector<uint64_t> other;
  size_t gathers = 0;
  std::vector<size_t> started;  // bucket sizes in start order
  int rank() const override { return 0; }
  int world() const override { return 2; }
  int local_rank() const override { return 0; }
  std::string name() const override { return "fake"; }
  void all_reduce_sum(float*, size_t, const char*) override {}
  void all_reduce_sum_host(double*, size_t, const char*) override {}
  void broadcast_host(void*, size_t, int, const char*) override {}
  std::vector<uint64_t> all_gather_host(uint64_t v, const char*) override { return {v, other.at(gathers++)}; }
  void barrier(const char*, double) override {}
  void start_bucket(GradBucket& b) override {
    started.push_back(b.elems);
    b.in_flight = true;
  }
  void finish_bucket(GradBucket& b) override { b.in_flight = false; }
  [[noreturn]] void abort(int) override { throw std::runtime_error("abort"); }
};

TEST(Ddp, Fnv1aKnownValues) {
  // The published FNV-1a 64 test vectors.
  EXPECT_EQ(fnv1a("", 0), 0xcbf29ce484222325ull);
  EXPECT_EQ(fnv1a("a", 1), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(fnv1a("foobar", 6), 0x85944171f73967e8ull);
}

TEST(Ddp, AgreementNamesRankAndItem) {
  const std::vector<std::pair<std::string, uint64_t>> items = {{"config (x.yaml)", 1}, {"data file 1 (d.jsonl)", 2},
                                                               {"base checkpoint index of m", 3}};
  FakeComm same;
  same.other = {3, 1, 2, 3};
  EXPECT_NO_THROW(check_ranks_agree(same, items));
  FakeComm data;
  data.other = {3, 1, 9, 3};
  try {
    check_ranks_agree(data, items);
    FAIL() << "a differing data file was accepted";
  } catch (const AgreedError& e) {
    EXPECT_NE(std::string(e.what()).find("rank 1: data file 1 (d.jsonl) differs from rank 0's"), std::string::npos)
        << e.what();
  }
  FakeComm count;
  count.other = {4};
  EXPECT_THROW(check_ranks_agree(count, items), AgreedError);
}

TEST(Ddp, LayerOfNames) {
  EXPECT_EQ(layer_of("base_model.model.model.language_model.layers.12.self_attn.q_proj.lora_A.weight"), 12);
  EXPECT_EQ(layer_of("layers.0.mlp.up_proj.weight"), 0);
  EXPECT_EQ(layer_of("embed_tokens.weight"), -1);
  EXPECT_EQ(layer_of("xlayers.3.a"), -1);
  EXPECT_EQ(layer_of("layers.x.a"), -1);
}

TEST(Ddp, BucketsFollowTheBackward) {
  // Three layers of 4 floats each (two tensors of 2) plus an embedding of 3: with 8-float
  // buckets, [layer 2, layer 1] start when layer 1 is done, [layer 0, embedding] at finish.
  std::vector<Tensor> grads;
  for (int i = 0; i < 7; ++i) grads.push_back(Tensor::zeros({i == 6 ? 3 : 2}, DType::F32));
  std::vector<ParamSlot> params;
  const char* names[] = {"layers.0.a", "layers.0.b", "layers.1.a", "layers.1.b", "layers.2.a", "layers.2.b", "embed"};
  for (int i = 0; i < 7; ++i) params.push_back({names[i], &grads[size_t(i)], &grads[size_t(i)], {}, {}, true});
  FakeComm comm;
  GradBuckets b(params, comm, 8 * sizeof(float));
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(b.elems(0), 8u);
  EXPECT_EQ(b.elems(1), 7u);
  b.layer_done(2);
  EXPECT_TRUE(comm.started.empty());
  b.layer_done(1);
  EXPECT_EQ(comm.started, std::vector<size_t>({8}));
  b.layer_done(0);
  b.finish();
  EXPECT_EQ(comm.started, std::vector<size_t>({8, 7}));
  // Tied tensors (one gradient, two names) are reduced once.
  params.push_back({"lm_head", &grads[6], &grads[6], {}, {}, true});
  GradBuckets tied(params, comm, 1 << 20);
  ASSERT_EQ(tied.size(), 1u);
  EXPECT_EQ(tied.elems(0), 15u);
}

}  // namespace
}  // namespace tl
