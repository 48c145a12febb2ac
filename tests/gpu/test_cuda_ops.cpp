// CudaOps against CpuOps (the reference): every op, forward and backward, on random inputs,
// F32 and F64.
// Each test skips when no CUDA device is present, so the binary passes on CPU-only CI.
#include <cstring>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "tests/gpu/gpu_test_util.h"

namespace tl {
namespace {

using namespace gpu_test;

TEST(CudaOps, TransfersAndZeros) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  std::mt19937 rng(1);
  CudaOps ops;
  EXPECT_EQ(ops.device(), Device::CUDA);
  Tensor z = ops.zeros({3, 5});
  EXPECT_EQ(z.device(), Device::CUDA);
  EXPECT_EQ(z.dtype(), DType::F32);
  Tensor zh = ops.download(z);
  for (int64_t i = 0; i < zh.numel(); ++i) EXPECT_EQ(zh.get(i), 0.0);
  // empty: a device buffer of the shape that a product overwrites whole.
  Tensor e = ops.empty({3, 5});
  EXPECT_EQ(e.device(), Device::CUDA);
  EXPECT_EQ(e.shape(), z.shape());
  ops.linear_forward(ops.upload(random({3, 2}, DType::F32, rng), DType::F32),
                     ops.upload(Tensor::zeros({5, 2}, DType::F32), DType::F32), e, false);
  ops.hold_matmul_input(e);  // a promise the CUDA backend has no use for: nothing happens
  ops.release_matmul_input();
  Tensor eh = ops.download(e);
  for (int64_t i = 0; i < eh.numel(); ++i) EXPECT_EQ(eh.get(i), 0.0);
  Tensor h = random({4, 7}, DType::F64, rng);
  expect_close(ops.download(ops.upload(h, DType::F64)), h, 0, "f64 round trip");
  expect_close(ops.download(ops.upload(h, DType::F32)), h.to(DType::F32), 0, "f64 -> f32 upload");
  Tensor id = ints({3, -1, 7, 100000});
  expect_equal_ints(ops.download(ops.upload(id, DType::I32)), id, "i32 round trip");
}

TEST(CudaOps, RejectsHostActivations) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  CudaOps ops;
  Tensor a = Tensor::zeros({4}, DType::F32);
  EXPECT_THROW(ops.add(a, a, a), std::invalid_argument);
}

TEST(CudaOps, Linear) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  struct Case { int64_t n, in, out; };
  for (DType dt : kDTypes)
    for (Case c : {Case{7, 33, 19}, Case{1, 5, 3}, Case{64, 256, 96}})
      for (bool accumulate : {false, true}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " n=" + std::to_string(c.n) + " in=" + std::to_string(c.in) +
                     (accumulate ? " accumulate" : ""));
        std::mt19937 rng(2);
        Pair p(dt);
        Tensor x = random({c.n, c.in}, dt, rng), w = random({c.out, c.in}, dt, rng);
        Tensor y = random({c.n, c.out}, dt, rng), yd = p.up(y);
        p.cpu.linear_forward(x, w, y, accumulate);
        p.gpu.linear_forward(p.up(x), p.up(w), yd, accumulate);
        expect_close(p.down(yd), y, tol(dt), "linear");
      }
}

TEST(CudaOps, Embedding) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(3);
    Pair p(dt);
    Tensor table = random({11, 24}, dt, rng), ids = ints({0, 10, 3, 3, 7, 1, 10, 5, 2});
    Tensor out = p.cpu.zeros({9, 24}), outd = p.gpu.zeros({9, 24}), outd2 = p.gpu.zeros({9, 24});
    p.cpu.embedding_forward(table, ids, std::sqrt(24.0), out);
    p.gpu.embedding_forward(p.up(table), ids, std::sqrt(24.0), outd);         // host ids
    p.gpu.embedding_forward(p.up(table), p.up(ids), std::sqrt(24.0), outd2);  // device ids
    expect_close(p.down(outd), out, tol(dt), "embedding (host ids)");
    expect_close(p.down(outd2), out, tol(dt), "embedding (device ids)");
    EXPECT_THROW(p.gpu.embedding_forward(p.up(table), ints({11}), 1.0, outd), std::out_of_range);
  }
}

