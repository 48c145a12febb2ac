#include "train/gemma4_model.h"

#include <fmt/format.h>

#include <cmath>

#include "core/weights.h"

namespace tl {

Gemma4Model::Gemma4Model(Gemma4Config config, Ops& ops) : config_(std::move(config)), ops_(ops) {
  for (const auto& g : config_.layers()) inv_freq_.push_back(rope_inv_freq(g));
}

// Inverse RoPE frequencies, computed in fp32 as HF does.
// default:      inv_freq_i = θ^(−2i/d), i < d/2
// proportional: the first ⌊factor·d/2⌋ entries as above with exponent over the FULL d,
//               the rest 0 (those dims carry no position).
Tensor Gemma4Model::rope_inv_freq(const LayerGeometry& g) const {
  int64_t half = g.head_dim / 2;
  int64_t rotated = half;
  if (g.rope.type == "proportional")
    rotated = int64_t(std::floor(g.rope.partial_rotary_factor * double(g.head_dim) / 2.0));
  Tensor f = Tensor::zeros({half}, DType::F64);
  for (int64_t i = 0; i < rotated; ++i) {
    float e = float(2 * i) / float(g.head_dim);
    f.data<double>()[i] = double(1.0f / std::pow(float(g.rope.theta), e) / float(g.rope.factor));
  }
  return f;
}

void Gemma4Model::load(const Checkpoint& ckpt) {
  check_text_decoder(config_, ckpt);  // names the first missing or mis-shaped tensor
  const std::string prefix = decoder_prefix(ckpt);
  const DType act = ops_.act_dtype();
  auto fetch = [&](const WeightSpec& s) { return ckpt.get(prefix + s.name); };
  w_ = {};
  w_.layers.resize(size_t(config_.num_hidden_layers));
  for (const WeightSpec& s : text_decoder_weights(config_)) {
    Tensor host = fetch(s);
    if (s.component == Component::LayerScalar) {
      w_.layers[size_t(s.layer)].layer_scalar = host.get(0);
      continue;
    }
    Tensor dev = ops_.upload(host, act);
    if (s.layer < 0) {
      const std::string& n = s.name;
      if (n == "embed_tokens.weight") w_.embed_tokens = dev;
      else if (n == "embed_tokens_per_layer.weight") w_.embed_tokens_per_layer = dev;
      else if (n == "per_layer_model_projection.weight") w_.per_layer_model_projection = dev;
      else if (n == "per_layer_projection_norm.weight") w_.per_layer_projection_norm = dev;
      else if (n == "norm.weight") w_.norm = dev;
      continue;
    }
    Gemma4LayerWeights& lw = w_.layers[size_t(s.layer)];
    std::string n = s.name.substr(s.name.find('.', 7) + 1);  // strip "layers.{i}."
    Tensor* slot =
        n == "input_layernorm.weight"              ? &lw.input_layernorm
        : n == "post_attention_layernorm.weight"   ? &lw.post_attention_layernorm
        : n == "pre_feedforward_layernorm.weight"  ? &lw.pre_feedforward_layernorm
        : n == "post_feedforward_layernorm.weight" ? &lw.post_feedforward_layernorm
        : n == "self_attn.q_proj.weight"           ? &lw.q_proj
        : n == "self_attn.q_norm.weight"           ? &lw.q_norm
        : n == "self_attn.k_proj.weight"           ? &lw.k_proj
        : n == "self_attn.v_proj.weight"           ? &lw.v_proj
        : n == "self_attn.k_norm.weight"           ? &lw.k_norm
        : n == "self_attn.o_proj.weight"           ? &lw.o_proj
        : n == "mlp.gate_proj.weight"              ? &lw.gate_proj
        : n == "mlp.up_proj.weight"                ? &lw.up_proj
        : n == "mlp.down_proj.weight"              ? &lw.down_proj
        : n == "router.proj.weight"                ? &lw.router_proj
        : n == "router.scale"                      ? &lw.router_scale
        : n == "router.per_expert_scale"           ? &lw.per_expert_scale
        : n == "experts.gate_up_proj"              ? &lw.experts_gate_up
        : n == "experts.down_proj"                 ? &lw.experts_down
        : n == "pre_feedforward_layernorm_2.weight"  ? &lw.pre_feedforward_layernorm_2
        : n == "post_feedforward_layernorm_1.weight" ? &lw.post_feedforward_layernorm_1
        : n == "post_feedforward_layernorm_2.weight" ? &lw.post_feedforward_layernorm_2
        : n == "per_layer_input_gate.weight"         ? &lw.per_layer_input_gate
        : n == "per_layer_projection.weight"         ? &lw.per_layer_projection
        : n == "post_per_layer_input_norm.weight"    ? &lw.post_per_layer_input_norm
                                                     : nullptr;
    if (!slot) throw std::logic_error("unmapped weight " + s.name);
    *slot = dev;
  }
  if (config_.tie_word_embeddings) {
    w_.lm_head = w_.embed_tokens;
  } else {
    WeightSpec head{"lm_head.weight", {config_.vocab_size, config_.hidden_size}, Component::Embeddings};
    if (!ckpt.contains("lm_head.weight"))
      throw Error(ckpt.dir().string() + ": tie_word_embeddings is false but 'lm_head.weight' is missing");
    Tensor t = ckpt.get("lm_head.weight");
    if (t.shape() != head.shape)
      throw Error(fmt::format("{}: tensor 'lm_head.weight' has shape {} but the config implies {}",
                              ckpt.dir().string(), shape_str(t.shape()), shape_str(head.shape)));
    w_.lm_head = ops_.upload(t, act);
  }
}

namespace {
Tensor to_i32(const Tensor& t) { return t.dtype() == DType::I32 ? t : t.to(DType::I32); }
}  // namespace

// e = EmbedTable[ids] · √H, the scale cast to the weight dtype first (gemma4.md §2.1).
Tensor Gemma4Model::embed(const Batch& batch, Tensor& ids_dev) {
  const int64_t n = batch.ids.numel(), H = config_.hidden_size;
  ids_dev = ops_.upload(to_i32(batch.ids).view({n}), DType::I32);
  Tensor x = ops_.zeros({n, H});
  // HF keeps √H in an fp32 buffer, so even an fp64 run scales by the fp32-rounded value.
  ops_.embedding_forward(w_.embed_tokens, ids_dev, double(float(std::sqrt(double(H)))), x);
  return x;
}

// PLE (gemma4.md §2.2): ple = (RMSNorm_P(e·W_plmpᵀ · H^-½) + EmbedPLE[ids]·√P) · 2^-½, [N, L·P].
Tensor Gemma4Model::per_layer_inputs(const Tensor& ids, const Tensor& e) {
  const int64_t n = ids.numel(), L = config_.num_hidden_layers, P = config_.hidden_size_per_layer_input;
  Tensor ctx = ops_.zeros({n, L * P});
  ops_.linear_forward(e, w_.per_layer_model_projection, ctx);
  ops_.scale(ctx, 1.0 / std::sqrt(double(config_.hidden_size)));
  ops_.rmsnorm_forward(ctx, w_.per_layer_projection_norm, P, config_.rms_norm_eps, ctx);
  Tensor tok = ops_.zeros({n, L * P});
  ops_.embedding_forward(w_.embed_tokens_per_layer, ids, double(float(std::sqrt(double(P)))), tok);
  ops_.add(ctx, tok, ctx);
  ops_.scale(ctx, 1.0 / std::sqrt(2.0));
  return ctx;
}

Tensor Gemma4Model::forward_hidden(const Batch& batch, std::vector<Tensor>* layer_outputs) {
  if (batch.ids.rank() != 2) throw Error("batch ids must be [B, S]");
  const int64_t B = batch.ids.dim(0), S = batch.ids.dim(1), n = B * S;
  Tensor positions_host;
  if (batch.positions.defined()) {
    positions_host = to_i32(batch.positions);
  } else {
    positions_host = Tensor::zeros({B, S}, DType::I32);
    for (int64_t i = 0; i < n; ++i) positions_host.data<int32_t>()[i] = int32_t(i % S);
  }
  Tensor positions = ops_.upload(positions_host.view({n}), DType::I32);

  Tensor ids;
  Tensor x = embed(batch, ids);
  Tensor ple;
  if (config_.has_ple()) ple = per_layer_inputs(ids, x);
  if (layer_outputs) layer_outputs->push_back(ops_.download(x));

  std::vector<std::pair<Tensor, Tensor>> kv(size_t(config_.num_hidden_layers));
  for (int i = 0; i < config_.num_hidden_layers; ++i) {
    layer_forward(i, x, batch, positions, ple, kv);
    if (layer_outputs) layer_outputs->push_back(ops_.download(x));
  }
  ops_.rmsnorm_forward(x, w_.norm, config_.hidden_size, config_.rms_norm_eps, x);
  return x;
}

Tensor Gemma4Model::attention(int i, const Tensor& a, const Batch& batch, const Tensor& positions,
                              std::vector<std::pair<Tensor, Tensor>>& kv) {
  const LayerGeometry& g = config_.layer(i);
  const Gemma4LayerWeights& lw = w_.layers[size_t(i)];
  const int64_t B = batch.ids.dim(0), S = batch.ids.dim(1), n = B * S;
  const int64_t nh = config_.num_attention_heads, d = g.head_dim, nkv = g.num_kv_heads;
  const double eps = config_.rms_norm_eps;

  // q = RoPE(RMSNorm_d(a·W_qᵀ; q_norm)), per head.
  Tensor q = ops_.zeros({n, nh * d});
  ops_.linear_forward(a, lw.q_proj, q);
  ops_.rmsnorm_forward(q, lw.q_norm, d, eps, q);
  ops_.rope_forward(q, nh, positions, inv_freq_[size_t(i)]);

  if (g.kv_source < 0) {
    // k = RoPE(RMSNorm_d(a·W_kᵀ; k_norm)); v = RMSNorm_d(a·W_vᵀ) without weight, where
    // K=V full layers take v from the same raw k projection.
    Tensor kraw = ops_.zeros({n, nkv * d});
    ops_.linear_forward(a, lw.k_proj, kraw);
    Tensor vraw = kraw;
    if (!g.k_eq_v) {
      vraw = ops_.zeros({n, nkv * d});
      ops_.linear_forward(a, lw.v_proj, vraw);
    }
    Tensor k = ops_.zeros({n, nkv * d});
    ops_.rmsnorm_forward(kraw, lw.k_norm, d, eps, k);
    ops_.rope_forward(k, nkv, positions, inv_freq_[size_t(i)]);
    Tensor v = ops_.zeros({n, nkv * d});
    ops_.rmsnorm_forward(vraw, Tensor(), d, eps, v);
    kv[size_t(i)] = {k, v};
  }
  const auto& [k, v] = kv[size_t(g.kv_source < 0 ? i : g.kv_source)];

  Tensor o = ops_.zeros({B, S, nh, d});
  Tensor doc = batch.doc_ids.defined() ? ops_.upload(to_i32(batch.doc_ids), DType::I32) : Tensor();
  AttentionMask mask{g.type == LayerType::Sliding ? config_.sliding_window : 0,
                     doc.defined() ? &doc : nullptr};
  ops_.attention_forward(q.view({B, S, nh, d}), k.view({B, S, k.dim(1) / d, d}),
                         v.view({B, S, v.dim(1) / d, d}), mask, o);
  Tensor out = ops_.zeros({n, config_.hidden_size});
  ops_.linear_forward(o.view({n, nh * d}), lw.o_proj, out);
  return out;
}

// GeGLU: (gelu_tanh(y·W_gateᵀ) ∘ y·W_upᵀ)·W_downᵀ
Tensor Gemma4Model::dense_mlp(const Gemma4LayerWeights& lw, const Tensor& y) {
  const int64_t n = y.dim(0), I = lw.gate_proj.dim(0);
  Tensor gate = ops_.zeros({n, I}), up = ops_.zeros({n, I});
  ops_.linear_forward(y, lw.gate_proj, gate);
  ops_.linear_forward(y, lw.up_proj, up);
  ops_.gelu_tanh_mul_forward(gate, up, gate);
  Tensor out = ops_.zeros({n, config_.hidden_size});
  ops_.linear_forward(gate, lw.down_proj, out);
  return out;
}

// MoE branch (gemma4.md §3.4): the router and the expert pre-norm both read x1.
Tensor Gemma4Model::moe_block(const Gemma4LayerWeights& lw, const Tensor& x1) {
  const int64_t n = x1.dim(0), H = config_.hidden_size, E = config_.num_experts,
                K = config_.top_k_experts, I = config_.moe_intermediate_size;
  const double eps = config_.rms_norm_eps;
  // r = RMSNorm_noscale(x1) ∘ router.scale · H^-½; logits = r·W_routerᵀ
  // (RMSNorm without weight, then ∘ router.scale, is RMSNorm with router.scale as weight.)
  Tensor r = ops_.zeros({n, H});
  ops_.rmsnorm_forward(x1, lw.router_scale, H, eps, r);
  ops_.scale(r, 1.0 / std::sqrt(double(H)));
  Tensor logits = ops_.zeros({n, E});
  ops_.linear_forward(r, lw.router_proj, logits);
  Tensor weights = ops_.zeros({n, K}), idx = ops_.zeros({n, K}, DType::I32);
  ops_.moe_route_forward(logits, lw.per_expert_scale, K, weights, idx);

  Tensor y = ops_.zeros({n, H});
  ops_.rmsnorm_forward(x1, lw.pre_feedforward_layernorm_2, H, eps, y);
  Tensor out = ops_.zeros({n, H});
  Tensor idx_host = ops_.download(idx), w_host = ops_.download(weights);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int32_t> rows;
    std::vector<double> scales;
    for (int64_t j = 0; j < n * K; ++j)
      if (idx_host.data<int32_t>()[j] == e) {
        rows.push_back(int32_t(j / K));
        scales.push_back(w_host.get(j));
      }
    if (rows.empty()) continue;
    const int64_t m = int64_t(rows.size());
    Tensor rows_host = Tensor::zeros({m}, DType::I32), scale_host = Tensor::zeros({m}, DType::F64);
    for (int64_t j = 0; j < m; ++j) {
      rows_host.data<int32_t>()[j] = rows[size_t(j)];
      scale_host.data<double>()[j] = scales[size_t(j)];
    }
    Tensor rows_dev = ops_.upload(rows_host, DType::I32);
    Tensor ye = ops_.zeros({m, H});
    ops_.gather_rows(y, rows_dev, ye);
    Tensor gu = ops_.zeros({m, 2 * I});
    ops_.linear_forward(ye, lw.experts_gate_up.slice_rows(e, e + 1).view({2 * I, H}), gu);
    Tensor gate = ops_.zeros({m, I}), up = ops_.zeros({m, I});
    ops_.copy_columns(gu, 0, gate, 0, I);  // rows [0, I) of gate_up_proj are the gate
    ops_.copy_columns(gu, I, up, 0, I);
    ops_.gelu_tanh_mul_forward(gate, up, gate);
    Tensor oe = ops_.zeros({m, H});
    ops_.linear_forward(gate, lw.experts_down.slice_rows(e, e + 1).view({H, I}), oe);
    ops_.scatter_add_rows(oe, rows_dev, ops_.upload(scale_host, ops_.act_dtype()), out);
  }
  return out;
}

