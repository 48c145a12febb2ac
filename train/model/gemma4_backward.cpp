// The backward pass of Gemma4Model, op by op in reverse (gemma4.md §2–§5). Every gradient
// is added into a Gemma4Grads tensor; K/V gradients of KV-shared layers accumulate into the
// source layer's dk/dv before that layer is reached (consumers come later in the forward).
#include <fmt/format.h>

#include <cmath>

#include "core/weights.h"
#include "train/model/gemma4_model.h"

namespace tl {

double embed_scale(int64_t width);  // gemma4_model.cpp

namespace {
Tensor like(Ops& ops, const Tensor& t) { return ops.zeros(t.shape(), t.dtype()); }
}  // namespace

Gemma4Grads Gemma4Model::zero_grads() {
  Gemma4Grads g;
  g.w.layers.resize(w_.layers.size());
  for (const WeightSpec& s : text_decoder_weights(config_)) {
    if (!s.is_parameter) continue;
    Tensor* src = weight_slot(w_, s.name);
    *weight_slot(g.w, s.name) = like(ops_, *src);
  }
  g.w.lm_head = config_.tie_word_embeddings ? g.w.embed_tokens : like(ops_, w_.lm_head);
  return g;
}

Gemma4Model::Loss Gemma4Model::forward_backward(const Batch& batch, const Tensor& labels, double grad_scale,
                                                Gemma4Grads& grads) {
  Tensor stats = ops_.zeros({3}, DType::F64);
  Loss loss;
  loss.count = forward_backward(batch, labels, grad_scale, grads, stats);
  const Tensor host = ops_.download(stats);
  loss.sum = host.data<double>()[0];
  loss.correct = int64_t(host.data<double>()[1]);
  loss.kl_sum = host.data<double>()[2];
  return loss;
}

int64_t Gemma4Model::forward_backward(const Batch& batch, const Tensor& labels, double grad_scale, Gemma4Grads& grads,
                                      Tensor& stats) {
  const int64_t V = config_.vocab_size;
  // The targets are checked and counted here, on the host, and uploaded once: the loss
  // kernels then trust them (reading them back on the device would wait for the stream).
  Tensor targets = shift_labels(labels);
  int64_t count = 0;
  for (int64_t i = 0; i < targets.numel(); ++i) {
    const int32_t y = targets.data<int32_t>()[i];
    if (y == -100) continue;
    if (y < 0 || y >= V)
      throw Error(fmt::format("label {} at position {} is outside the vocabulary of {} tokens", y, i, V));
    ++count;
  }
  ForwardState st;
  expert_grads_ = false;
  for (const Gemma4LayerWeights& l : grads.w.layers) expert_grads_ |= l.experts_gate_up.defined() || l.experts_down.defined();
  upload_batch(batch, st);
  // Distillation: the teacher's final hidden states first (a tape-less forward on the batch
  // uploaded once, so it never overlaps the student's tapes); its logits per chunk below.
  const Tensor teacher_hidden = distill_.teacher ? distill_.teacher->teacher_hidden(batch, st) : Tensor();
  forward(batch, st, true, nullptr);
  const int64_t n = st.hidden.dim(0), H = config_.hidden_size;
  const double cap = config_.final_logit_softcapping.value_or(0.0);
  const Tensor targets_dev = ops_.upload(targets, DType::I32);

  // Head and loss, chunked over tokens so [tokens, V] logits never exist whole:
  // logits = cap·tanh(h·Eᵀ/cap); dlogits from the fused CE+softcap backward.
  Tensor dhidden = ops_.zeros({n, H});
  const int64_t chunk = 256;
  // One logits and one dlogits buffer for every chunk: the head's product overwrites the
  // first and the loss's backward every element of the second (fresh [256, 262144] buffers
  // per chunk cost page faults and zero-fills comparable to the softmax itself).
  Tensor lg_buf = ops_.empty({std::min(n, chunk), V}), dlg_buf = ops_.empty({std::min(n, chunk), V});
  Tensor teacher_lg_buf = distill_.teacher ? ops_.empty({std::min(n, chunk), V}) : Tensor();
  const double ce_scale = distill_.teacher ? (1.0 - distill_.alpha) * grad_scale : grad_scale;
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int64_t t1 = std::min(n, t0 + chunk);
    Tensor h = st.hidden.slice_rows(t0, t1);
    Tensor lg = lg_buf.slice_rows(0, t1 - t0), dlg = dlg_buf.slice_rows(0, t1 - t0);
    logits_into(h, lg);
    const Tensor chunk_targets = targets_dev.slice_rows(t0, t1);
    ops_.cross_entropy_backward(lg, chunk_targets, ce_scale, cap, dlg, stats);
    if (distill_.teacher) {
      Tensor teacher_lg = teacher_lg_buf.slice_rows(0, t1 - t0), kl_sum = stats.slice_rows(2, 3);
      distill_chunk(lg, teacher_hidden.slice_rows(t0, t1), teacher_lg, chunk_targets, grad_scale, cap, dlg, kl_sum);
    }
    Tensor dh = dhidden.slice_rows(t0, t1);
    ops_.linear_backward(h, w_.lm_head, dlg, dh, grads.w.lm_head);
  }

