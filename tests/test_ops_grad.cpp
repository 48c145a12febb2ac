// Every CpuOps backward against central finite differences of its forward, in fp64:
// L = Σ R∘f(inputs) for a fixed random R, so dL/dy = R; the analytic gradient from
// *_backward must equal (L(x+h) − L(x−h)) / 2h within 1e-6 of the largest gradient.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>

#include "core/cpu/cpu_ops.h"

namespace tl {
namespace {

CpuOps cpu_ops(DType::F64);
Ops& ops = cpu_ops;
std::mt19937_64 rng(1234);

Tensor randn(Shape s, double scale = 1.0) {
  Tensor t = Tensor::zeros(std::move(s), DType::F64);
  std::normal_distribution<double> n(0.0, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = n(rng);
  return t;
}

Tensor ints(Shape s, int lo, int hi) {
  Tensor t = Tensor::zeros(std::move(s), DType::I32);
  std::uniform_int_distribution<int> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<int32_t>()[i] = u(rng);
  return t;
}

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.data<double>()[i] * b.data<double>()[i];
  return s;
}

// Checks d/d(input) of L = ⟨R, forward()⟩ against `analytic` for each perturbed input (every
// `stride`-th one).
void check_grad(const std::string& what, Tensor input, const Tensor& analytic,
                const std::function<Tensor()>& forward, const Tensor& R, int64_t stride = 1) {
  const double h = 1e-6;
  double max_err = 0, max_ref = 0;
  for (int64_t i = 0; i < input.numel(); i += stride) {
    double& x = input.data<double>()[i];
    const double x0 = x;
    x = x0 + h;
    double lp = dot(R, forward());
    x = x0 - h;
    double lm = dot(R, forward());
    x = x0;
    double num = (lp - lm) / (2 * h);
    max_err = std::max(max_err, std::abs(num - analytic.data<double>()[i]));
    max_ref = std::max(max_ref, std::abs(num));
  }
  EXPECT_GT(max_ref, 0.0) << what << ": gradient is identically zero, the check proves nothing";
  EXPECT_LE(max_err, 1e-6 * max_ref) << what << ": max|analytic − numeric| " << max_err << " (max " << max_ref << ")";
}

TEST(OpsGrad, Linear) {
  Tensor x = randn({5, 7}), w = randn({3, 7}), R = randn({5, 3});
  auto f = [&] { Tensor y = ops.zeros({5, 3}); ops.linear_forward(x, w, y); return y; };
  Tensor dx = ops.zeros({5, 7}), dw = ops.zeros({3, 7});
  ops.linear_backward(x, w, R, dx, dw);
  check_grad("linear dx", x, dx, f, R);
  check_grad("linear dw", w, dw, f, R);
}

TEST(OpsGrad, EmbeddingSkipsThePaddingRow) {
  Tensor table = randn({6, 4}), ids = ints({9}, 0, 5), R = randn({9, 4});
  ids.data<int32_t>()[0] = 0;  // the padding id must appear
  auto f = [&] { Tensor y = ops.zeros({9, 4}); ops.embedding_forward(table, ids, 2.5, y); return y; };
  Tensor dt = ops.zeros({6, 4});
  ops.embedding_backward(ids, R, 2.5, -1, dt);
  check_grad("embedding", table, dt, f, R);
  Tensor skip = ops.zeros({6, 4});
  ops.embedding_backward(ids, R, 2.5, 0, skip);
  for (int j = 0; j < 4; ++j) EXPECT_EQ(skip.data<double>()[j], 0.0);
  for (int64_t i = 4; i < 24; ++i) EXPECT_EQ(skip.data<double>()[i], dt.data<double>()[i]);
}

TEST(OpsGrad, RmsNormWithAndWithoutWeight) {
  Tensor x = randn({4, 8}), w = randn({8}), R = randn({4, 8});
  auto f = [&] { Tensor y = ops.zeros({4, 8}); ops.rmsnorm_forward(x, w, 8, 1e-6, y); return y; };
  Tensor dx = ops.zeros({4, 8}), dw = ops.zeros({8});
  ops.rmsnorm_backward(x, w, 8, 1e-6, R, dx, dw);
  check_grad("rmsnorm dx", x, dx, f, R);
  check_grad("rmsnorm dw", w, dw, f, R);
  // Per-head norm without weight (v_norm): rows of width 4 inside [4, 8].
  auto g = [&] { Tensor y = ops.zeros({4, 8}); ops.rmsnorm_forward(x, Tensor(), 4, 1e-6, y); return y; };
  Tensor dx2 = ops.zeros({4, 8}), none;
  ops.rmsnorm_backward(x, Tensor(), 4, 1e-6, R, dx2, none);
  check_grad("rmsnorm no weight", x, dx2, g, R);
}

TEST(OpsGrad, RopeDefaultAndProportional) {
  Tensor pos = ints({6}, 0, 40);
  Tensor inv = Tensor::zeros({4}, DType::F64);
  double vals[4] = {1.0, 0.1, 0.0, 0.0};  // half the pairs unrotated, as proportional RoPE
  for (int i = 0; i < 4; ++i) inv.data<double>()[i] = vals[i];
  Tensor x = randn({6, 2, 8}), R = randn({6, 2, 8});
  auto f = [&] { Tensor y = x.clone(); ops.rope_forward(y, 2, pos, inv); return y; };
  Tensor dx = R.clone();
  ops.rope_backward(dx, 2, pos, inv);
  check_grad("rope", x, dx, f, R);
}

void attention_case(int64_t window, bool docs, int64_t d) {
  const int64_t B = 2, S = 7, nh = 4, nkv = 2;
  Tensor q = randn({B, S, nh, d}, 0.5), k = randn({B, S, nkv, d}, 0.5), v = randn({B, S, nkv, d});
  Tensor doc = ints({B, S}, 0, 0);
  for (int64_t t = 4; t < S; ++t) doc.data<int32_t>()[t] = 1;  // row 0: two documents
  AttentionMask mask{window, docs ? &doc : nullptr};
  Tensor R = randn({B, S, nh, d});
  auto f = [&] { Tensor o = ops.zeros({B, S, nh, d}); ops.attention_forward(q, k, v, mask, o); return o; };
  Tensor dq = ops.zeros(q.shape()), dk = ops.zeros(k.shape()), dv = ops.zeros(v.shape());
  ops.attention_backward(q, k, v, mask, R, dq, dk, dv);
  check_grad("attention dq", q, dq, f, R);
  check_grad("attention dk", k, dk, f, R);
  check_grad("attention dv", v, dv, f, R);
}

// Several 128-query blocks (S = 300), each reading only the keys its queries may see: the
// window cuts keys from the second block on, and the documents 0 | 1 | 0 make the third
// block's queries see the first block's keys again (an id that comes back is the same
// document). With the log-sum-exp kept, the backward recomputes the probabilities from it.
// Every 7th to 13th entry of dq, dk and dv against central differences.
void attention_blocks_case(int64_t window, bool docs, bool keep_lse) {
  const int64_t B = 1, S = 300, nh = 2, nkv = 1, d = 4;
  Tensor q = randn({B, S, nh, d}, 0.5), k = randn({B, S, nkv, d}, 0.5), v = randn({B, S, nkv, d});
  Tensor doc = ints({B, S}, 0, 0);
  for (int64_t t = 100; t < 200; ++t) doc.data<int32_t>()[t] = 1;
  Tensor lse = ops.zeros({B, nh, S});
  AttentionMask mask{window, docs ? &doc : nullptr};
  if (keep_lse) mask.lse = &lse;
  Tensor R = randn({B, S, nh, d});
  auto f = [&] { Tensor o = ops.zeros({B, S, nh, d}); ops.attention_forward(q, k, v, mask, o); return o; };
  f();  // the log-sum-exp of these inputs, for the backward
  Tensor dq = ops.zeros(q.shape()), dk = ops.zeros(k.shape()), dv = ops.zeros(v.shape());
  ops.attention_backward(q, k, v, mask, R, dq, dk, dv);
  check_grad("attention dq", q, dq, f, R, 13);
  check_grad("attention dk", k, dk, f, R, 7);
  check_grad("attention dv", v, dv, f, R, 7);
}

TEST(OpsGrad, AttentionCausal) { attention_case(0, false, 4); }
TEST(OpsGrad, AttentionBlocksCausalWithLogSumExp) { attention_blocks_case(0, false, true); }
TEST(OpsGrad, AttentionBlocksWindowAndDocuments) { attention_blocks_case(100, true, false); }
TEST(OpsGrad, AttentionBlocksWindowAndDocumentsWithLogSumExp) { attention_blocks_case(100, true, true); }
TEST(OpsGrad, AttentionSlidingWindow) { attention_case(3, false, 4); }
TEST(OpsGrad, AttentionPackedDocuments) { attention_case(0, true, 6); }

TEST(OpsGrad, GeluTanhMul) {
  Tensor g = randn({3, 5}, 2.0), u = randn({3, 5}), R = randn({3, 5});
  auto f = [&] { Tensor y = ops.zeros({3, 5}); ops.gelu_tanh_mul_forward(g, u, y); return y; };
  Tensor dg = ops.zeros({3, 5}), du = ops.zeros({3, 5});
  ops.gelu_tanh_mul_backward(g, u, R, dg, du);
  check_grad("gelu gate", g, dg, f, R);
  check_grad("gelu up", u, du, f, R);
}

TEST(OpsGrad, Softcap) {
  Tensor x = randn({10}, 20.0), R = randn({10});
  auto f = [&] { Tensor y = x.clone(); ops.softcap_forward(y, 30.0); return y; };
  Tensor y = f(), dx = R.clone();
  ops.softcap_backward(y, 30.0, dx);
  check_grad("softcap", x, dx, f, R);
}

TEST(OpsGrad, MoeRouteWithRenormalisationAndPerExpertScale) {
  const int64_t n = 5, e = 6, k = 3;
  Tensor logits = randn({n, e}, 2.0), scale = randn({e}, 0.3), R = randn({n, k});
  for (int64_t i = 0; i < e; ++i) scale.data<double>()[i] += 1.0;
  Tensor idx = ops.zeros({n, k}, DType::I32);
  auto f = [&] { Tensor w = ops.zeros({n, k}); ops.moe_route_forward(logits, scale, k, w, idx); return w; };
  f();  // fixes idx; small perturbations keep the same experts (checked below)
  Tensor idx0 = idx.clone();
  Tensor dl = ops.zeros({n, e}), ds = ops.zeros({e});
  ops.moe_route_backward(logits, scale, idx0, R, dl, ds);
  check_grad("moe dlogits", logits, dl, f, R);
  check_grad("moe dscale", scale, ds, f, R);
  for (int64_t i = 0; i < n * k; ++i) ASSERT_EQ(idx.data<int32_t>()[i], idx0.data<int32_t>()[i]);
}

TEST(OpsGrad, GatherScatterAndRowScales) {
  Tensor src = randn({4, 3}), rows = ints({5}, 0, 3), R = randn({5, 3});
  auto f = [&] { Tensor y = ops.zeros({5, 3}); ops.gather_rows(src, rows, y); return y; };
  Tensor ds = ops.zeros({4, 3});
  ops.scatter_rows(R, rows, ds);
  check_grad("gather_rows", src, ds, f, R);

  Tensor e = randn({5, 3}), sc = randn({5}), R2 = randn({4, 3});
  auto g = [&] { Tensor y = ops.zeros({4, 3}); ops.scatter_add_rows(e, rows, sc, y); return y; };
  Tensor dsc = ops.zeros({5});
  ops.rowwise_dot(e, rows, R2, dsc);
  check_grad("scatter_add scale", sc, dsc, g, R2);
}

TEST(OpsGrad, CrossEntropyFusedWithSoftcap) {
  const int64_t n = 4, v = 9;
  Tensor z = randn({n, v}, 15.0), labels = ints({n}, 0, int(v - 1));
  labels.data<int32_t>()[2] = -100;
  // Row 0's label is its argmax, so at least one hit is counted; the hits are counted by hand
  // below (first maximum, as torch.argmax), over the rows with a label.
  labels.data<int32_t>()[0] = int32_t(std::max_element(z.data<double>(), z.data<double>() + v) - z.data<double>());
  int64_t hits = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double* row = z.data<double>() + i * v;
    const int32_t y = labels.data<int32_t>()[i];
    hits += y != -100 && std::max_element(row, row + v) - row == y;
  }
  ASSERT_GE(hits, 1);
  // L(z) = Σ CE(softcap(z)) · 0.25; the fused backward returns dL/dz.
  auto loss = [&] {
    Tensor y = z.clone();
    ops.softcap_forward(y, 30.0);
    int64_t c = 0;
    Tensor out = Tensor::zeros({1}, DType::F64);
    out.data<double>()[0] = 0.25 * ops.cross_entropy_sum(y, labels, c);
    return out;
  };
  Tensor y = z.clone();
  ops.softcap_forward(y, 30.0);
  Tensor dz = ops.zeros({n, v});
  Tensor sums = Tensor::zeros({2}, DType::F64);
  sums.data<double>()[0] = 1.5;  // it adds: a step accumulates over chunks and micro-batches
  ops.cross_entropy_backward(y, labels, 0.25, 30.0, dz, sums);
  EXPECT_NEAR(0.25 * (sums.data<double>()[0] - 1.5), loss().data<double>()[0], 1e-12);
  EXPECT_EQ(sums.data<double>()[1], double(hits));
  Tensor one = Tensor::zeros({1}, DType::F64);
  one.data<double>()[0] = 1.0;
  check_grad("cross_entropy+softcap", z, dz, loss, one);
  for (int64_t j = 0; j < v; ++j) EXPECT_EQ(dz.data<double>()[2 * v + j], 0.0);
}

}  // namespace
}  // namespace tl
