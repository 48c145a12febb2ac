#include "train/step/train_step.h"

#include <cmath>

#include "train/dist/comm.h"
#include "train/dist/ddp.h"
#include "train/model/peft_adapter.h"

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
                      const std::vector<MicroBatch>& micro, double lr, double max_grad_norm, Comm* comm,
                      GradBuckets* buckets) {
  auto& params = optimizer.params();
  for (auto& p : params) ops.scale(*p.grad, 0.0);
  StepResult r;
  for (const auto& mb : micro) r.targets += count_targets(mb.labels);
  if (comm) {  // counts are exact in a double up to 2^53
    double n = double(r.targets);
    comm->all_reduce_sum_host(&n, 1, "target count all-reduce");
    r.targets = int64_t(n);
  }
  const double grad_scale = r.targets ? 1.0 / double(r.targets) : 0.0;
  for (size_t i = 0; i < micro.size(); ++i) {
    // The last backward reports each finished layer, so its bucket's reduction starts.
    if (buckets && i + 1 == micro.size()) model.layer_grads_done = [buckets](int layer) { buckets->layer_done(layer); };
    Gemma4Model::Loss l;
    try {
      l = model.forward_backward(micro[i].batch, micro[i].labels, grad_scale, grads);
    } catch (...) {
      model.layer_grads_done = nullptr;
      throw;
    }
    model.layer_grads_done = nullptr;
    r.loss += l.sum * grad_scale;
    r.kl += l.kl_sum * grad_scale;
    r.correct += l.correct;
  }
  if (buckets) buckets->finish();
  if (comm) {
    double v[3] = {r.loss, double(r.correct), r.kl};
    comm->all_reduce_sum_host(v, 3, "loss all-reduce");
    r.loss = v[0];
    r.correct = int64_t(v[1]);
    r.kl = v[2];
  }
  r.grad_norm = clip_grad_norm(ops, params, max_grad_norm);
  if (!std::isfinite(r.loss) || !std::isfinite(r.kl) || !std::isfinite(r.grad_norm)) {
    r.skipped = true;
    return r;
  }
  optimizer.step(lr);
  return r;
}

}  // namespace tl