  // Final norm, then the layers in reverse.
  Tensor dx = ops_.zeros({n, H});
  ops_.rmsnorm_backward(st.final_in, w_.norm, H, config_.rms_norm_eps, dhidden, dx, grads.w.norm);
  std::vector<std::pair<Tensor, Tensor>> dkv(size_t(config_.num_hidden_layers));
  Tensor dple = config_.has_ple() ? like(ops_, st.ple) : Tensor();
  for (int i = config_.num_hidden_layers - 1; i >= 0; --i) {
    if (checkpointed(i)) {
      // Recompute this layer's forward from its saved input (same weights, same dropout
      // masks) to rebuild the tape, use it, and drop it before the next layer.
      Tensor x = st.tapes[size_t(i)].x_in;
      layer_forward(i, x, st, st.tapes[size_t(i)]);
    }
    layer_backward(i, dx, st, grads.w.layers[size_t(i)], dkv, dple);
    // Every reader of this layer's tape and K/V is done (KV-shared readers come later in the
    // forward, so earlier here): free them and their gradients.
    st.tapes[size_t(i)] = {};
    st.kv[size_t(i)] = {};
    dkv[size_t(i)] = {};
    if (layer_grads_done) layer_grads_done(i);
  }

  // PLE: ple = (RMSNorm_P(ctx) + tok·√P)·2^-½ with ctx = x0·W_plmpᵀ·H^-½.
  if (config_.has_ple()) {
    const int64_t P = config_.hidden_size_per_layer_input;
    ops_.scale(dple, 1.0 / std::sqrt(2.0));
    ops_.embedding_backward(st.ids, dple, embed_scale(P), config_.pad_token_id, grads.w.embed_tokens_per_layer);
    Tensor dctx = like(ops_, st.ple_ctx);
    ops_.rmsnorm_backward(st.ple_ctx, w_.per_layer_projection_norm, P, config_.rms_norm_eps, dple, dctx,
                          grads.w.per_layer_projection_norm);
    ops_.scale(dctx, 1.0 / std::sqrt(double(H)));
    linear_backward(st, st.x0, w_.per_layer_model_projection, dctx, dx, grads.w.per_layer_model_projection);
  }
  // The pad row (padding_idx) of the embedding gets no lookup gradient, as in PyTorch.
  ops_.embedding_backward(st.ids, dx, embed_scale(H), config_.pad_token_id, grads.w.embed_tokens);
  return count;
}

