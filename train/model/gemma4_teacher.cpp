// Distillation from the parent of a surgery (issue 24). A model that `upscale` or `expand`
// made holds every parent layer as a copy, so the parent's forward is this model's frozen
// layers taken in the parent's order, without LoRA and without the inserted layers:
// parent_view builds that model over the same tensors and NF4 bytes (nothing is copied).
// forward_backward then adds α·T²·KL(p_teacher,T ‖ p_student,T) to (1 − α)·CE, one fused op
// per 256-token chunk beside the cross-entropy, the teacher's logits made chunk by chunk.
#include <fmt/format.h>

#include <algorithm>

#include "train/model/gemma4_model.h"

namespace tl {

namespace {

// Every tensor of a layer (the projections among them may be held in NF4 under their slot).
constexpr Tensor Gemma4LayerWeights::* kLayerTensors[] = {
    &Gemma4LayerWeights::input_layernorm,      &Gemma4LayerWeights::post_attention_layernorm,
    &Gemma4LayerWeights::pre_feedforward_layernorm, &Gemma4LayerWeights::post_feedforward_layernorm,
    &Gemma4LayerWeights::q_proj,               &Gemma4LayerWeights::q_norm,
    &Gemma4LayerWeights::k_proj,               &Gemma4LayerWeights::v_proj,
    &Gemma4LayerWeights::k_norm,               &Gemma4LayerWeights::o_proj,
    &Gemma4LayerWeights::gate_proj,            &Gemma4LayerWeights::up_proj,
    &Gemma4LayerWeights::down_proj,            &Gemma4LayerWeights::router_proj,
    &Gemma4LayerWeights::router_scale,         &Gemma4LayerWeights::per_expert_scale,
    &Gemma4LayerWeights::experts_gate_up,      &Gemma4LayerWeights::experts_down,
    &Gemma4LayerWeights::pre_feedforward_layernorm_2, &Gemma4LayerWeights::post_feedforward_layernorm_1,
    &Gemma4LayerWeights::post_feedforward_layernorm_2, &Gemma4LayerWeights::per_layer_input_gate,
    &Gemma4LayerWeights::per_layer_projection, &Gemma4LayerWeights::post_per_layer_input_norm};

constexpr Tensor Gemma4Weights::* kGlobalTensors[] = {
    &Gemma4Weights::embed_tokens, &Gemma4Weights::lm_head, &Gemma4Weights::embed_tokens_per_layer,
    &Gemma4Weights::per_layer_model_projection, &Gemma4Weights::per_layer_projection_norm, &Gemma4Weights::norm};

std::string describe(const LayerGeometry& g) {
  return fmt::format("{}, head_dim {}, {} KV heads{}, MLP {}{}", layer_type_name(g.type), g.head_dim, g.num_kv_heads,
                     g.k_eq_v ? " (K=V)" : "", g.mlp_width, g.kv_source >= 0 ? ", KV-shared" : ", own K/V");
}

bool same_rope(const RopeParams& a, const RopeParams& b) {
  return a.type == b.type && a.theta == b.theta && a.partial_rotary_factor == b.partial_rotary_factor &&
         a.factor == b.factor;
}

}  // namespace

std::unique_ptr<Gemma4Model> Gemma4Model::parent_view(const Gemma4Config& parent, std::span<const int> order) const {
  const Gemma4Config& c = config_;
  if (int64_t(order.size()) != parent.num_hidden_layers)
    throw Error(fmt::format("parent view: the layer order names {} layers but the parent has {}", order.size(),
                            parent.num_hidden_layers));
  // Everything outside the layers is shared, so it must be the same shape in both.
  const std::pair<const char*, bool> globals[] = {
      {"hidden_size", c.hidden_size == parent.hidden_size},
      {"vocab_size", c.vocab_size == parent.vocab_size},
      {"num_attention_heads", c.num_attention_heads == parent.num_attention_heads},
      {"hidden_size_per_layer_input", c.hidden_size_per_layer_input == parent.hidden_size_per_layer_input},
      {"vocab_size_per_layer_input", c.vocab_size_per_layer_input == parent.vocab_size_per_layer_input},
      {"tie_word_embeddings", c.tie_word_embeddings == parent.tie_word_embeddings},
      {"final_logit_softcapping", c.final_logit_softcapping == parent.final_logit_softcapping},
      {"rms_norm_eps", c.rms_norm_eps == parent.rms_norm_eps},
      {"sliding_window", c.sliding_window == parent.sliding_window},
      {"enable_moe_block", c.enable_moe_block == parent.enable_moe_block},
      {"num_experts", c.num_experts == parent.num_experts},
      {"top_k_experts", c.top_k_experts == parent.top_k_experts},
      {"moe_intermediate_size", c.moe_intermediate_size == parent.moe_intermediate_size}};
  for (const auto& [key, same] : globals)
    if (!same) throw Error(fmt::format("parent view: the parent's {} differs from this model's", key));

  auto view = std::make_unique<Gemma4Model>(parent, ops_);
  Gemma4Weights& vw = view->w_;
  for (Tensor Gemma4Weights::* g : kGlobalTensors) {
    vw.*g = w_.*g;
    if (auto it = nf4_.find(&(w_.*g)); it != nf4_.end()) view->nf4_[&(vw.*g)] = it->second;
  }
  vw.layers.resize(size_t(parent.num_hidden_layers));  // sized once: the NF4 keys below point into it
  for (int j = 0; j < parent.num_hidden_layers; ++j) {
    const int s = order[size_t(j)];
    if (s < 0 || s >= c.num_hidden_layers)
      throw Error(fmt::format("parent view: parent layer {} maps to layer {}, outside this model's {} layers", j, s,
                              c.num_hidden_layers));
    const LayerGeometry &pg = parent.layer(j), &sg = c.layer(s);
    // KV sharing may differ (a copy of a producer may read another producer's K/V after
    // surgery, or the reverse): the view runs the parent's sharing, so the copy must hold
    // K/V weights exactly where the parent layer computes its own.
    if (pg.type != sg.type || pg.head_dim != sg.head_dim || pg.num_kv_heads != sg.num_kv_heads ||
        pg.k_eq_v != sg.k_eq_v || pg.mlp_width != sg.mlp_width || (pg.kv_source < 0) != (sg.kv_source < 0) ||
        !same_rope(pg.rope, sg.rope))
      throw Error(fmt::format("parent view: parent layer {} ({}) does not match layer {} of this model ({})", j,
                              describe(pg), s, describe(sg)));
    Gemma4LayerWeights& lw = vw.layers[size_t(j)];
    lw = w_.layers[size_t(s)];
    for (Tensor Gemma4LayerWeights::* m : kLayerTensors) {
      const Tensor* key = &(w_.layers[size_t(s)].*m);
      if (auto it = nf4_.find(key); it != nf4_.end()) view->nf4_[&(lw.*m)] = it->second;
      if (auto it = expert_nf4_.find(key); it != expert_nf4_.end()) view->expert_nf4_[&(lw.*m)] = it->second;
    }
    view->ple_block_.push_back(s);
  }
  return view;
}

Tensor Gemma4Model::teacher_hidden(const Batch& batch, const ForwardState& student) {
  ForwardState st;
  st.ids = student.ids;
  st.positions = student.positions;
  st.doc_ids = student.doc_ids;
  st.doc_ids_host = student.doc_ids_host;
  forward(batch, st, false, nullptr);
  return st.hidden;
}

void Gemma4Model::set_distillation(const Distillation& d) {
  if (d.teacher) {
    if (d.teacher == this) throw Error("distillation: a model cannot be its own teacher");
    if (d.teacher->config().vocab_size != config_.vocab_size)
      throw Error(fmt::format("distillation: the teacher's vocabulary ({}) differs from the student's ({})",
                              d.teacher->config().vocab_size, config_.vocab_size));
    if (!(d.alpha >= 0 && d.alpha <= 1)) throw Error(fmt::format("distillation: alpha {} is not in [0, 1]", d.alpha));
    if (!(d.temperature > 0)) throw Error(fmt::format("distillation: temperature {} is not positive", d.temperature));
    if (d.top_k < 0) throw Error(fmt::format("distillation: top_k {} is negative", d.top_k));
  }
  distill_ = d;
}

void Gemma4Model::distill_chunk(const Tensor& student_logits, const Tensor& teacher_hidden, Tensor& teacher_logits,
                                const Tensor& targets, double grad_scale, double cap, Tensor& dlogits,
                                Tensor& kl_sum) {
  distill_.teacher->logits_into(teacher_hidden, teacher_logits);
  ops_.distill_kl_backward(student_logits, teacher_logits, targets, distill_.temperature, distill_.top_k,
                           distill_.alpha * grad_scale, cap, dlogits, kl_sum);
}

Ops::DistillSums Gemma4Model::distill_sums(const Tensor& hidden, Gemma4Model& teacher, const Tensor& teacher_hidden,
                                           const Tensor& labels, double temperature, int64_t top_k) {
  if (teacher.config().vocab_size != config_.vocab_size)
    throw Error("distill_sums: the teacher's vocabulary differs from this model's");
  // Chunked as loss() is, so neither model's [tokens, V] logits exist whole.
  Tensor targets = shift_labels(labels);
  const int64_t n = hidden.dim(0), chunk = 256;
  Ops::DistillSums sums;
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int64_t t1 = std::min(n, t0 + chunk);
    Tensor lg = logits(hidden.slice_rows(t0, t1)), tlg = teacher.logits(teacher_hidden.slice_rows(t0, t1));
    const Ops::DistillSums d =
        ops_.distill_kl_sum(lg, tlg, ops_.upload(targets.slice_rows(t0, t1), DType::I32), temperature, top_k);
    sums.kl += d.kl;
    sums.count += d.count;
    sums.agree += d.agree;
  }
  return sums;
}

}  // namespace tl