TEST(CudaOps, RmsNorm) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(4);
    Pair p(dt);
    Tensor x = random({5, 300}, dt, rng, -3, 3), w = random({300}, dt, rng, 0, 2);
    Tensor y = p.cpu.zeros({5, 300}), yd = p.gpu.zeros({5, 300});
    p.cpu.rmsnorm_forward(x, w, 0, 1e-6, y);
    p.gpu.rmsnorm_forward(p.up(x), p.up(w), 0, 1e-6, yd);
    expect_close(p.down(yd), y, tol(dt), "rmsnorm with weight");
    // No weight, width 20 (rows of a [5, 300] tensor seen as [75, 20]), computed in place.
    Tensor xd = p.up(x);
    p.cpu.rmsnorm_forward(x, Tensor(), 20, 1e-6, y);
    p.gpu.rmsnorm_forward(xd, Tensor(), 20, 1e-6, xd);
    expect_close(p.down(xd), y, tol(dt), "rmsnorm without weight, in place");
  }
}

TEST(CudaOps, Rope) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(5);
    Pair p(dt);
    const int64_t heads = 3, half = 8;
    Tensor inv_freq = Tensor::zeros({half}, DType::F64);  // last two stay 0: partial rotary
    for (int64_t i = 0; i < half - 2; ++i) inv_freq.data<double>()[i] = std::pow(10000.0, -double(i) / half);
    const Tensor inv_freq_d = p.gpu.upload(inv_freq, DType::F64);  // on the device from load time
    Tensor pos = ints({0, 1, 5, 17, 300, 1000});
    Tensor x = random({6, heads * 2 * half}, dt, rng);
    Tensor xd = p.up(x), xd2 = p.up(x);
    p.cpu.rope_forward(x, heads, pos, inv_freq);
    p.gpu.rope_forward(xd, heads, pos, inv_freq_d);          // host positions
    p.gpu.rope_forward(xd2, heads, p.up(pos), inv_freq_d);   // device positions
    expect_close(p.down(xd), x, tol(dt), "rope (host positions)");
    expect_close(p.down(xd2), x, tol(dt), "rope (device positions)");
  }
}

TEST(CudaOps, Attention) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  struct Case { int64_t B, S, nh, nkv, d, window; bool docs; };
  const Case cases[] = {
      {2, 37, 4, 2, 512, 8, true},   // global-layer head_dim, window + documents, GQA
      {1, 45, 2, 1, 256, 0, false},  // sliding-layer head_dim, full causal
      {2, 70, 4, 4, 64, 0, true},    // several key tiles, no GQA
      {1, 40, 8, 2, 128, 16, false}, // window only
      {1, 3, 2, 2, 512, 1, false},   // window of 1: each query sees itself only
  };
  for (DType dt : kDTypes)
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " d=" + std::to_string(c.d) + " S=" + std::to_string(c.S) +
                   " window=" + std::to_string(c.window) + (c.docs ? " docs" : ""));
      std::mt19937 rng(6);
      Pair p(dt);
      Tensor q = random({c.B, c.S, c.nh, c.d}, dt, rng, -0.5, 0.5);
      Tensor k = random({c.B, c.S, c.nkv, c.d}, dt, rng, -0.5, 0.5);
      Tensor v = random({c.B, c.S, c.nkv, c.d}, dt, rng);
      // Documents of random lengths 1..12, ids counting up within each batch row.
      std::vector<int32_t> doc;
      for (int64_t b = 0; b < c.B; ++b) {
        int32_t id = 0, left = 0;
        for (int64_t s = 0; s < c.S; ++s) {
          if (left-- == 0) left = int32_t(rng() % 12), ++id;
          doc.push_back(id);
        }
      }
      Tensor docs = ints(doc, {c.B, c.S});
      Tensor docs_dev = p.up(docs);
      AttentionMask mask{c.window, c.docs ? &docs : nullptr};
      AttentionMask mask_dev{c.window, c.docs ? &docs_dev : nullptr};
      Tensor out = p.cpu.zeros(q.shape()), outd = p.gpu.zeros(q.shape()), outd2 = p.gpu.zeros(q.shape());
      p.cpu.attention_forward(q, k, v, mask, out);
      Tensor qd = p.up(q), kd = p.up(k), vd = p.up(v);
      p.gpu.attention_forward(qd, kd, vd, mask, outd);       // host doc_ids
      p.gpu.attention_forward(qd, kd, vd, mask_dev, outd2);  // device doc_ids
      expect_close(p.down(outd), out, tol(dt), "attention");
      expect_close(p.down(outd2), out, tol(dt), "attention (device doc_ids)");
    }
}

