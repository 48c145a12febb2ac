// An adapter written by torchless-train, loaded by PEFT on the same base, gives the logits
// recorded in tests/golden/peft_roundtrip (scripts/golden/check_peft_loads_torchless.py);
// reading the same files back into torchless must reproduce them.
#include "core/cpu/cpu_ops.h"
#include "core/weights.h"
#include "golden_util.h"
#include "train/model/peft_adapter.h"
#include "train/model/gemma4_model.h"

namespace tl {
namespace {

TEST(PeftRoundTrip, TorchlessAdapterInPeftGivesTheSameLogits) {
  const std::string base = std::string(TL_SOURCE_DIR) + "/models/tiny";
  const std::string dir = test::golden("peft_roundtrip");
  CpuOps ops(DType::F32);
  Gemma4Model model(Gemma4Config::load(base), ops);
  Checkpoint ckpt = Checkpoint::open(base);
  model.load(ckpt);
  const std::string prefix = decoder_prefix(ckpt);
  PeftAdapter ad = read_peft_adapter(dir);
  ASSERT_FALSE(ad.adapters.empty());
  for (const auto& a : ad.adapters)
    model.attach_lora(a.weight, a.A.to(DType::F32), a.B.to(DType::F32),
                      ad.spec.scaling_for(prefix + a.weight.substr(0, a.weight.size() - 7)));
  auto rec = SafetensorsFile::open(dir + "/logits.safetensors");
  auto d = test::compare(model.logits(model.forward_hidden({rec.get("input_ids"), {}, {}})), rec.get("logits"));
  EXPECT_LE(d.max_abs, 1e-5 * d.max_ref) << "max|diff| " << d.max_abs;
}

}  // namespace
}  // namespace tl
