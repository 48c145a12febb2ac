// The GPU's blocked attention: the scores it computes stay inside the masks as the CPU's do
// (the same count: the same blocks), the log-sum-exp it keeps equals the CPU's, and the
// backward from it equals the CPU's — with documents known on the host beside device ids,
// so key blocks of other documents are skipped.
#include <gtest/gtest.h>

#include <random>

#include "gpu_test_util.h"

namespace tl {
namespace {

using namespace gpu_test;

TEST(CudaAttentionBlocks, CountsLogSumExpAndBackwardMatchTheCpu) {
  TL_REQUIRE_GPU();
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(41);
    Pair p(dt);
    const int64_t B = 2, S = 700, nh = 4, nkv = 2, d = 32;
    const Tensor q = random({B, S, nh, d}, dt, rng, -0.5, 0.5), k = random({B, S, nkv, d}, dt, rng, -0.5, 0.5),
                 v = random({B, S, nkv, d}, dt, rng), dout = random({B, S, nh, d}, dt, rng);
    std::vector<int32_t> doc;
    for (int64_t s = 0; s < B * S; ++s) doc.push_back(int32_t((s % S) < 300 ? 0 : (s % S) < 520 ? 1 : 0));
    const Tensor docs = ints(doc, {B, S}), docs_dev = p.gpu.upload(docs, DType::I32);
    for (int64_t window : {int64_t(0), int64_t(200)}) {
      Tensor lse_c = p.cpu.zeros({B, nh, S}, dt), lse_g = p.gpu.zeros({B, nh, S}, dt);
      AttentionMask mc{window, &docs}, mg{window, &docs_dev};
      mc.lse = &lse_c;
      mg.doc_ids_host = &docs;
      mg.lse = &lse_g;
      Tensor out = p.cpu.zeros(q.shape()), outd = p.gpu.zeros(q.shape());
      const int64_t before_c = p.cpu.attention_scores(), before_g = p.gpu.attention_scores();
      p.cpu.attention_forward(q, k, v, mc, out);
      const Tensor qd = p.up(q), kd = p.up(k), vd = p.up(v);
      p.gpu.attention_forward(qd, kd, vd, mg, outd);
      EXPECT_EQ(p.gpu.attention_scores() - before_g, p.cpu.attention_scores() - before_c) << "window " << window;
      expect_close(p.down(outd), out, tol(dt), "attention");
      expect_close(p.down(lse_g), lse_c, tol(dt), "log-sum-exp");
      Tensor dq = p.cpu.zeros(q.shape()), dk = p.cpu.zeros(k.shape()), dv = p.cpu.zeros(v.shape());
      Tensor dqd = p.gpu.zeros(q.shape()), dkd = p.gpu.zeros(k.shape()), dvd = p.gpu.zeros(v.shape());
      p.cpu.attention_backward(q, k, v, mc, dout, dq, dk, dv);
      p.gpu.attention_backward(qd, kd, vd, mg, p.up(dout), dqd, dkd, dvd);
      expect_close(p.down(dqd), dq, 10 * grad_tol(dt), "dq");
      expect_close(p.down(dkd), dk, 10 * grad_tol(dt), "dk");
      expect_close(p.down(dvd), dv, 10 * grad_tol(dt), "dv");
    }
  }
}

}  // namespace
}  // namespace tl