// KV-cached attention (keys in ring order, one empty slot) against attention_forward over the
// whole sequence on the CPU: same mask, same outputs.
TEST(CudaOps, AttentionCached) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes)
    for (int64_t window : {int64_t(0), int64_t(3)}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " window=" + std::to_string(window));
      std::mt19937 rng(12);
      Pair p(dt);
      const int64_t S = 10, nh = 4, nkv = 2, d = 8;
      Tensor q = random({1, S, nh, d}, dt, rng, -0.5, 0.5), k = random({1, S, nkv, d}, dt, rng, -0.5, 0.5),
             v = random({1, S, nkv, d}, dt, rng);
      Tensor out = p.cpu.zeros(q.shape());
      p.cpu.attention_forward(q, k, v, AttentionMask{window, nullptr}, out);
      const RotatedCache c = rotated_cache(k, v);
      Tensor outd = p.gpu.zeros({S, nh, d});
      p.gpu.attention_cached_forward(p.up(q.view({S, nh, d})), p.up(c.k), p.up(c.v), ints(c.q_pos), ints(c.k_pos),
                                     window, outd);
      expect_close(p.down(outd).view(q.shape()), out, tol(dt) * 10, "attention_cached_forward");
    }
}

TEST(CudaOps, Elementwise) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(7);
    Pair p(dt);
    const Shape s{3, 1000};
    Tensor a = random(s, dt, rng, -4, 4), b = random(s, dt, rng, -4, 4);
    Tensor out = p.cpu.zeros(s), ad = p.up(a), bd = p.up(b), outd = p.gpu.zeros(s);

    p.cpu.add(a, b, out);
    p.gpu.add(ad, bd, outd);
    expect_close(p.down(outd), out, tol(dt), "add");
    p.cpu.mul(a, b, out);
    p.gpu.mul(ad, bd, outd);
    expect_close(p.down(outd), out, tol(dt), "mul");
    p.cpu.gelu_tanh_mul_forward(a, b, out);
    p.gpu.gelu_tanh_mul_forward(ad, bd, outd);
    expect_close(p.down(outd), out, tol(dt), "gelu_tanh_mul");

    // In place / aliased forms: out = a + a, then scale, then softcap on big values.
    Tensor a2 = a.clone(), ad2 = p.up(a);
    p.cpu.add(a2, a2, a2);
    p.gpu.add(ad2, ad2, ad2);
    expect_close(p.down(ad2), a2, tol(dt), "add aliased");
    p.cpu.scale(a2, -0.37);
    p.gpu.scale(ad2, -0.37);
    expect_close(p.down(ad2), a2, tol(dt), "scale");
    {  // fill overwrites whatever is there, NaN included
      Tensor f = a2.clone(), fd = p.up(a2);
      p.gpu.scale(fd, NAN);
      p.cpu.fill(f, 0.25);
      p.gpu.fill(fd, 0.25);
      expect_close(p.down(fd), f, 0.0, "fill");
    }
    Tensor rs = random({3}, dt, rng);
    p.cpu.scale_rows(a2, rs);
    p.gpu.scale_rows(ad2, p.up(rs));
    expect_close(p.down(ad2), a2, tol(dt), "scale_rows");
    Tensor big = random(s, dt, rng, -100, 100), bigd = p.up(big);
    p.cpu.softcap_forward(big, 30.0);
    p.gpu.softcap_forward(bigd, 30.0);
    expect_close(p.down(bigd), big, tol(dt), "softcap");
  }
}

TEST(CudaOps, CopyColumns) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(8);
    Pair p(dt);
    Tensor src = random({5, 12}, dt, rng), dst = random({5, 9}, dt, rng), dstd = p.up(dst);
    p.cpu.copy_columns(src, 3, dst, 2, 6);
    p.gpu.copy_columns(p.up(src), 3, dstd, 2, 6);
    expect_close(p.down(dstd), dst, 0, "copy_columns");
  }
}