void Gemma4Model::layer_backward(int i, Tensor& dx, ForwardState& st, Gemma4LayerWeights& g,
                                 std::vector<std::pair<Tensor, Tensor>>& dkv, Tensor& dple) {
  LayerTape& t = st.tapes[size_t(i)];
  const Gemma4LayerWeights& lw = w_.layers[size_t(i)];
  const int64_t H = config_.hidden_size, P = config_.hidden_size_per_layer_input;
  const double eps = config_.rms_norm_eps;

  // out = x3·layer_scalar
  Tensor dx3 = dx;
  if (lw.layer_scalar != 1.0) ops_.scale(dx3, lw.layer_scalar);

  // x3 = x2 + RMSNorm(proj); proj = (gelu(g) ∘ ple_i)·W_projᵀ; g = x2·W_gateᵀ
  Tensor dx2 = dx3;
  if (P > 0) {
    Tensor dproj = like(ops_, t.proj), dgh = like(ops_, t.gh), dg = like(ops_, t.g), dple_i = like(ops_, t.ple_i);
    ops_.rmsnorm_backward(t.proj, lw.post_per_layer_input_norm, H, eps, dx3, dproj, g.post_per_layer_input_norm);
    linear_backward(st, t.gh, lw.per_layer_projection, dproj, dgh, g.per_layer_projection);
    ops_.gelu_tanh_mul_backward(t.g, t.ple_i, dgh, dg, dple_i);
    linear_backward(st, t.x2, lw.per_layer_input_gate, dg, dx2, g.per_layer_input_gate);
    ops_.copy_columns(dple_i, 0, dple, int64_t(i) * P, P);  // each layer owns its column block
  }

  // x2 = x1 + RMSNorm(m_sum); m_sum = mlp, or RMSNorm(mlp; ·_1) + RMSNorm(m2; ·_2) with MoE
  Tensor dx1 = dx2;
  Tensor dm_sum = like(ops_, t.m_sum);
  ops_.rmsnorm_backward(t.m_sum, lw.post_feedforward_layernorm, H, eps, dx2, dm_sum, g.post_feedforward_layernorm);
  Tensor dmlp = dm_sum;
  if (config_.enable_moe_block) {
    dmlp = like(ops_, t.mlp);
    ops_.rmsnorm_backward(t.mlp, lw.post_feedforward_layernorm_1, H, eps, dm_sum, dmlp, g.post_feedforward_layernorm_1);
    Tensor dm2 = like(ops_, t.m2);
    ops_.rmsnorm_backward(t.m2, lw.post_feedforward_layernorm_2, H, eps, dm_sum, dm2, g.post_feedforward_layernorm_2);
    moe_backward(lw, st, t, dm2, g, dx1);
  }
  // Dense GeGLU.
  Tensor dh = like(ops_, t.h), dgate = like(ops_, t.gate), dup = like(ops_, t.up), dm_in = like(ops_, t.m_in);
  linear_backward(st, t.h, lw.down_proj, dmlp, dh, g.down_proj);
  ops_.gelu_tanh_mul_backward(t.gate, t.up, dh, dgate, dup);
  {
    MatmulInputHold hold_m_in(ops_, t.m_in);
    linear_backward(st, t.m_in, lw.gate_proj, dgate, dm_in, g.gate_proj);
    linear_backward(st, t.m_in, lw.up_proj, dup, dm_in, g.up_proj);
  }
  ops_.rmsnorm_backward(t.x1, lw.pre_feedforward_layernorm, H, eps, dm_in, dx1, g.pre_feedforward_layernorm);

  // x1 = x + RMSNorm(o), o = Attn(a), a = RMSNorm(x)
  Tensor dx_in = dx1;
  Tensor d_o = like(ops_, t.o);
  ops_.rmsnorm_backward(t.o, lw.post_attention_layernorm, H, eps, dx1, d_o, g.post_attention_layernorm);
  Tensor da = like(ops_, t.a);
  attention_backward(i, d_o, st, g, dkv, da);
  ops_.rmsnorm_backward(t.x_in, lw.input_layernorm, H, eps, da, dx_in, g.input_layernorm);
  dx = dx_in;
}