void Gemma4Model::layer_forward(int i, Tensor& x, const Batch& batch, const Tensor& positions,
                                const Tensor& ple, std::vector<std::pair<Tensor, Tensor>>& kv) {
  const Gemma4LayerWeights& lw = w_.layers[size_t(i)];
  const int64_t n = x.dim(0), H = config_.hidden_size, P = config_.hidden_size_per_layer_input;
  const double eps = config_.rms_norm_eps;

  // x1 = x + RMSNorm(Attn(RMSNorm(x)))
  Tensor a = ops_.zeros({n, H});
  ops_.rmsnorm_forward(x, lw.input_layernorm, H, eps, a);
  Tensor attn = attention(i, a, batch, positions, kv);
  ops_.rmsnorm_forward(attn, lw.post_attention_layernorm, H, eps, attn);
  ops_.add(x, attn, x);

  // x2 = x1 + RMSNorm(MLP(RMSNorm(x1)) [+ MoE branch])
  Tensor m = ops_.zeros({n, H});
  ops_.rmsnorm_forward(x, lw.pre_feedforward_layernorm, H, eps, m);
  m = dense_mlp(lw, m);
  if (config_.enable_moe_block) {
    ops_.rmsnorm_forward(m, lw.post_feedforward_layernorm_1, H, eps, m);
    Tensor m2 = moe_block(lw, x);
    ops_.rmsnorm_forward(m2, lw.post_feedforward_layernorm_2, H, eps, m2);
    ops_.add(m, m2, m);
  }
  ops_.rmsnorm_forward(m, lw.post_feedforward_layernorm, H, eps, m);
  ops_.add(x, m, x);

  // x3 = x2 + RMSNorm((gelu(x2·W_gateᵀ) ∘ ple_i)·W_projᵀ)
  if (P > 0) {
    Tensor g = ops_.zeros({n, P});
    ops_.linear_forward(x, lw.per_layer_input_gate, g);
    Tensor ple_i = ops_.zeros({n, P});
    ops_.copy_columns(ple, int64_t(i) * P, ple_i, 0, P);
    ops_.gelu_tanh_mul_forward(g, ple_i, g);
    Tensor proj = ops_.zeros({n, H});
    ops_.linear_forward(g, lw.per_layer_projection, proj);
    ops_.rmsnorm_forward(proj, lw.post_per_layer_input_norm, H, eps, proj);
    ops_.add(x, proj, x);
  }
  // layer_scalar multiplies the whole stream, residual included.
  if (lw.layer_scalar != 1.0) ops_.scale(x, lw.layer_scalar);
}