TEST(CudaOps, GatherAndScatterRows) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(9);
    Pair p(dt);
    Tensor src = random({10, 7}, dt, rng), rows = ints({3, 3, 0, 9, 5});
    Tensor out = p.cpu.zeros({5, 7}), outd = p.gpu.zeros({5, 7});
    p.cpu.gather_rows(src, rows, out);
    p.gpu.gather_rows(p.up(src), rows, outd);
    expect_close(p.down(outd), out, 0, "gather_rows");

    // Repeated rows: the GPU adds atomically, so order (last bits) may differ.
    Tensor add = random({5, 7}, dt, rng), sc = random({5}, dt, rng), dst = random({8, 7}, dt, rng);
    Tensor dstd = p.up(dst), rows2 = ints({1, 4, 1, 7, 0});
    p.cpu.scatter_add_rows(add, rows2, sc, dst);
    p.gpu.scatter_add_rows(p.up(add), p.up(rows2), p.up(sc), dstd);
    expect_close(p.down(dstd), dst, tol(dt), "scatter_add_rows");
  }
  // Rows whose byte size is not a multiple of 4 take the byte-copy path: BF16 [10, 3].
  std::mt19937 rng(10);
  Pair p(DType::F32);
  Tensor src = random({10, 3}, DType::BF16, rng), rows = ints({9, 0, 4});
  Tensor out = p.cpu.zeros({3, 3}, DType::BF16), outd = p.gpu.zeros({3, 3}, DType::BF16);
  p.cpu.gather_rows(src, rows, out);
  p.gpu.gather_rows(p.up(src), p.up(rows), outd);
  expect_close(p.down(outd), out, 0, "gather_rows bf16");
}

TEST(CudaOps, MoeRoute) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(11);
    Pair p(dt);
    const int64_t n = 33, e = 16, k = 4;
    Tensor logits = random({n, e}, dt, rng, -3, 3).to(DType::F64);
    // Ties resolve to the lower index: row 0 all equal, row 1 with tied pairs.
    for (int64_t j = 0; j < e; ++j) {
      logits.data<double>()[j] = 0.5;
      logits.data<double>()[e + j] = double(j / 2);
    }
    logits = logits.to(dt);
    Tensor scale = random({e}, dt, rng, 0.5, 1.5);
    Tensor w = p.cpu.zeros({n, k}), idx = p.cpu.zeros({n, k}, DType::I32);
    Tensor wd = p.gpu.zeros({n, k}), idxd = p.gpu.zeros({n, k}, DType::I32);
    p.cpu.moe_route_forward(logits, scale, k, w, idx);
    p.gpu.moe_route_forward(p.up(logits), p.up(scale), k, wd, idxd);
    expect_equal_ints(p.down(idxd), idx, "moe_route idx");
    expect_close(p.down(wd), w, tol(dt), "moe_route weights");
  }
}

TEST(CudaOps, CrossEntropy) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes)
    for (int64_t v : {50, 1000}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " V=" + std::to_string(v));
      std::mt19937 rng(12);
      Pair p(dt);
      const int64_t n = 12;
      Tensor logits = random({n, v}, dt, rng, -10, 10), ld = p.up(logits);
      std::vector<int32_t> lab;
      for (int64_t i = 0; i < n; ++i) lab.push_back(i % 4 == 1 ? -100 : int32_t(rng() % uint32_t(v)));
      Tensor labels = ints(lab);
      int64_t count_cpu = -1, count_gpu = -2, count_gpu2 = -3;
      double want = p.cpu.cross_entropy_sum(logits, labels, count_cpu);
      double got = p.gpu.cross_entropy_sum(ld, labels, count_gpu);
      double got2 = p.gpu.cross_entropy_sum(ld, p.up(labels), count_gpu2);
      EXPECT_EQ(count_gpu, count_cpu);
      EXPECT_EQ(count_gpu2, count_cpu);
      EXPECT_EQ(count_cpu, 9);
      EXPECT_NEAR(got, want, 1e-12 * (1 + std::abs(want)));
      EXPECT_NEAR(got2, want, 1e-12 * (1 + std::abs(want)));

      int64_t none = -1;
      EXPECT_EQ(p.gpu.cross_entropy_sum(ld, ints(std::vector<int32_t>(n, -100)), none), 0.0);
      EXPECT_EQ(none, 0);
      std::vector<int32_t> bad(static_cast<size_t>(n), 0);
      bad[3] = int32_t(v);
      EXPECT_THROW(p.gpu.cross_entropy_sum(ld, ints(bad), none), std::out_of_range);
    }
}