void Gemma4Model::attention_backward(int i, const Tensor& d_o, ForwardState& st, Gemma4LayerWeights& g,
                                     std::vector<std::pair<Tensor, Tensor>>& dkv, Tensor& da) {
  LayerTape& t = st.tapes[size_t(i)];
  const LayerGeometry& geo = config_.layer(i);
  const Gemma4LayerWeights& lw = w_.layers[size_t(i)];
  const int64_t nh = config_.num_attention_heads, d = geo.head_dim, nkv = geo.num_kv_heads;
  const int64_t B = st.B, S = st.S;
  const double eps = config_.rms_norm_eps;

  Tensor dattn = like(ops_, t.attn);
  linear_backward(st, t.attn, lw.o_proj, d_o, dattn, g.o_proj);

  const int src = geo.kv_source < 0 ? i : geo.kv_source;
  const auto& [k, v] = st.kv[size_t(src)];
  auto& [dk, dv] = dkv[size_t(src)];
  if (!dk.defined()) {
    dk = like(ops_, k);
    dv = like(ops_, v);
  }
  Tensor dq = like(ops_, t.q);
  const int64_t kvh = k.dim(1) / d;
  Tensor dk4 = dk.view({B, S, kvh, d}), dv4 = dv.view({B, S, kvh, d});
  AttentionMask mask = mask_for(i, st);
  if (t.lse.defined()) mask.lse = &t.lse;
  ops_.attention_backward(t.q.view({B, S, nh, d}), k.view({B, S, kvh, d}), v.view({B, S, kvh, d}), mask,
                          dattn.view({B, S, nh, d}), dq, dk4, dv4);

  // q = RoPE(RMSNorm_d(a·W_qᵀ))
  ops_.rope_backward(dq, nh, st.positions, inv_freq_[size_t(i)]);
  Tensor dq_raw = like(ops_, t.q_raw);
  ops_.rmsnorm_backward(t.q_raw, lw.q_norm, d, eps, dq, dq_raw, g.q_norm);
  MatmulInputHold hold_a(ops_, t.a);  // read by the q, k and v adapters' dA (and dW of full layers)
  linear_backward(st, t.a, lw.q_proj, dq_raw, da, g.q_proj);

  if (geo.kv_source >= 0) return;  // this layer's K/V gradient went to the source layer
  // Every consumer (later layers) has added into dk/dv by now.
  // k = RoPE(RMSNorm_d(k_raw; k_norm)); v = RMSNorm_d(v_raw), v_raw = k_raw on K=V layers.
  ops_.rope_backward(dk, nkv, st.positions, inv_freq_[size_t(i)]);
  Tensor dk_raw = like(ops_, t.k_raw);
  ops_.rmsnorm_backward(t.k_raw, lw.k_norm, d, eps, dk, dk_raw, g.k_norm);
  Tensor none;
  if (geo.k_eq_v) {
    ops_.rmsnorm_backward(t.v_raw, Tensor(), d, eps, dv, dk_raw, none);
  } else {
    Tensor dv_raw = like(ops_, t.v_raw);
    ops_.rmsnorm_backward(t.v_raw, Tensor(), d, eps, dv, dv_raw, none);
    linear_backward(st, t.a, lw.v_proj, dv_raw, da, g.v_proj);
  }
  linear_backward(st, t.a, lw.k_proj, dk_raw, da, g.k_proj);
}

void Gemma4Model::expert_linear_backward(const Tensor& x, const Tensor& w, int64_t e, const Tensor& dy, Tensor& dx,
                                         Tensor& dw) {
  if (auto q = expert_nf4_.find(&w); q != expert_nf4_.end()) {
    if (dw.defined()) throw Error("MoE experts held in NF4 are frozen and have no gradient");
    ops_.linear_nf4_backward(dy, (*q->second)[size_t(e)], dx);
    return;
  }
  const Shape slice{w.dim(1), w.dim(2)};
  Tensor dw_e = dw.defined() ? dw.slice_rows(e, e + 1).view(slice) : Tensor();
  ops_.linear_backward(x, w.slice_rows(e, e + 1).view(slice), dy, dx, dw_e);
}

