#include "train/train_step.h"

#include <cmath>

#include "train/peft_adapter.h"

namespace tl {

std::vector<ParamSlot> lora_param_slots(Gemma4Model& model, const std::string& decoder_prefix) {
  std::vector<ParamSlot> out;
  for (LoraAdapter* a : model.adapters()) {
    out.push_back({peft_key(a->name, decoder_prefix, 'A'), &a->A, &a->dA, {}, {}, true});
    out.push_back({peft_key(a->name, decoder_prefix, 'B'), &a->B, &a->dB, {}, {}, true});
  }
  return out;
}

int64_t count_targets(const Tensor& labels) {
  Tensor t = shift_labels(labels);
  int64_t n = 0;
  for (int64_t i = 0; i < t.numel(); ++i) n += t.data<int32_t>()[i] != -100;
  return n;
}

StepResult train_step(Gemma4Model& model, Gemma4Grads& grads, AdamW& optimizer, Ops& ops,
                      const std::vector<MicroBatch>& micro, double lr, double max_grad_norm) {
  auto& params = optimizer.params();
  for (auto& p : params) ops.scale(*p.grad, 0.0);
  StepResult r;
  for (const auto& mb : micro) r.targets += count_targets(mb.labels);
  const double grad_scale = r.targets ? 1.0 / double(r.targets) : 0.0;
  for (const auto& mb : micro) {
    auto l = model.forward_backward(mb.batch, mb.labels, grad_scale, grads);
    r.loss += l.sum * grad_scale;
    r.correct += l.correct;
  }
  r.grad_norm = clip_grad_norm(ops, params, max_grad_norm);
  if (!std::isfinite(r.loss) || !std::isfinite(r.grad_norm)) {
    r.skipped = true;
    return r;
  }
  optimizer.step(lr);
  return r;
}

}  // namespace tl
