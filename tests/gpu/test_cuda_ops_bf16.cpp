// CudaOps with BF16 activations (CudaOps(DType::BF16, CudaMatmul::Bf16), issue 10) against the
// CpuOps F32 reference: every op, forward and backward.
//
// Inputs are random values that bf16 represents exactly, so both backends start from the same
// numbers; the CPU computes in fp32 (or double where it does), the GPU loads bf16, computes in
// fp32 and rounds each output to bf16 once. Tolerances, |gpu − cpu| ≤ tol·(1 + |cpu|):
//   kOne   = 2^-8: one rounding to bf16 (relative error ≤ 2^-9) plus fp32 summation order;
//   kTwo   = 2^-7: two bf16 roundings (a bf16 atomic add of a rounded product; attention's
//            bf16 probabilities times V);
//   kChain = 2^-6: attention's backward, through bf16 P and dS;
//   kF32   = 1e-4: F32 outputs (LoRA masters' dW, fp32 Adam state) from bf16-exact inputs,
//            differing only in fp32 summation order.
// Each test skips without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/nf4.h"
#include "tests/gpu/gpu_test_util.h"

namespace tl {
namespace {

using namespace gpu_test;

constexpr double kOne = 1.0 / 256, kTwo = 1.0 / 128, kChain = 1.0 / 64, kF32 = 1e-4;

// The reference (CpuOps F32) and the bf16 GPU backend.
struct Bf16Pair {
  CpuOps cpu{DType::F32};
  CudaOps gpu{DType::BF16, CudaMatmul::Bf16};
  Tensor up(const Tensor& host) { return gpu.upload(host, DType::BF16); }   // an activation
  Tensor up32(const Tensor& host) { return gpu.upload(host, DType::F32); }  // an F32 master
  Tensor down(const Tensor& dev) { return gpu.download(dev).to(DType::F32); }
};

// F32 host values that are exactly bf16.
Tensor bf(const Shape& shape, std::mt19937& rng, double lo = -1, double hi = 1) {
  return random(shape, DType::BF16, rng, lo, hi).to(DType::F32);
}

// `t` rounded to bf16 (what the GPU stores) and back, on the host.
Tensor rounded(const Tensor& t) { return t.to(DType::BF16).to(DType::F32); }

TEST(CudaOpsBf16, BackendAndTransfers) {
  TL_REQUIRE_GPU();
  Bf16Pair p;
  EXPECT_EQ(p.gpu.act_dtype(), DType::BF16);
  EXPECT_EQ(p.gpu.master_dtype(), DType::F32);
  EXPECT_EQ(p.gpu.frozen_dtype(), DType::BF16);  // the frozen base stays in the activation dtype
  Tensor z = p.gpu.zeros({3, 5});
  EXPECT_EQ(z.dtype(), DType::BF16);
  EXPECT_EQ(z.nbytes(), size_t(30));
  std::mt19937 rng(1);
  Tensor h = random({4, 7}, DType::F32, rng);
  // Upload rounds to nearest even on the host; the round trip is that rounding exactly.
  expect_close(p.down(p.up(h)), rounded(h), 0, "bf16 round trip");
  EXPECT_THROW([] { CudaOps fp32_products(DType::BF16, CudaMatmul::F32); }(), std::invalid_argument);
}

TEST(CudaOpsBf16, LinearBf16Weight) {
  TL_REQUIRE_GPU();
  for (bool accumulate : {false, true}) {
    SCOPED_TRACE(accumulate ? "accumulate" : "overwrite");
    std::mt19937 rng(2);
    Bf16Pair p;
    Tensor x = bf({37, 96}, rng), w = bf({40, 96}, rng), y = bf({37, 40}, rng), yd = p.up(y);
    p.cpu.linear_forward(x, w, y, accumulate);
    p.gpu.linear_forward(p.up(x), p.up(w), yd, accumulate);
    EXPECT_EQ(yd.dtype(), DType::BF16);
    expect_close(p.down(yd), y, kOne, "linear bf16 W");
  }
}

// LoRA: x, dy bf16 beside an F32 master W. The GPU multiplies W rounded to bf16 (autocast's
// numerics), so the reference multiplies that rounding too; dW stays F32, straight from the
// fp32 accumulator.
TEST(CudaOpsBf16, LinearF32MasterWeight) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(3);
  Bf16Pair p;
  const int64_t n = 37, in = 65, r = 8;
  Tensor x = bf({n, in}, rng), w = random({r, in}, DType::F32, rng), dy = bf({n, r}, rng);
  Tensor y = p.cpu.zeros({n, r}), yd = p.gpu.zeros({n, r});
  p.cpu.linear_forward(x, rounded(w), y, false);
  p.gpu.linear_forward(p.up(x), p.up32(w), yd, false);
  expect_close(p.down(yd), y, kOne, "linear F32 master W");
  Tensor dx = bf({n, in}, rng), dw = random({r, in}, DType::F32, rng);
  Tensor dxd = p.up(dx), dwd = p.up32(dw);
  p.cpu.linear_backward(x, rounded(w), dy, dx, dw);
  p.gpu.linear_backward(p.up(x), p.up32(w), p.up(dy), dxd, dwd);
  EXPECT_EQ(dwd.dtype(), DType::F32);
  expect_close(p.down(dxd), dx, kOne, "linear_backward dx (F32 master)");
  expect_close(p.gpu.download(dwd), dw, kF32, "linear_backward dW (F32 master)");
  // A bf16 dW for an F32 W is refused (it must match W).
  Tensor bad = p.gpu.zeros({r, in});
  EXPECT_THROW(p.gpu.linear_backward(p.up(x), p.up32(w), p.up(dy), dxd, bad), std::invalid_argument);
}

TEST(CudaOpsBf16, LinearBackwardBf16Weight) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(4);
  Bf16Pair p;
  Tensor x = bf({37, 65}, rng), w = bf({19, 65}, rng), dy = bf({37, 19}, rng);
  Tensor dx = bf({37, 65}, rng), dw = bf({19, 65}, rng), dxd = p.up(dx), dwd = p.up(dw), none;
  p.cpu.linear_backward(x, w, dy, dx, dw);
  p.gpu.linear_backward(p.up(x), p.up(w), p.up(dy), dxd, dwd);
  expect_close(p.down(dxd), dx, kOne, "linear_backward dx");
  expect_close(p.down(dwd), dw, kOne, "linear_backward dW (bf16)");
}

