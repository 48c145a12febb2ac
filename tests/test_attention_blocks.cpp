// The blocked CPU attention skips what the masks remove: at S = 2048 a causal layer computes
// at most 0.55·S² scores per head (the whole square before), a sliding layer at most
// (window + block)·S, two documents less than one; and what it computes is attention: the
// output against a double-precision reference that applies the masks to every (query, key)
// pair, with a document id that comes back after another document, and the backward from
// the saved log-sum-exp against the one that recomputes it.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/cpu/cpu_ops.h"
#include "golden_util.h"

namespace tl {
namespace {

constexpr int64_t kS = 2048, kBlock = 128;

Tensor randn(Shape shape, uint32_t seed, double scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  Tensor t = Tensor::zeros(std::move(shape), DType::F64);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = scale * normal(rng);
  return t;
}

// Scores each head computes in one forward.
double scores_per_head(int64_t window, const Tensor* docs) {
  CpuOps ops(DType::F32);
  const int64_t nh = 2, d = 8;
  const Tensor q = randn({1, kS, nh, d}, 1, 0.3).to(DType::F32), k = randn({1, kS, 1, d}, 2, 0.3).to(DType::F32);
  Tensor out = Tensor::zeros({1, kS, nh, d}, DType::F32);
  AttentionMask mask;
  mask.window = window;
  mask.doc_ids = docs;
  ops.attention_forward(q, k, k, mask, out);
  return double(ops.attention_scores()) / double(nh);
}

Tensor two_documents() {
  Tensor docs = Tensor::zeros({1, kS}, DType::I32);
  for (int64_t s = 0; s < kS; ++s) docs.data<int32_t>()[s] = s < kS / 2 ? 0 : 1;
  return docs;
}

TEST(AttentionBlocks, ScoresComputedStayInsideTheMasks) {
  const double S2 = double(kS) * double(kS);
  const double causal = scores_per_head(0, nullptr), sliding = scores_per_head(1024, nullptr);
  const Tensor docs = two_documents();
  const double documents = scores_per_head(0, &docs);
  EXPECT_LE(causal, 0.55 * S2);
  EXPECT_GE(causal, 0.5 * S2);  // the triangle itself must be computed
  EXPECT_LE(sliding, double(1024 + kBlock) * double(kS));
  EXPECT_GE(sliding, 1024.0 * double(kS) - 1024.0 * 1023.0 / 2);  // every query's min(t + 1, 1024) keys
  EXPECT_LT(documents, 0.55 * causal);
  EXPECT_GE(documents, 2 * 0.5 * double(kS / 2) * double(kS / 2));  // each half's own triangle
  std::printf("scores per head at S = %lld: causal %.3f·S², window 1024 %.3f·S², two documents %.3f·S²\n",
              (long long)kS, causal / S2, sliding / S2, documents / S2);
}

// out[t] = Σ_s softmax_s(q_t·k_s over visible s)·v_s in double, the masks applied pair by pair.
Tensor reference(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window, const int32_t* doc) {
  const int64_t S = q.dim(1), nh = q.dim(2), d = q.dim(3), nkv = k.dim(2), group = nh / nkv;
  Tensor out = Tensor::zeros(q.shape(), DType::F64);
  std::vector<double> p(static_cast<size_t>(S));
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t t = 0; t < S; ++t) {
      double mx = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        const bool ok = s <= t && (window <= 0 || t - s < window) && (!doc || doc[s] == doc[t]);
        double dot = -INFINITY;
        if (ok) {
          dot = 0;
          for (int64_t j = 0; j < d; ++j) dot += q.get((t * nh + h) * d + j) * k.get((s * nkv + h / group) * d + j);
        }
        p[size_t(s)] = dot;
        mx = std::max(mx, dot);
      }
      double z = 0;
      for (auto& x : p) z += (x = std::isinf(x) ? 0.0 : std::exp(x - mx));
      for (int64_t j = 0; j < d; ++j) {
        double o = 0;
        for (int64_t s = 0; s < S; ++s) o += p[size_t(s)] / z * v.get((s * nkv + h / group) * d + j);
        out.data<double>()[(t * nh + h) * d + j] = o;
      }
    }
  return out;
}

TEST(AttentionBlocks, EqualsAttentionAppliedPairByPair) {
  const int64_t S = 600, nh = 4, nkv = 2, d = 8;
  Tensor docs = Tensor::zeros({1, S}, DType::I32);
  for (int64_t s = 0; s < S; ++s) docs.data<int32_t>()[s] = s < 200 ? 7 : s < 450 ? 3 : 7;  // 7 comes back
  const Tensor q = randn({1, S, nh, d}, 3, 0.5), k = randn({1, S, nkv, d}, 4, 0.5), v = randn({1, S, nkv, d}, 5, 1.0);
  CpuOps ops(DType::F64);
  for (int64_t window : {int64_t(0), int64_t(150)})
    for (const Tensor* doc : {static_cast<const Tensor*>(nullptr), static_cast<const Tensor*>(&docs)}) {
      AttentionMask mask;
      mask.window = window;
      mask.doc_ids = doc;
      Tensor out = Tensor::zeros(q.shape(), DType::F64);
      ops.attention_forward(q, k, v, mask, out);
      const auto diff = test::compare(out, reference(q, k, v, window, doc ? doc->data<int32_t>() : nullptr));
      EXPECT_LE(diff.max_abs, 1e-12) << "window " << window << (doc ? " with documents" : "");
    }
}

TEST(AttentionBlocks, BackwardFromTheSavedLogSumExpEqualsTheRecomputedOne) {
  const int64_t S = 400, nh = 4, nkv = 1, d = 16;
  Tensor docs = Tensor::zeros({1, S}, DType::I32);
  for (int64_t s = 0; s < S; ++s) docs.data<int32_t>()[s] = s < 130 ? 0 : 1;
  const Tensor q = randn({1, S, nh, d}, 6, 0.5).to(DType::F32), k = randn({1, S, nkv, d}, 7, 0.5).to(DType::F32),
               v = randn({1, S, nkv, d}, 8, 1.0).to(DType::F32), dout = randn({1, S, nh, d}, 9, 1.0).to(DType::F32);
  CpuOps ops(DType::F32);
  Tensor lse = Tensor::zeros({1, nh, S}, DType::F32), out = Tensor::zeros(q.shape(), DType::F32);
  AttentionMask with;
  with.window = 100;
  with.doc_ids = &docs;
  with.lse = &lse;
  AttentionMask without = with;
  without.lse = nullptr;
  ops.attention_forward(q, k, v, with, out);
  EXPECT_NE(lse.get(0), 0.0);
  Tensor dq[2] = {Tensor::zeros(q.shape(), DType::F32), Tensor::zeros(q.shape(), DType::F32)};
  Tensor dk[2] = {Tensor::zeros(k.shape(), DType::F32), Tensor::zeros(k.shape(), DType::F32)};
  Tensor dv[2] = {Tensor::zeros(v.shape(), DType::F32), Tensor::zeros(v.shape(), DType::F32)};
  ops.attention_backward(q, k, v, with, dout, dq[0], dk[0], dv[0]);
  ops.attention_backward(q, k, v, without, dout, dq[1], dk[1], dv[1]);
  for (auto* g : {dq, dk, dv}) {
    const auto diff = test::compare(g[0], g[1]);
    EXPECT_LE(diff.max_abs, 1e-5 * diff.max_ref);
    EXPECT_GT(diff.max_ref, 0.0);
  }
}

}  // namespace
}  // namespace tl