// ---- backward ------------------------------------------------------------------------
// Every backward adds into its gradient tensors, so they start random, not zero.

TEST(CudaOps, LinearBackward) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes)
    for (bool want_dw : {true, false}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (want_dw ? " dx+dW" : " dx only"));
      std::mt19937 rng(20);
      Pair p(dt);
      const int64_t n = 37, in = 65, out = 19;
      Tensor x = random({n, in}, dt, rng), w = random({out, in}, dt, rng), dy = random({n, out}, dt, rng);
      Tensor dx = random({n, in}, dt, rng), dw = random({out, in}, dt, rng);
      Tensor dxd = p.up(dx), dwd = p.up(dw), none;
      p.cpu.linear_backward(x, w, dy, dx, want_dw ? dw : none);
      p.gpu.linear_backward(p.up(x), p.up(w), p.up(dy), dxd, want_dw ? dwd : none);
      expect_close(p.down(dxd), dx, tol(dt), "linear_backward dx");
      expect_close(p.down(dwd), dw, tol(dt), "linear_backward dW");
    }
}

TEST(CudaOps, EmbeddingBackward) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes)
    for (int64_t skip : {int64_t(-1), int64_t(3)}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " skip_id=" + std::to_string(skip));
      std::mt19937 rng(21);
      Pair p(dt);
      Tensor ids = ints({0, 10, 3, 3, 7, 1, 10, 5, 3});
      Tensor dout = random({9, 24}, dt, rng), table = random({11, 24}, dt, rng), tabled = p.up(table);
      p.cpu.embedding_backward(ids, dout, 2.5, skip, table);
      p.gpu.embedding_backward(p.up(ids), p.up(dout), 2.5, skip, tabled);
      expect_close(p.down(tabled), table, tol(dt), "embedding_backward");
    }
}

TEST(CudaOps, RmsNormBackward) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(22);
    Pair p(dt);
    // 300 rows: the dW reduction runs in several row chunks.
    Tensor x = random({300, 48}, dt, rng, -3, 3), w = random({48}, dt, rng, 0, 2), dy = random({300, 48}, dt, rng);
    Tensor dx = random({300, 48}, dt, rng), dw = random({48}, dt, rng), dxd = p.up(dx), dwd = p.up(dw);
    p.cpu.rmsnorm_backward(x, w, 0, 1e-6, dy, dx, dw);
    p.gpu.rmsnorm_backward(p.up(x), p.up(w), 0, 1e-6, p.up(dy), dxd, dwd);
    expect_close(p.down(dxd), dx, tol(dt), "rmsnorm_backward dx");
    expect_close(p.down(dwd), dw, grad_tol(dt), "rmsnorm_backward dw");
    // No weight, width 16, dx only.
    Tensor none, dx2 = random({300, 48}, dt, rng), dx2d = p.up(dx2);
    p.cpu.rmsnorm_backward(x, none, 16, 1e-6, dy, dx2, none);
    p.gpu.rmsnorm_backward(p.up(x), none, 16, 1e-6, p.up(dy), dx2d, none);
    expect_close(p.down(dx2d), dx2, tol(dt), "rmsnorm_backward without weight");
  }
}

TEST(CudaOps, RopeBackward) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(23);
    Pair p(dt);
    const int64_t heads = 2, half = 16;
    Tensor inv_freq = Tensor::zeros({half}, DType::F64);
    for (int64_t i = 0; i < half - 4; ++i) inv_freq.data<double>()[i] = std::pow(1e6, -double(i) / half);
    const Tensor inv_freq_d = p.gpu.upload(inv_freq, DType::F64);  // on the device from load time
    Tensor pos = ints({0, 3, 9, 4000, 77});
    Tensor g = random({5, heads * 2 * half}, dt, rng), gd = p.up(g);
    p.cpu.rope_backward(g, heads, pos, inv_freq);
    p.gpu.rope_backward(gd, heads, pos, inv_freq_d);
    expect_close(p.down(gd), g, tol(dt), "rope_backward");
    // The backward is the inverse rotation: forward then backward gives the input back.
    Tensor x = random({5, heads * 2 * half}, dt, rng), xd = p.up(x);
    p.gpu.rope_forward(xd, heads, pos, inv_freq_d);
    p.gpu.rope_backward(xd, heads, pos, inv_freq_d);
    expect_close(p.down(xd), x, tol(dt), "rope_backward(rope_forward(x))");
  }
}