TEST(CudaOpsBf16, Nf4Linear) {
  TL_REQUIRE_GPU();
  for (bool dq : {false, true}) {
    SCOPED_TRACE(dq ? "double-quant" : "plain absmax");
    std::mt19937 rng(5);
    Bf16Pair p;
    const Nf4Tensor w = nf4_quantize(random({300, 256}, DType::F32, rng).to(DType::BF16), dq);
    Tensor x = bf({64, 256}, rng), dy = bf({64, 300}, rng);
    Tensor y = p.cpu.zeros({64, 300}), yd = p.gpu.zeros({64, 300});
    p.cpu.linear_nf4_forward(x, w, y);  // the dequantized values are bf16-exact (orig dtype BF16)
    p.gpu.linear_nf4_forward(p.up(x), w, yd);
    expect_close(p.down(yd), y, kOne, "linear_nf4_forward");
    Tensor dx = bf({64, 256}, rng), dxd = p.up(dx);
    p.cpu.linear_nf4_backward(dy, w, dx);
    p.gpu.linear_nf4_backward(p.up(dy), w, dxd);
    expect_close(p.down(dxd), dx, kOne, "linear_nf4_backward");
  }
}

TEST(CudaOpsBf16, EmbeddingAndBackward) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(6);
  Bf16Pair p;
  Tensor table = bf({11, 24}, rng), ids = ints({0, 10, 3, 3, 7, 1, 10, 5, 2});
  Tensor out = p.cpu.zeros({9, 24}), outd = p.gpu.zeros({9, 24});
  p.cpu.embedding_forward(table, ids, std::sqrt(24.0), out);
  p.gpu.embedding_forward(p.up(table), ids, std::sqrt(24.0), outd);
  expect_close(p.down(outd), out, kOne, "embedding_forward");
  // Repeated ids add twice: a bf16 atomic of a rounded product each time.
  Tensor dout = bf({9, 24}, rng), dt = bf({11, 24}, rng), dtd = p.up(dt);
  p.cpu.embedding_backward(ids, dout, 2.5, 3, dt);
  p.gpu.embedding_backward(p.up(ids), p.up(dout), 2.5, 3, dtd);
  expect_close(p.down(dtd), dt, kTwo, "embedding_backward");
}

