// AdamW, learning-rate schedules and clipping against PyTorch/transformers in float64
// (tests/golden/optim, made by scripts/golden/make_train_golden.py).
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fstream>

#include "core/cpu/cpu_ops.h"
#include "core/safetensors.h"
#include "golden_util.h"
#include "train/step/optim.h"

namespace tl {
namespace {

TEST(Optim, AdamWWithWarmupCosineAndClippingMatchesTorch) {
  auto rec = SafetensorsFile::open(test::golden("optim/adamw.safetensors"));
  CpuOps ops(DType::F64);
  std::vector<Tensor> p, g(3);
  for (int i = 0; i < 3; ++i) {
    p.push_back(rec.get(fmt::format("init_{}", i)).clone());
    g[size_t(i)] = ops.zeros(p.back().shape());
  }
  std::vector<ParamSlot> slots;
  for (int i = 0; i < 3; ++i) slots.push_back({fmt::format("p{}", i), &p[size_t(i)], &g[size_t(i)], {}, {}, i != 1});
  AdamW opt({1e-2, 0.9, 0.95, 1e-8, 0.1}, slots, ops);
  EXPECT_EQ(opt.groups(), 2u);  // p0, p2 decay; p1 does not: two flat buffers
  Schedule sched{"cosine", 4, 2};
  for (int k = 0; k < 4; ++k) {
    // In place: p and g are views into the optimizer's flat buffers now.
    for (int i = 0; i < 3; ++i) assign(ops, g[size_t(i)], rec.get(fmt::format("g{}_{}", k, i)));
    double lr = 1e-2 * sched.factor(k);
    EXPECT_NEAR(lr, rec.get(fmt::format("lr{}", k)).get(0), 1e-15) << "step " << k;
    double norm = clip_grad_norm(ops, opt.params(), 0.5);
    EXPECT_NEAR(norm, rec.get(fmt::format("norm{}", k)).get(0), 1e-12) << "step " << k;
    opt.step(lr);
    for (int i = 0; i < 3; ++i) {
      auto d = test::compare(p[size_t(i)], rec.get(fmt::format("after{}_{}", k, i)));
      EXPECT_LE(d.max_abs, 1e-14) << "param " << i << " after step " << k;
    }
  }
}

TEST(Optim, SchedulesMatchTransformers) {
  std::ifstream in(test::golden("optim/schedules.json"));
  auto j = nlohmann::json::parse(in);
  const int64_t T = j["T"], W = j["W"];
  const std::pair<const char*, Schedule> cases[] = {
      {"cosine_with_warmup", {"cosine", T, W}},
      {"linear_with_warmup", {"linear", T, W}},
      {"constant", {"constant", T, 0}},
      {"constant_with_warmup", {"constant_with_warmup", T, W}},
      {"cosine_with_min_lr_0.1_with_warmup", {"cosine", T, W, 0.1}}};
  for (const auto& [name, sched] : cases) {
    const auto& want = j[name];
    for (size_t s = 0; s < want.size(); ++s)
      EXPECT_NEAR(sched.factor(int64_t(s)), want[s].get<double>(), 1e-15) << name << " at step " << s;
  }
  for (const auto& [total, w] : j["warmup_steps_from_ratio"]["0.03"].items())
    EXPECT_EQ(warmup_steps_for(std::stoll(total), 0, 0.03), w.get<int64_t>()) << "T=" << total;
  EXPECT_EQ(warmup_steps_for(100, 7, 0.03), 7);
}

}  // namespace
}  // namespace tl