TEST(CudaOps, AttentionBackward) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  struct Case { int64_t B, S, nh, nkv, d, window; bool docs, want_dq; };
  const Case cases[] = {
      {2, 37, 4, 2, 512, 8, true, true},    // global-layer head_dim, window + documents, GQA
      {1, 45, 2, 1, 256, 0, false, true},   // sliding-layer head_dim, full causal
      {2, 70, 4, 4, 64, 0, true, true},     // several tiles, no GQA
      {1, 40, 8, 2, 128, 16, false, false}, // window only; dk, dv without dq
  };
  for (DType dt : kDTypes)
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " d=" + std::to_string(c.d) + " S=" + std::to_string(c.S) +
                   " window=" + std::to_string(c.window) + (c.docs ? " docs" : "") + (c.want_dq ? "" : " no dq"));
      std::mt19937 rng(24);
      Pair p(dt);
      Tensor q = random({c.B, c.S, c.nh, c.d}, dt, rng, -0.5, 0.5);
      Tensor k = random({c.B, c.S, c.nkv, c.d}, dt, rng, -0.5, 0.5);
      Tensor v = random({c.B, c.S, c.nkv, c.d}, dt, rng);
      Tensor dout = random(q.shape(), dt, rng);
      std::vector<int32_t> doc;
      for (int64_t i = 0; i < c.B * c.S; ++i) doc.push_back(int32_t(i / 9));  // documents of 9 tokens
      Tensor docs = ints(doc, {c.B, c.S});
      AttentionMask mask{c.window, c.docs ? &docs : nullptr};
      Tensor dq = random(q.shape(), dt, rng), dk = random(k.shape(), dt, rng), dv = random(v.shape(), dt, rng);
      Tensor dqd = p.up(dq), dkd = p.up(dk), dvd = p.up(dv), none;
      p.cpu.attention_backward(q, k, v, mask, dout, c.want_dq ? dq : none, dk, dv);
      p.gpu.attention_backward(p.up(q), p.up(k), p.up(v), mask, p.up(dout), c.want_dq ? dqd : none, dkd, dvd);
      expect_close(p.down(dqd), dq, grad_tol(dt), "attention_backward dq");
      expect_close(p.down(dkd), dk, grad_tol(dt), "attention_backward dk");
      expect_close(p.down(dvd), dv, grad_tol(dt), "attention_backward dv");
    }
}

TEST(CudaOps, ElementwiseBackward) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(25);
    Pair p(dt);
    const Shape s{3, 700};
    Tensor gate = random(s, dt, rng, -4, 4), up = random(s, dt, rng, -2, 2), dout = random(s, dt, rng);
    Tensor dgate = random(s, dt, rng), dup = random(s, dt, rng), dgated = p.up(dgate), dupd = p.up(dup), none;
    p.cpu.gelu_tanh_mul_backward(gate, up, dout, dgate, dup);
    p.gpu.gelu_tanh_mul_backward(p.up(gate), p.up(up), p.up(dout), dgated, dupd);
    expect_close(p.down(dgated), dgate, tol(dt), "gelu_tanh_mul_backward dgate");
    expect_close(p.down(dupd), dup, tol(dt), "gelu_tanh_mul_backward dup");
    p.cpu.gelu_tanh_mul_backward(gate, up, dout, none, dup);
    p.gpu.gelu_tanh_mul_backward(p.up(gate), p.up(up), p.up(dout), none, dupd);
    expect_close(p.down(dupd), dup, tol(dt), "gelu_tanh_mul_backward dup only");

    Tensor y = random(s, dt, rng, -100, 100);
    p.cpu.softcap_forward(y, 30.0);
    Tensor dy = random(s, dt, rng), dyd = p.up(dy);
    p.cpu.softcap_backward(y, 30.0, dy);
    p.gpu.softcap_backward(p.up(y), 30.0, dyd);
    expect_close(p.down(dyd), dy, tol(dt), "softcap_backward");
  }
}