TEST(CudaOpsBf16, RmsNormAndBackward) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(7);
  Bf16Pair p;
  Tensor x = bf({300, 48}, rng, -3, 3), w = bf({48}, rng, 0, 2), y = p.cpu.zeros({300, 48}),
         yd = p.gpu.zeros({300, 48});
  p.cpu.rmsnorm_forward(x, w, 0, 1e-6, y);
  p.gpu.rmsnorm_forward(p.up(x), p.up(w), 0, 1e-6, yd);
  expect_close(p.down(yd), y, kOne, "rmsnorm_forward");
  Tensor xd = p.up(x);  // no weight, in place
  p.cpu.rmsnorm_forward(x, Tensor(), 16, 1e-6, y);
  p.gpu.rmsnorm_forward(xd, Tensor(), 16, 1e-6, xd);
  expect_close(p.down(xd), y, kOne, "rmsnorm_forward without weight, in place");
  Tensor dy = bf({300, 48}, rng), dx = bf({300, 48}, rng), dw = bf({48}, rng), dxd = p.up(dx), dwd = p.up(dw);
  p.cpu.rmsnorm_backward(x, w, 0, 1e-6, dy, dx, dw);
  p.gpu.rmsnorm_backward(p.up(x), p.up(w), 0, 1e-6, p.up(dy), dxd, dwd);
  expect_close(p.down(dxd), dx, kOne, "rmsnorm_backward dx");
  expect_close(p.down(dwd), dw, kOne, "rmsnorm_backward dw");
}

TEST(CudaOpsBf16, RopeAndBackward) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(8);
  Bf16Pair p;
  const int64_t heads = 3, half = 8;
  Tensor inv_freq = Tensor::zeros({half}, DType::F64);
  for (int64_t i = 0; i < half - 2; ++i) inv_freq.data<double>()[i] = std::pow(10000.0, -double(i) / half);
  const Tensor inv_freq_d = p.gpu.upload(inv_freq, DType::F64);  // on the device from load time
  Tensor pos = ints({0, 1, 5, 17, 300, 1000});
  Tensor x = bf({6, heads * 2 * half}, rng), xd = p.up(x);
  p.cpu.rope_forward(x, heads, pos, inv_freq);
  p.gpu.rope_forward(xd, heads, pos, inv_freq_d);
  expect_close(p.down(xd), x, kOne, "rope_forward");
  Tensor g = bf({6, heads * 2 * half}, rng), gd = p.up(g);
  p.cpu.rope_backward(g, heads, pos, inv_freq);
  p.gpu.rope_backward(gd, heads, pos, inv_freq_d);
  expect_close(p.down(gd), g, kOne, "rope_backward");
}

struct AttnCase {
  int64_t B, S, nh, nkv, d, window;
  bool docs;
};
const AttnCase kAttnCases[] = {
    {2, 37, 4, 2, 512, 8, true},   // global-layer head_dim, window + documents, GQA
    {1, 45, 2, 1, 256, 0, false},  // sliding-layer head_dim, full causal, odd key count
    {2, 70, 4, 4, 64, 0, true},    // no GQA, documents
};

std::string attn_name(const AttnCase& c) {
  return "d=" + std::to_string(c.d) + " S=" + std::to_string(c.S) + " window=" + std::to_string(c.window) +
         (c.docs ? " docs" : "");
}