Tensor Gemma4Model::logits(const Tensor& hidden) {
  Tensor out = ops_.zeros({hidden.dim(0), config_.vocab_size});
  ops_.linear_forward(hidden, w_.lm_head, out);
  if (config_.final_logit_softcapping) ops_.softcap_forward(out, *config_.final_logit_softcapping);
  return out;
}

Tensor shift_labels(const Tensor& labels) {
  const int64_t B = labels.dim(0), S = labels.dim(1);
  Tensor l = labels.dtype() == DType::I32 ? labels : labels.to(DType::I32);
  Tensor out = Tensor::zeros({B * S}, DType::I32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < S; ++t)
      out.data<int32_t>()[b * S + t] = t + 1 < S ? l.data<int32_t>()[b * S + t + 1] : -100;
  return out;
}

Gemma4Model::Loss Gemma4Model::loss(const Tensor& hidden, const Tensor& labels) {
  // Chunked over tokens so the [tokens, V] logits never exist whole.
  Tensor targets = shift_labels(labels);
  const int64_t n = hidden.dim(0), chunk = 256;
  Loss l;
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    int64_t t1 = std::min(n, t0 + chunk);
    Tensor lg = logits(hidden.slice_rows(t0, t1));
    int64_t c = 0;
    l.sum += ops_.cross_entropy_sum(lg, ops_.upload(targets.slice_rows(t0, t1), DType::I32), c);
    l.count += c;
  }
  return l;
}

}  // namespace tl