TEST(CudaOps, MoeRouteBackward) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(26);
    Pair p(dt);
    const int64_t n = 33, e = 16, k = 4;
    Tensor logits = random({n, e}, dt, rng, -3, 3), scale = random({e}, dt, rng, 0.5, 1.5);
    Tensor w = p.cpu.zeros({n, k}), idx = p.cpu.zeros({n, k}, DType::I32);
    p.cpu.moe_route_forward(logits, scale, k, w, idx);
    Tensor dw = random({n, k}, dt, rng), dlogits = random({n, e}, dt, rng), dscale = random({e}, dt, rng);
    Tensor dlogitsd = p.up(dlogits), dscaled = p.up(dscale);
    p.cpu.moe_route_backward(logits, scale, idx, dw, dlogits, dscale);
    p.gpu.moe_route_backward(p.up(logits), p.up(scale), p.up(idx), p.up(dw), dlogitsd, dscaled);
    expect_close(p.down(dlogitsd), dlogits, tol(dt), "moe_route_backward dlogits");
    expect_close(p.down(dscaled), dscale, grad_tol(dt), "moe_route_backward dscale");
  }
}

TEST(CudaOps, ScatterRowsAndRowwiseDot) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(27);
    Pair p(dt);
    Tensor src = random({5, 300}, dt, rng), dst = random({8, 300}, dt, rng), dstd = p.up(dst);
    Tensor rows = ints({1, 4, 1, 7, 0});
    p.cpu.scatter_rows(src, rows, dst);
    p.gpu.scatter_rows(p.up(src), rows, dstd);
    expect_close(p.down(dstd), dst, tol(dt), "scatter_rows");
    Tensor out = p.cpu.zeros({5}), outd = p.gpu.zeros({5});
    p.cpu.rowwise_dot(src, rows, dst, out);
    p.gpu.rowwise_dot(p.up(src), p.up(rows), p.up(dst), outd);
    expect_close(p.down(outd), out, tol(dt), "rowwise_dot");
  }
}

TEST(CudaOps, CrossEntropyBackward) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes)
    for (double cap : {0.0, 30.0}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " cap=" + std::to_string(cap));
      std::mt19937 rng(28);
      Pair p(dt);
      const int64_t n = 12, v = 700;
      Tensor logits = random({n, v}, dt, rng, -10, 10);
      std::vector<int32_t> lab;
      for (int64_t i = 0; i < n; ++i) lab.push_back(i % 4 == 1 ? -100 : int32_t(rng() % uint32_t(v)));
      Tensor labels = ints(lab);
      // dlogits is set, not added: start it from garbage to prove it.
      Tensor g = random({n, v}, dt, rng), gd = p.up(g);
      Tensor sums_c = p.cpu.zeros({2}, DType::F64), sums_g = p.gpu.zeros({2}, DType::F64);
      p.cpu.cross_entropy_backward(logits, labels, 1.0 / 9, cap, g, sums_c);
      p.gpu.cross_entropy_backward(p.up(logits), labels, 1.0 / 9, cap, gd, sums_g);
      const Tensor sg = p.gpu.download(sums_g);
      const double want = sums_c.data<double>()[0];
      EXPECT_NEAR(sg.data<double>()[0], want, 1e-12 * (1 + std::abs(want)));
      EXPECT_EQ(sg.data<double>()[1], sums_c.data<double>()[1]) << "argmax hits";
      expect_close(p.down(gd), g, tol(dt), "cross_entropy_backward dlogits");
    }
}