TEST(CudaOpsBf16, AttentionAndBackward) {
  TL_REQUIRE_GPU();
  for (const AttnCase& c : kAttnCases) {
    SCOPED_TRACE(attn_name(c));
    std::mt19937 rng(9);
    Bf16Pair p;
    Tensor q = bf({c.B, c.S, c.nh, c.d}, rng, -0.5, 0.5), k = bf({c.B, c.S, c.nkv, c.d}, rng, -0.5, 0.5),
           v = bf({c.B, c.S, c.nkv, c.d}, rng), dout = bf(q.shape(), rng);
    std::vector<int32_t> doc;
    for (int64_t i = 0; i < c.B * c.S; ++i) doc.push_back(int32_t(i / 9));
    Tensor docs = ints(doc, {c.B, c.S});
    AttentionMask mask{c.window, c.docs ? &docs : nullptr};
    Tensor out = p.cpu.zeros(q.shape()), outd = p.gpu.zeros(q.shape());
    p.cpu.attention_forward(q, k, v, mask, out);
    p.gpu.attention_forward(p.up(q), p.up(k), p.up(v), mask, outd);
    expect_close(p.down(outd), out, kTwo, "attention_forward");
    Tensor dq = bf(q.shape(), rng), dk = bf(k.shape(), rng), dv = bf(v.shape(), rng);
    Tensor dqd = p.up(dq), dkd = p.up(dk), dvd = p.up(dv);
    p.cpu.attention_backward(q, k, v, mask, dout, dq, dk, dv);
    p.gpu.attention_backward(p.up(q), p.up(k), p.up(v), mask, p.up(dout), dqd, dkd, dvd);
    expect_close(p.down(dqd), dq, kChain, "attention_backward dq");
    expect_close(p.down(dkd), dk, kChain, "attention_backward dk");
    expect_close(p.down(dvd), dv, kChain, "attention_backward dv");
  }
}

// KV-cached attention over a ring of keys against the full attention on the CPU.
TEST(CudaOpsBf16, AttentionCached) {
  TL_REQUIRE_GPU();
  for (int64_t window : {int64_t(0), int64_t(3)}) {
    SCOPED_TRACE("window=" + std::to_string(window));
    std::mt19937 rng(10);
    Bf16Pair p;
    const int64_t S = 10, nh = 4, nkv = 2, d = 8;
    Tensor q = bf({1, S, nh, d}, rng, -0.5, 0.5), k = bf({1, S, nkv, d}, rng, -0.5, 0.5), v = bf({1, S, nkv, d}, rng);
    Tensor out = p.cpu.zeros(q.shape());
    p.cpu.attention_forward(q, k, v, AttentionMask{window, nullptr}, out);
    const RotatedCache c = rotated_cache(k, v);
    Tensor outd = p.gpu.zeros({S, nh, d});
    p.gpu.attention_cached_forward(p.up(q.view({S, nh, d})), p.up(c.k), p.up(c.v), ints(c.q_pos), ints(c.k_pos),
                                   window, outd);
    expect_close(p.down(outd).view(q.shape()), out, kOne, "attention_cached_forward");
  }
}

