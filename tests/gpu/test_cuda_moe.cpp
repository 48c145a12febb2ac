// The routed MoE experts on the GPU (Ops::moe_experts_forward / _backward) against the CPU
// reference: dense and NF4 experts, F32 and F64, an expert that gets no token and one that
// gets more than a tile (64 rows), forward output (added into existing values), the input
// gradient (added) and the routing weights' gradient.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "core/nf4.h"
#include "gpu_test_util.h"

namespace tl {
namespace {

using namespace gpu_test;

struct MoeCase {
  int64_t n = 70, H = 64, I = 32, E = 5, K = 2;
};

// Token t picks distinct experts; expert 4 gets none, expert 0 is picked by every token.
Tensor routes(const MoeCase& c, std::mt19937& rng) {
  Tensor idx = Tensor::zeros({c.n, c.K}, DType::I32);
  for (int64_t t = 0; t < c.n; ++t) {
    idx.data<int32_t>()[t * c.K] = 0;
    idx.data<int32_t>()[t * c.K + 1] = int32_t(1 + rng() % uint32_t(c.E - 2));
  }
  return idx;
}

TEST(CudaMoe, RoutedExpertsMatchTheCpu) {
  TL_REQUIRE_GPU();
  const MoeCase c;
  for (DType dt : kDTypes)
    for (bool nf4 : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (nf4 ? " nf4" : " dense"));
      std::mt19937 rng(31);
      Pair p(dt);
      const Tensor y = random({c.n, c.H}, dt, rng), w = random({c.n, c.K}, dt, rng, 0, 1), idx = routes(c, rng);
      const Tensor gu = random({c.E, 2 * c.I, c.H}, dt, rng, -0.2, 0.2), dn = random({c.E, c.H, c.I}, dt, rng, -0.2, 0.2);
      std::vector<Nf4Tensor> gu4, dn4;
      for (int64_t e = 0; e < c.E; ++e) {
        gu4.push_back(nf4_quantize(gu.slice_rows(e, e + 1).view({2 * c.I, c.H}).to(DType::F32), true));
        dn4.push_back(nf4_quantize(dn.slice_rows(e, e + 1).view({c.H, c.I}).to(DType::F32), true));
      }
      const Tensor gud = p.up(gu), dnd = p.up(dn);
      MoeExperts xc{&gu, &dn, nf4 ? &gu4 : nullptr, nf4 ? &dn4 : nullptr, c.E, c.I};
      MoeExperts xg{&gud, &dnd, nf4 ? &gu4 : nullptr, nf4 ? &dn4 : nullptr, c.E, c.I};
      Tensor out = random({c.n, c.H}, dt, rng), outd = p.up(out);
      MoeTape tc, tg;
      const Tensor yd = p.up(y), wd = p.up(w), idxd = p.gpu.upload(idx, DType::I32);
      p.cpu.moe_experts_forward(y, idx, w, xc, out, tc);
      p.gpu.moe_experts_forward(yd, idxd, wd, xg, outd, tg);
      expect_close(p.down(outd), out, 20 * tol(dt), "moe forward");

      const Tensor dout = random({c.n, c.H}, dt, rng);
      Tensor dy = random({c.n, c.H}, dt, rng), dyd = p.up(dy);
      Tensor dw = Tensor::zeros({c.n, c.K}, dt), dwd = p.gpu.zeros({c.n, c.K}, dt);
      p.cpu.moe_experts_backward(y, idx, w, xc, tc, dout, dy, dw);
      p.gpu.moe_experts_backward(yd, idxd, wd, xg, tg, p.up(dout), dyd, dwd);
      expect_close(p.down(dyd), dy, 20 * tol(dt), "moe dy");
      expect_close(p.down(dwd), dw, 20 * tol(dt), "moe dweights");
    }
}

}  // namespace
}  // namespace tl
