// The GPU training path against the CPU reference: bf16 cuBLASLt projections, NF4 bases on
// the device (and the on-device quantizer, byte for byte), token accuracy, dropout masks, the
// pool allocator, and the ops on the real Gemma 4 shapes (head_dim 512 at sequence 4096,
// cross-entropy over vocab 262144, 128 experts top-8).
//
// Tolerances, |gpu − cpu| ≤ tol·(1 + |cpu|):
//   F64 1e-12 (1e-11 for sums of many terms); F32 1e-5 (5e-5 accumulated gradients);
//   bf16 products: both backends round the same inputs to bf16 and sum exactly-representable
//   bf16×bf16 products in fp32, only in different orders: 1e-4 for K ≤ 512;
//   sequence 4096 attention (sums of 4096 terms in fp32): 2e-4.
#include "core/nf4.h"
#include "tests/gpu/gpu_test_util.h"

namespace tl {
namespace {

using namespace gpu_test;

constexpr double kBf16Tol = 1e-4;

TEST(CudaTraining, LinearBf16MatchesCpuBf16) {
  TL_REQUIRE_GPU();
  struct Case { int64_t n, in, out; };
  // n·in·out ≥ 2^22 so both backends take the bf16 path; the last case stays fp32 (LoRA-like).
  for (Case c : {Case{64, 256, 256}, Case{33, 512, 300}, Case{7, 96, 5}}) {
    SCOPED_TRACE("n=" + std::to_string(c.n) + " in=" + std::to_string(c.in) + " out=" + std::to_string(c.out));
    std::mt19937 rng(11);
    Pair p(DType::F32, CpuMatmul::Bf16, CudaMatmul::Bf16);
    Tensor x = random({c.n, c.in}, DType::F32, rng), w = random({c.out, c.in}, DType::F32, rng);
    Tensor dy = random({c.n, c.out}, DType::F32, rng);
    Tensor y = random({c.n, c.out}, DType::F32, rng), yd = p.up(y);
    p.cpu.linear_forward(x, w, y, true);
    p.gpu.linear_forward(p.up(x), p.up(w), yd, true);
    expect_close(p.down(yd), y, kBf16Tol, "linear bf16");
    Tensor dx = random({c.n, c.in}, DType::F32, rng), dw = random({c.out, c.in}, DType::F32, rng);
    Tensor dxd = p.up(dx), dwd = p.up(dw);
    p.cpu.linear_backward(x, w, dy, dx, dw);
    p.gpu.linear_backward(p.up(x), p.up(w), p.up(dy), dxd, dwd);
    expect_close(p.down(dxd), dx, kBf16Tol, "linear_backward bf16 dx");
    expect_close(p.down(dwd), dw, kBf16Tol, "linear_backward bf16 dW");
  }
}

// A bf16 weight quantized on the host (bitsandbytes-exact, tested in tests/test_nf4.cpp).
Nf4Tensor host_nf4(int64_t out, int64_t in, bool dq, std::mt19937& rng, DType stored = DType::BF16) {
  return nf4_quantize(random({out, in}, DType::F32, rng).to(stored), dq);
}

TEST(CudaTraining, Nf4LinearOnDeviceMatchesCpu) {
  TL_REQUIRE_GPU();
  struct Mode { DType dt; CpuMatmul cm; CudaMatmul gm; double tol; };
  for (Mode m : {Mode{DType::F64, CpuMatmul::F32, CudaMatmul::F32, 1e-12},
                 Mode{DType::F32, CpuMatmul::F32, CudaMatmul::F32, 1e-5},
                 Mode{DType::F32, CpuMatmul::Bf16, CudaMatmul::Bf16, kBf16Tol}})
    for (bool dq : {false, true})
      for (DType stored : {DType::BF16, DType::F16, DType::F32}) {
        SCOPED_TRACE(std::string(dtype_name(m.dt)) + (m.gm == CudaMatmul::Bf16 ? " bf16" : "") +
                     (dq ? " double-quant " : " ") + std::string(dtype_name(stored)));
        std::mt19937 rng(12);
        Pair p(m.dt, m.cm, m.gm);
        // 300·256 elements: 1200 blocks, nested blocks of 256 with a partial last one.
        const Nf4Tensor w = host_nf4(300, 256, dq, rng, stored);
        const int64_t n = 64;
        Tensor x = random({n, 256}, m.dt, rng), dy = random({n, 300}, m.dt, rng);
        Tensor y = p.cpu.zeros({n, 300}), yd = p.gpu.zeros({n, 300});
        p.cpu.linear_nf4_forward(x, w, y);
        p.gpu.linear_nf4_forward(p.up(x), w, yd);
        ASSERT_TRUE(w.backend_copy) << "the weight's device copy was not made";
        expect_close(p.down(yd), y, m.tol, "linear_nf4_forward");
        Tensor dx = random({n, 256}, m.dt, rng), dxd = p.up(dx);
        p.cpu.linear_nf4_backward(dy, w, dx);
        p.gpu.linear_nf4_backward(p.up(dy), w, dxd);
        expect_close(p.down(dxd), dx, m.tol, "linear_nf4_backward");
      }
}

TEST(CudaTraining, QuantizeOnDeviceIsBitsandbytesExact) {
  TL_REQUIRE_GPU();
  for (DType stored : {DType::BF16, DType::F16, DType::F32})
    for (bool dq : {false, true})
      for (Shape shape : {Shape{300, 256}, Shape{7, 37}, Shape{1, 1}}) {
        SCOPED_TRACE(std::string(dtype_name(stored)) + (dq ? " dq " : " ") + shape_str(shape));
        std::mt19937 rng(13);
        Tensor host = random(shape, DType::F32, rng, -3, 3);
        if (host.numel() > 128)  // an all-zero block: its codes are 0 (0·inf = NaN), absmax 0
          for (int64_t i = 64; i < 128; ++i) host.data<float>()[i] = 0;
        host = host.to(stored);
        CudaOps gpu;
        const Nf4Tensor want = nf4_quantize(host, dq);
        const Nf4Tensor got = CudaOps::quantize_nf4(gpu.upload(host, stored), dq);
        EXPECT_EQ(got.shape, want.shape);
        EXPECT_EQ(got.orig_dtype, want.orig_dtype);
        EXPECT_EQ(got.packed, want.packed);
        EXPECT_EQ(got.double_quant, want.double_quant);
        EXPECT_EQ(got.absmax, want.absmax);
        EXPECT_EQ(got.absmax_q, want.absmax_q);
        EXPECT_EQ(got.nested_absmax, want.nested_absmax);
        EXPECT_EQ(got.offset, want.offset);
        EXPECT_EQ(got.nested_map, want.nested_map);
        EXPECT_TRUE(got.backend_copy);
      }
}

TEST(CudaTraining, TokenAccuracyOnDevice) {
  TL_REQUIRE_GPU();
  for (int64_t v : {int64_t(17), int64_t(262144)}) {
    SCOPED_TRACE("vocab " + std::to_string(v));
    std::mt19937 rng(14);
    Pair p(DType::F32);
    const int64_t n = 9;
    Tensor logits = random({n, v}, DType::F32, rng, -5, 5);
    // Row 1 has a tie between columns 3 and 5: the lower index wins.
    logits.data<float>()[1 * v + 3] = 9;
    logits.data<float>()[1 * v + 5] = 9;
    std::vector<int32_t> lab(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t) {
      int64_t best = 0;
      for (int64_t j = 1; j < v; ++j)
        if (logits.data<float>()[t * v + j] > logits.data<float>()[t * v + best]) best = j;
      lab[size_t(t)] = int32_t(t % 3 == 0 ? best : (best + 1) % v);  // hits on rows 0, 3, 6
    }
    lab[1] = 3;     // the tie: a hit
    lab[6] = -100;  // ignored even though it would be a hit
    Tensor labels = ints(lab);
    // The hits are counted by the cross-entropy backward, into sums[1], on the device.
    Tensor sums = p.gpu.zeros({2}, DType::F64), dlogits = p.gpu.zeros({n, v});
    p.gpu.cross_entropy_backward(p.up(logits), p.up(labels), 1.0, 0.0, dlogits, sums);
    EXPECT_EQ(p.gpu.download(sums).data<double>()[1], 3.0);  // rows 0, 1, 3
  }
}

TEST(CudaTraining, DropoutMaskOnDeviceEqualsHost) {
  TL_REQUIRE_GPU();
  for (DType dt : kDTypes)
    for (double prob : {0.0, 0.1, 0.5}) {
      Pair p(dt);
      Tensor want = p.cpu.zeros({37, 129}), got = p.gpu.zeros({37, 129});
      p.cpu.dropout_mask(0x1234abcdull, prob, want);
      p.gpu.dropout_mask(0x1234abcdull, prob, got);
      expect_close(p.down(got), want, 0, "dropout_mask");
      int64_t kept = 0;
      for (int64_t i = 0; i < want.numel(); ++i) kept += want.get(i) != 0;
      EXPECT_NEAR(double(kept) / double(want.numel()), 1 - prob, 0.05);
    }
}

TEST(CudaTraining, PoolReusesMemoryAfterTheFirstStep) {
  TL_REQUIRE_GPU();
  CudaOps ops(DType::F32, CudaMatmul::Bf16);
  std::mt19937 rng(15);
  Tensor w = ops.upload(random({512, 512}, DType::F32, rng), DType::F32);
  auto step = [&] {
    Tensor x = ops.upload(random({256, 512}, DType::F32, rng), DType::F32);
    Tensor y = ops.zeros({256, 512}), dx = ops.zeros({256, 512}), dw = ops.zeros({512, 512});
    ops.linear_forward(x, w, y, false);
    ops.linear_backward(x, w, y, dx, dw);
    (void)ops.download(dw);
  };
  step();
  const CudaMemory first = CudaOps::memory();
  for (int i = 0; i < 3; ++i) step();
  const CudaMemory later = CudaOps::memory();
  EXPECT_EQ(later.reserved_peak, first.reserved_peak) << "a later step reserved more from the driver";
  EXPECT_EQ(later.reserved, first.reserved);
  EXPECT_GT(first.used_peak, uint64_t(256 * 512 * 4));
}

// ---- the real shapes ----------------------------------------------------------------------

TEST(CudaTraining, AttentionHeadDim512Sequence4096) {
  TL_REQUIRE_GPU();
  struct Case { int64_t S, nh, nkv, d, window; bool docs, kv_equal; };
  // The 31B's global layers (head_dim 512, K = V, GQA) and its sliding layers (256, 1024).
  for (Case c : {Case{4096, 2, 1, 512, 0, true, true}, Case{4096, 2, 1, 256, 1024, false, false}}) {
    SCOPED_TRACE("S=" + std::to_string(c.S) + " d=" + std::to_string(c.d) + " window=" + std::to_string(c.window));
    std::mt19937 rng(16);
    Pair p(DType::F32);
    Tensor q = random({1, c.S, c.nh, c.d}, DType::F32, rng, -0.2, 0.2);
    Tensor k = random({1, c.S, c.nkv, c.d}, DType::F32, rng, -0.2, 0.2);
    Tensor v = c.kv_equal ? k : random({1, c.S, c.nkv, c.d}, DType::F32, rng);
    Tensor dout = random({1, c.S, c.nh, c.d}, DType::F32, rng);
    std::vector<int32_t> doc(size_t(c.S));
    for (int64_t s = 0; s < c.S; ++s) doc[size_t(s)] = int32_t(s < 1000 ? 0 : s < 3000 ? 1 : 2);
    Tensor docs = ints(doc, {1, c.S});
    AttentionMask mask{c.window, c.docs ? &docs : nullptr};
    Tensor qd = p.up(q), kd = p.up(k), vd = c.kv_equal ? kd : p.up(v);
    Tensor out = p.cpu.zeros(q.shape()), outd = p.gpu.zeros(q.shape());
    p.cpu.attention_forward(q, k, v, mask, out);
    p.gpu.attention_forward(qd, kd, vd, mask, outd);
    expect_close(p.down(outd), out, 2e-4, "attention");
    Tensor dq = p.cpu.zeros(q.shape()), dk = p.cpu.zeros(k.shape()), dv = p.cpu.zeros(k.shape());
    Tensor dqd = p.gpu.zeros(q.shape()), dkd = p.gpu.zeros(k.shape()), dvd = p.gpu.zeros(k.shape());
    p.cpu.attention_backward(q, k, v, mask, dout, dq, dk, dv);
    p.gpu.attention_backward(qd, kd, vd, mask, p.up(dout), dqd, dkd, dvd);
    expect_close(p.down(dqd), dq, 2e-4, "attention_backward dq");
    expect_close(p.down(dkd), dk, 2e-4, "attention_backward dk");
    expect_close(p.down(dvd), dv, 2e-4, "attention_backward dv");
  }
}

TEST(CudaTraining, CrossEntropyVocab262144) {
  TL_REQUIRE_GPU();
  std::mt19937 rng(17);
  Pair p(DType::F32);
  const int64_t n = 6, v = 262144;
  const double cap = 30.0;
  Tensor logits = random({n, v}, DType::F32, rng, -40, 40);
  Tensor ld = p.up(logits);
  p.cpu.softcap_forward(logits, cap);
  p.gpu.softcap_forward(ld, cap);
  Tensor labels = ints({5, 262143, -100, 0, 131072, 7});
  int64_t cc = 0, gc = 0;
  const double want = p.cpu.cross_entropy_sum(logits, labels, cc);
  EXPECT_NEAR(p.gpu.cross_entropy_sum(ld, labels, gc), want, 1e-5 * std::abs(want));
  EXPECT_EQ(gc, cc);
  Tensor dl = p.cpu.zeros({n, v}), dld = p.gpu.zeros({n, v});
  Tensor sums_c = p.cpu.zeros({2}, DType::F64), sums_g = p.gpu.zeros({2}, DType::F64);
  p.cpu.cross_entropy_backward(logits, labels, 0.2, cap, dl, sums_c);
  p.gpu.cross_entropy_backward(ld, p.gpu.upload(labels, DType::I32), 0.2, cap, dld, sums_g);  // device labels
  const Tensor sg = p.gpu.download(sums_g);
  const double lw = sums_c.data<double>()[0];
  EXPECT_NEAR(sg.data<double>()[0], lw, 1e-5 * std::abs(lw));
  EXPECT_EQ(sg.data<double>()[1], sums_c.data<double>()[1]);
  expect_close(p.down(dld), dl, 1e-5, "cross_entropy_backward");
}

TEST(CudaTraining, MoeRoute128ExpertsTop8) {
  TL_REQUIRE_GPU();
  for (DType dt : kDTypes) {
    SCOPED_TRACE(dtype_name(dt));
    std::mt19937 rng(18);
    Pair p(dt);
    const int64_t n = 64, e = 128, k = 8;
    Tensor logits = random({n, e}, dt, rng, -4, 4), scale = random({e}, dt, rng, 0.5, 1.5);
    Tensor w = p.cpu.zeros({n, k}), idx = Tensor::zeros({n, k}, DType::I32);
    Tensor wd = p.gpu.zeros({n, k}), idxd = p.gpu.zeros({n, k}, DType::I32);
    p.cpu.moe_route_forward(logits, scale, k, w, idx);
    p.gpu.moe_route_forward(p.up(logits), p.up(scale), k, wd, idxd);
    expect_equal_ints(p.down(idxd), idx, "moe_route idx");
    expect_close(p.down(wd), w, tol(dt), "moe_route weights");
    Tensor dw = random({n, k}, dt, rng);
    Tensor dl = p.cpu.zeros({n, e}), ds = p.cpu.zeros({e}), dld = p.gpu.zeros({n, e}), dsd = p.gpu.zeros({e});
    p.cpu.moe_route_backward(logits, scale, idx, dw, dl, ds);
    p.gpu.moe_route_backward(p.up(logits), p.up(scale), p.up(idx), p.up(dw), dld, dsd);
    expect_close(p.down(dld), dl, tol(dt), "moe_route_backward dlogits");
    expect_close(p.down(dsd), ds, grad_tol(dt), "moe_route_backward dscale");
    // The experts' GEMMs: the rows routed to one expert, gathered, through its NF4 weight.
    const Nf4Tensor expert = nf4_quantize(random({64, 96}, DType::F32, rng).to(DType::BF16), true);
    std::vector<int32_t> rows;
    for (int64_t t = 0; t < n * k; ++t)
      if (idx.data<int32_t>()[t] == idx.data<int32_t>()[0]) rows.push_back(int32_t(t / k));
    Tensor x = random({n, 96}, dt, rng), r = ints(rows);
    const int64_t m = int64_t(rows.size());
    Tensor xs = p.cpu.zeros({m, 96}), xsd = p.gpu.zeros({m, 96});
    p.cpu.gather_rows(x, r, xs);
    p.gpu.gather_rows(p.up(x), r, xsd);
    Tensor y = p.cpu.zeros({m, 64}), yd = p.gpu.zeros({m, 64});
    p.cpu.linear_nf4_forward(xs, expert, y);
    p.gpu.linear_nf4_forward(xsd, expert, yd);
    expect_close(p.down(yd), y, tol(dt), "expert NF4 GEMM");
  }
}

}  // namespace
}  // namespace tl