TEST(CudaOpsBf16, ElementwiseAndBackward) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(11);
  Bf16Pair p;
  const Shape s{3, 1000};
  Tensor a = bf(s, rng, -4, 4), b = bf(s, rng, -4, 4), out = p.cpu.zeros(s), outd = p.gpu.zeros(s);
  Tensor ad = p.up(a), bd = p.up(b);
  p.cpu.add(a, b, out);
  p.gpu.add(ad, bd, outd);
  expect_close(p.down(outd), out, kOne, "add");
  p.cpu.mul(a, b, out);
  p.gpu.mul(ad, bd, outd);
  expect_close(p.down(outd), out, kOne, "mul");
  p.cpu.gelu_tanh_mul_forward(a, b, out);
  p.gpu.gelu_tanh_mul_forward(ad, bd, outd);
  expect_close(p.down(outd), out, kOne, "gelu_tanh_mul_forward");
  // scale, scale_rows and softcap each from bf16-exact inputs, so each has one rounding.
  Tensor a2 = a.clone(), ad2 = p.up(a);
  p.cpu.scale(a2, -0.37);
  p.gpu.scale(ad2, -0.37);
  expect_close(p.down(ad2), a2, kOne, "scale");
  Tensor rs = bf({3}, rng), a3 = a.clone(), ad3 = p.up(a);
  p.cpu.scale_rows(a3, rs);
  p.gpu.scale_rows(ad3, p.up(rs));
  expect_close(p.down(ad3), a3, kOne, "scale_rows");
  Tensor big = bf(s, rng, -100, 100), bigd = p.up(big);
  p.cpu.softcap_forward(big, 30.0);
  p.gpu.softcap_forward(bigd, 30.0);
  expect_close(p.down(bigd), big, kOne, "softcap_forward");

  Tensor gate = bf(s, rng, -4, 4), up = bf(s, rng, -2, 2), dout = bf(s, rng);
  Tensor dgate = bf(s, rng), dup = bf(s, rng), dgated = p.up(dgate), dupd = p.up(dup);
  p.cpu.gelu_tanh_mul_backward(gate, up, dout, dgate, dup);
  p.gpu.gelu_tanh_mul_backward(p.up(gate), p.up(up), p.up(dout), dgated, dupd);
  expect_close(p.down(dgated), dgate, kOne, "gelu_tanh_mul_backward dgate");
  expect_close(p.down(dupd), dup, kOne, "gelu_tanh_mul_backward dup");
  Tensor y = rounded(big), dy = bf(s, rng), dyd = p.up(dy);  // y: the capped values, as stored
  p.cpu.softcap_backward(y, 30.0, dy);
  p.gpu.softcap_backward(p.up(y), 30.0, dyd);
  expect_close(p.down(dyd), dy, kOne, "softcap_backward");
}

TEST(CudaOpsBf16, CopyGatherScatterRows) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(12);
  Bf16Pair p;
  Tensor src = bf({5, 12}, rng), dst = bf({5, 9}, rng), dstd = p.up(dst);
  p.cpu.copy_columns(src, 3, dst, 2, 6);
  p.gpu.copy_columns(p.up(src), 3, dstd, 2, 6);
  expect_close(p.down(dstd), dst, 0, "copy_columns");
  Tensor table = bf({10, 7}, rng), rows = ints({3, 3, 0, 9, 5});
  Tensor g = p.cpu.zeros({5, 7}), gd = p.gpu.zeros({5, 7});
  p.cpu.gather_rows(table, rows, g);
  p.gpu.gather_rows(p.up(table), rows, gd);
  expect_close(p.down(gd), g, 0, "gather_rows");
  Tensor add = bf({5, 7}, rng), sc = bf({5}, rng), acc = bf({8, 7}, rng), accd = p.up(acc);
  Tensor rows2 = ints({1, 4, 1, 7, 0});
  p.cpu.scatter_add_rows(add, rows2, sc, acc);
  p.gpu.scatter_add_rows(p.up(add), p.up(rows2), p.up(sc), accd);
  expect_close(p.down(accd), acc, kTwo, "scatter_add_rows");
  Tensor srcr = bf({5, 300}, rng), dstr = bf({8, 300}, rng), dstrd = p.up(dstr);
  p.cpu.scatter_rows(srcr, rows2, dstr);
  p.gpu.scatter_rows(p.up(srcr), rows2, dstrd);
  expect_close(p.down(dstrd), dstr, kTwo, "scatter_rows");
  Tensor dot = p.cpu.zeros({5}), dotd = p.gpu.zeros({5});
  Tensor stored = rounded(dstr);  // the GPU's dst is bf16: dot it with the same values
  p.cpu.rowwise_dot(srcr, rows2, stored, dot);
  p.gpu.rowwise_dot(p.up(srcr), p.up(rows2), p.up(stored), dotd);
  expect_close(p.down(dotd), dot, kOne, "rowwise_dot");
}

