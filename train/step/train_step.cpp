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
  optimizer.zero_grads();  // a fill: NaN · 0 would stay NaN
  StepResult r;
  for (const auto& mb : micro) r.targets += count_targets(mb.labels);
  if (comm) {  // host counts (the labels are on the host); exact in a double up to 2^53
    double n = double(r.targets);
    comm->all_reduce_sum_host(&n, 1, "target count all-reduce");
    r.targets = int64_t(n);
  }
  const double grad_scale = r.targets ? 1.0 / double(r.targets) : 0.0;
  // The step's statistics stay on the device until one read, after the gradients are
  // complete: [0] Σ loss, [1] argmax hits, [2] Σ KL to the teacher (distilling), [3] Σ
  // gradient² (the global norm, squared).
  Tensor stats = ops.zeros({4}, DType::F64);
  for (size_t i = 0; i < micro.size(); ++i) {
    // The last backward reports each finished layer, so its bucket's reduction starts.
    if (buckets && i + 1 == micro.size()) model.layer_grads_done = [buckets](int layer) { buckets->layer_done(layer); };
    try {
      model.forward_backward(micro[i].batch, micro[i].labels, grad_scale, grads, stats);
    } catch (...) {
      model.layer_grads_done = nullptr;
      throw;
    }
    model.layer_grads_done = nullptr;
  }
  if (buckets) buckets->finish();
  // The norm of the summed gradients (every rank holds them after the reduction).
  optimizer.add_grad_sum_squares(stats, 3);
  const Tensor host = ops.download(stats);  // the step's one read
  double sums[3] = {host.data<double>()[0], host.data<double>()[1], host.data<double>()[2]};
  if (comm) comm->all_reduce_sum_host(sums, 3, "loss all-reduce");
  r.loss = sums[0] * grad_scale;
  r.correct = int64_t(sums[1]);
  r.kl = sums[2] * grad_scale;
  r.grad_norm = std::sqrt(host.data<double>()[3]);
  if (!std::isfinite(r.loss) || !std::isfinite(r.kl) || !std::isfinite(r.grad_norm)) {
    r.skipped = true;
    return r;
  }
  // torch's clip_grad_norm_ (formats.md §5.3): the gradients times min(1, max/(norm + 1e-6)),
  // always multiplied; here inside the AdamW update rather than by a pass of its own.
  const double coef = max_grad_norm > 0 ? std::min(1.0, max_grad_norm / (r.grad_norm + 1e-6)) : 1.0;
  optimizer.step(lr, coef);
  return r;
}

}  // namespace tl