// Distillation's KL sums and fused gradient against the CPU reference: full vocabulary and
// top-k (with ties at the k-th value, which go to the lower indices), with and without the
// soft-cap, host and device labels; the gradient is added to what dstudent held.
TEST(CudaOps, DistillKl) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes)
    for (int64_t top_k : {int64_t(0), int64_t(5), int64_t(64)})
      for (double cap : {0.0, 30.0}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " top_k=" + std::to_string(top_k) + " cap=" + std::to_string(cap));
        std::mt19937 rng(29);
        Pair p(dt);
        const int64_t n = 10, v = 700;
        Tensor s = random({n, v}, dt, rng, -8, 8), t = random({n, v}, dt, rng, -8, 8);
        // Row 2: the teacher's 4th to 7th largest are equal, so top-5 cuts a tie.
        Tensor t64 = t.to(DType::F64);
        for (int64_t j = 0; j < 3; ++j) t64.data<double>()[2 * v + 10 * j] = 20.0 - double(j);
        for (int64_t j = 3; j < 7; ++j) t64.data<double>()[2 * v + 10 * j] = 15.0;
        t = t64.to(dt);
        std::vector<int32_t> lab;
        for (int64_t i = 0; i < n; ++i) lab.push_back(i % 4 == 1 ? -100 : int32_t(rng() % uint32_t(v)));
        Tensor labels = ints(lab);
        const double T = 1.7;
        const Ops::DistillSums want = p.cpu.distill_kl_sum(s, t, labels, T, top_k);
        const Ops::DistillSums got = p.gpu.distill_kl_sum(p.up(s), p.up(t), p.up(labels), T, top_k);
        EXPECT_EQ(got.count, want.count);
        EXPECT_EQ(want.count, 7);
        EXPECT_EQ(got.agree, want.agree);
        EXPECT_NEAR(got.kl, want.kl, tol(dt) * (1 + std::abs(want.kl)));
        Tensor g = random({n, v}, dt, rng), gd = p.up(g);
        // The KL sum is added to what sums[0] held, and stays on the device.
        Tensor sums_c = Tensor::zeros({1}, DType::F64), sums_g = p.gpu.zeros({1}, DType::F64);
        sums_c.data<double>()[0] = 0.5;
        p.gpu.fill(sums_g, 0.5);
        p.cpu.distill_kl_backward(s, t, labels, T, top_k, 0.3, cap, g, sums_c);
        p.gpu.distill_kl_backward(p.up(s), p.up(t), p.up(labels), T, top_k, 0.3, cap, gd, sums_g);
        const double kl_cpu = sums_c.data<double>()[0], kl_gpu = p.gpu.download(sums_g).data<double>()[0];
        EXPECT_NEAR(kl_cpu - 0.5, want.kl, 1e-12 * (1 + std::abs(want.kl)));
        EXPECT_NEAR(kl_gpu, kl_cpu, tol(dt) * (1 + std::abs(kl_cpu)));
        expect_close(p.down(gd), g, tol(dt), "distill_kl_backward dstudent");
      }
}

TEST(CudaOps, Norm2AndAdamW) {
  if (!tl::CudaOps::available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(9);
    Pair p(dt);
    Tensor x = random({5000}, dt, rng);
    EXPECT_NEAR(p.gpu.norm2(p.up(x)), p.cpu.norm2(x), tol(dt) * p.cpu.norm2(x));
    {  // Σ x² added into an accumulator slot on the device
      Tensor acc_c = p.cpu.zeros({3}, DType::F64), acc_g = p.gpu.zeros({3}, DType::F64);
      p.cpu.add_sum_squares(x, acc_c, 2);
      p.gpu.add_sum_squares(p.up(x), acc_g, 2);
      p.gpu.add_sum_squares(p.up(x), acc_g, 2);
      const Tensor ag = p.gpu.download(acc_g);
      EXPECT_EQ(ag.data<double>()[0], 0.0);
      EXPECT_NEAR(ag.data<double>()[2], 2 * acc_c.data<double>()[2], tol(dt) * acc_c.data<double>()[2]);
    }
    Tensor w = random({33, 7}, dt, rng), g = random({33, 7}, dt, rng), m = random({33, 7}, dt, rng),
           v = random({33, 7}, dt, rng, 0, 1);
    Tensor wd = p.up(w), md = p.up(m), vd = p.up(v);
    const double bc1 = 1 - std::pow(0.9, 3), bc2 = 1 - std::pow(0.999, 3);
    p.cpu.adamw_update(w, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, bc1, bc2, 0.625);  // a clipped step
    p.gpu.adamw_update(wd, p.up(g), md, vd, 1e-3, 0.9, 0.999, 1e-8, 0.01, bc1, bc2, 0.625);
    expect_close(p.down(wd), w, tol(dt), "adamw p");
    expect_close(p.down(md), m, tol(dt), "adamw m");
    expect_close(p.down(vd), v, tol(dt), "adamw v");
  }
}

}  // namespace
}  // namespace tl