TEST(CudaOpsBf16, MoeRouteAndBackward) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(13);
  Bf16Pair p;
  const int64_t n = 33, e = 16, k = 4;
  Tensor logits = bf({n, e}, rng, -3, 3);
  for (int64_t j = 0; j < e; ++j) {  // ties resolve to the lower index
    logits.data<float>()[j] = 0.5f;
    logits.data<float>()[e + j] = float(j / 2);
  }
  Tensor scale = bf({e}, rng, 0.5, 1.5);
  Tensor w = p.cpu.zeros({n, k}), idx = p.cpu.zeros({n, k}, DType::I32);
  Tensor wd = p.gpu.zeros({n, k}), idxd = p.gpu.zeros({n, k}, DType::I32);
  p.cpu.moe_route_forward(logits, scale, k, w, idx);
  p.gpu.moe_route_forward(p.up(logits), p.up(scale), k, wd, idxd);
  expect_equal_ints(p.gpu.download(idxd), idx, "moe_route idx");
  expect_close(p.down(wd), w, kOne, "moe_route weights");
  Tensor dw = bf({n, k}, rng), dl = bf({n, e}, rng), ds = bf({e}, rng), dld = p.up(dl), dsd = p.up(ds);
  p.cpu.moe_route_backward(logits, scale, idx, dw, dl, ds);
  p.gpu.moe_route_backward(p.up(logits), p.up(scale), p.up(idx), p.up(dw), dld, dsd);
  expect_close(p.down(dld), dl, kOne, "moe_route_backward dlogits");
  expect_close(p.down(dsd), ds, kOne, "moe_route_backward dscale");
}

// The loss statistics run in double from the same bf16 logits on both backends: the sums
// agree to double rounding, not bf16's. The gradient is rounded to bf16 once.
TEST(CudaOpsBf16, CrossEntropyAndBackward) {
  TL_REQUIRE_GPU();
  for (double cap : {0.0, 30.0}) {
    SCOPED_TRACE("cap=" + std::to_string(cap));
    std::mt19937 rng(14);
    Bf16Pair p;
    const int64_t n = 12, v = 700;
    Tensor logits = bf({n, v}, rng, -10, 10), ld = p.up(logits);
    std::vector<int32_t> lab;
    for (int64_t i = 0; i < n; ++i) lab.push_back(i % 4 == 1 ? -100 : int32_t(rng() % uint32_t(v)));
    Tensor labels = ints(lab);
    int64_t cc = -1, cg = -2;
    const double want = p.cpu.cross_entropy_sum(logits, labels, cc);
    EXPECT_NEAR(p.gpu.cross_entropy_sum(ld, labels, cg), want, 1e-9 * (1 + std::abs(want)));
    EXPECT_EQ(cg, cc);
    Tensor g = bf({n, v}, rng), gd = p.up(g);
    Tensor sums_c = p.cpu.zeros({2}, DType::F64), sums_g = p.gpu.zeros({2}, DType::F64);
    p.cpu.cross_entropy_backward(logits, labels, 1.0 / 9, cap, g, sums_c);
    p.gpu.cross_entropy_backward(ld, labels, 1.0 / 9, cap, gd, sums_g);
    const Tensor sg = p.gpu.download(sums_g);
    const double want2 = sums_c.data<double>()[0];
    EXPECT_NEAR(sg.data<double>()[0], want2, 1e-9 * (1 + std::abs(want2)));
    EXPECT_EQ(sg.data<double>()[1], sums_c.data<double>()[1]);
    expect_close(p.down(gd), g, kOne, "cross_entropy_backward dlogits");
  }
}