void Gemma4Model::moe_backward(const Gemma4LayerWeights& lw, ForwardState& st, LayerTape& t, const Tensor& dm2,
                               Gemma4LayerWeights& g, Tensor& dx1) {
  const int64_t n = t.x1.dim(0), H = config_.hidden_size, K = config_.top_k_experts;
  const double eps = config_.rms_norm_eps;
  Tensor dy2 = like(ops_, t.y2);
  Tensor dweights;
  if (t.moe.out.defined()) {  // the routed path: everything stays on the backend
    dweights = ops_.empty({n, K});
    ops_.moe_experts_backward(t.y2, t.route_idx, t.route_w, moe_experts(lw), t.moe, dm2, dy2, dweights);
  } else {
    dweights = moe_backward_per_expert(lw, t, dm2, g, dy2);
  }
  ops_.rmsnorm_backward(t.x1, lw.pre_feedforward_layernorm_2, H, eps, dy2, dx1, g.pre_feedforward_layernorm_2);

  // Router: weights = route(logits), logits = r·W_routerᵀ, r = RMSNorm(x1; router.scale)·H^-½.
  Tensor dlogits = like(ops_, t.router_logits);
  ops_.moe_route_backward(t.router_logits, lw.per_expert_scale, t.route_idx, dweights, dlogits, g.per_expert_scale);
  Tensor dr = like(ops_, t.router_in);
  linear_backward(st, t.router_in, lw.router_proj, dlogits, dr, g.router_proj);
  ops_.scale(dr, 1.0 / std::sqrt(double(H)));
  ops_.rmsnorm_backward(t.x1, lw.router_scale, H, eps, dr, dx1, g.router_scale);
}

// The per-expert path (expert gradients, or the forward ran with pruning's observer): reads
// the routing weights' gradients back per expert. Adds into dy2; returns dweights.
Tensor Gemma4Model::moe_backward_per_expert(const Gemma4LayerWeights& lw, LayerTape& t, const Tensor& dm2,
                                            Gemma4LayerWeights& g, Tensor& dy2) {
  const int64_t n = t.x1.dim(0), H = config_.hidden_size, K = config_.top_k_experts,
                I = config_.moe_intermediate_size;
  Tensor dweights_host = Tensor::zeros({n, K}, DType::F64);
  for (ExpertTape& x : t.experts) {
    const int64_t e = x.expert, m = x.rows.numel();
    // m2 += scales ∘ out (rows):  dscales = ⟨out, dm2[rows]⟩;  dout = scales ∘ dm2[rows]
    Tensor dscales = ops_.zeros({m});
    ops_.rowwise_dot(x.out, x.rows, dm2, dscales);
    Tensor dscales_host = ops_.download(dscales);
    for (int64_t j = 0; j < m; ++j) dweights_host.data<double>()[x.slots.data<int32_t>()[j]] = dscales_host.get(j);
    Tensor dout = ops_.zeros({m, H});
    ops_.gather_rows(dm2, x.rows, dout);
    ops_.scale_rows(dout, x.scales);
    Tensor dh = like(ops_, x.h), dgate = like(ops_, x.gate), dup = like(ops_, x.up);
    expert_linear_backward(x.h, lw.experts_down, e, dout, dh, g.experts_down);
    ops_.gelu_tanh_mul_backward(x.gate, x.up, dh, dgate, dup);
    Tensor dgu = ops_.zeros({m, 2 * I});
    ops_.copy_columns(dgate, 0, dgu, 0, I);
    ops_.copy_columns(dup, 0, dgu, I, I);
    Tensor dye = like(ops_, x.ye);
    expert_linear_backward(x.ye, lw.experts_gate_up, e, dgu, dye, g.experts_gate_up);
    ops_.scatter_rows(dye, x.rows, dy2);
  }
  return ops_.upload(dweights_host, ops_.act_dtype());
}

}  // namespace tl