TEST(CudaOpsBf16, TokenAccuracyAndDropoutMask) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(15);
  Bf16Pair p;
  const int64_t n = 9, v = 1000;
  Tensor logits = bf({n, v}, rng, -5, 5);  // bf16 has many ties: both take the lowest index
  std::vector<int32_t> lab;
  for (int64_t t = 0; t < n; ++t) {
    int64_t best = 0;
    for (int64_t j = 1; j < v; ++j)
      if (logits.data<float>()[t * v + j] > logits.data<float>()[t * v + best]) best = j;
    lab.push_back(int32_t(t % 2 == 0 ? best : (best + 1) % v));
  }
  // The hits are counted by the cross-entropy backward, into sums[1], on the device.
  Tensor sums = p.gpu.zeros({2}, DType::F64), dlogits = p.gpu.zeros({n, v});
  p.gpu.cross_entropy_backward(p.up(logits), p.gpu.upload(ints(lab), DType::I32), 1.0, 0.0, dlogits, sums);
  EXPECT_EQ(p.gpu.download(sums).data<double>()[1], 5.0);
  // The mask holds 1/(1−p) rounded to bf16 (the activation dtype it multiplies).
  for (double prob : {0.0, 0.1}) {
    Tensor m = p.cpu.zeros({37, 129}), md = p.gpu.zeros({37, 129});
    p.cpu.dropout_mask(0x1234abcdull, prob, m);
    p.gpu.dropout_mask(0x1234abcdull, prob, md);
    expect_close(p.down(md), rounded(m), 0, "dropout_mask");
  }
}

// The optimizer on a bf16 backend: F32 masters as the trainer keeps them (the same numbers as
// the CPU), and a BF16 tensor updated in fp32 and rounded once.
TEST(CudaOpsBf16, Norm2AndAdamW) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(16);
  Bf16Pair p;
  Tensor x = bf({5000}, rng);
  EXPECT_NEAR(p.gpu.norm2(p.up(x)), p.cpu.norm2(x), 1e-9 * p.cpu.norm2(x));
  EXPECT_NEAR(p.gpu.norm2(p.up32(x)), p.cpu.norm2(x), 1e-9 * p.cpu.norm2(x));
  const double bc1 = 1 - std::pow(0.9, 3), bc2 = 1 - std::pow(0.999, 3);
  Tensor w = random({33, 7}, DType::F32, rng), g = random({33, 7}, DType::F32, rng),
         m = random({33, 7}, DType::F32, rng), v = random({33, 7}, DType::F32, rng, 0, 1);
  Tensor wd = p.up32(w), md = p.up32(m), vd = p.up32(v);
  // The BF16 case starts from the bf16 roundings of the same state.
  Tensor w16 = p.up(w), m16 = p.up(m), v16 = p.up(v), g16 = p.up(g);
  Tensor wr = rounded(w), mr = rounded(m), vr = rounded(v), gr = rounded(g);
  p.cpu.adamw_update(wr, gr, mr, vr, 1e-3, 0.9, 0.999, 1e-8, 0.01, bc1, bc2, 1.0);
  p.cpu.adamw_update(w, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, bc1, bc2, 0.625);
  p.gpu.adamw_update(wd, p.up32(g), md, vd, 1e-3, 0.9, 0.999, 1e-8, 0.01, bc1, bc2, 0.625);
  expect_close(p.gpu.download(wd), w, tol(DType::F32), "adamw F32 p");
  expect_close(p.gpu.download(md), m, tol(DType::F32), "adamw F32 m");
  expect_close(p.gpu.download(vd), v, tol(DType::F32), "adamw F32 v");
  p.gpu.adamw_update(w16, g16, m16, v16, 1e-3, 0.9, 0.999, 1e-8, 0.01, bc1, bc2, 1.0);
  expect_close(p.down(w16), wr, kOne, "adamw BF16 p");
  expect_close(p.down(m16), mr, kOne, "adamw BF16 m");
  expect_close(p.down(v16), vr, kOne, "adamw BF16 v");
  EXPECT_THROW(p.gpu.adamw_update(wd, g16, md, vd, 1e-3, 0.9, 0.999, 1e-8, 0.01, bc1, bc2, 1.0), std::invalid_argument);
}

}  // namespace
}  // namespace tl
