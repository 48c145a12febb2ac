#include "train/model/gemma4_model.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "core/weights.h"

namespace tl {

Tensor* weight_slot(Gemma4Weights& w, const std::string& name) {
  static const std::pair<const char*, Tensor Gemma4Weights::*> globals[] = {
      {"embed_tokens.weight", &Gemma4Weights::embed_tokens},
      {"embed_tokens_per_layer.weight", &Gemma4Weights::embed_tokens_per_layer},
      {"per_layer_model_projection.weight", &Gemma4Weights::per_layer_model_projection},
      {"per_layer_projection_norm.weight", &Gemma4Weights::per_layer_projection_norm},
      {"norm.weight", &Gemma4Weights::norm}};
  for (const auto& [n, member] : globals)
    if (name == n) return &(w.*member);
  using L = Gemma4LayerWeights;
  static const std::pair<const char*, Tensor L::*> per_layer[] = {
      {"input_layernorm.weight", &L::input_layernorm},
      {"post_attention_layernorm.weight", &L::post_attention_layernorm},
      {"pre_feedforward_layernorm.weight", &L::pre_feedforward_layernorm},
      {"post_feedforward_layernorm.weight", &L::post_feedforward_layernorm},
      {"self_attn.q_proj.weight", &L::q_proj}, {"self_attn.q_norm.weight", &L::q_norm},
      {"self_attn.k_proj.weight", &L::k_proj}, {"self_attn.v_proj.weight", &L::v_proj},
      {"self_attn.k_norm.weight", &L::k_norm}, {"self_attn.o_proj.weight", &L::o_proj},
      {"mlp.gate_proj.weight", &L::gate_proj}, {"mlp.up_proj.weight", &L::up_proj},
      {"mlp.down_proj.weight", &L::down_proj}, {"router.proj.weight", &L::router_proj},
      {"router.scale", &L::router_scale}, {"router.per_expert_scale", &L::per_expert_scale},
      {"experts.gate_up_proj", &L::experts_gate_up}, {"experts.down_proj", &L::experts_down},
      {"pre_feedforward_layernorm_2.weight", &L::pre_feedforward_layernorm_2},
      {"post_feedforward_layernorm_1.weight", &L::post_feedforward_layernorm_1},
      {"post_feedforward_layernorm_2.weight", &L::post_feedforward_layernorm_2},
      {"per_layer_input_gate.weight", &L::per_layer_input_gate},
      {"per_layer_projection.weight", &L::per_layer_projection},
      {"post_per_layer_input_norm.weight", &L::post_per_layer_input_norm}};
  if (!name.starts_with("layers.")) return nullptr;
  size_t dot = name.find('.', 7);
  if (dot == std::string::npos) return nullptr;
  size_t layer = std::stoul(name.substr(7, dot - 7));
  if (layer >= w.layers.size()) return nullptr;
  std::string rest = name.substr(dot + 1);
  for (const auto& [n, member] : per_layer)
    if (rest == n) return &(w.layers[layer].*member);
  return nullptr;
}

Gemma4Model::Gemma4Model(Gemma4Config config, Ops& ops) : config_(std::move(config)), ops_(ops) {
  // On the backend from the start: a per-call copy of a host table would wait for the stream.
  for (const auto& g : config_.layers()) inv_freq_.push_back(ops_.upload(rope_inv_freq(g), DType::F64));
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

Gemma4LoadOptions Gemma4LoadOptions::nf4(bool double_quant, std::vector<int> full_precision_layers) {
  Gemma4LoadOptions o;
  o.double_quant = double_quant;
  o.quantize = [full = std::move(full_precision_layers)](const WeightSpec& s) {
    if (!s.is_linear && s.component != Component::Experts) return false;
    return std::find(full.begin(), full.end(), s.layer) == full.end();
  };
  return o;
}

namespace {
// The tensors a LoRA heal never updates and only multiplies or looks up, so a backend may
// hold them in its frozen_dtype(): the projections and the two embedding tables. Norm
// weights, scales and MoE expert stacks keep the activation dtype.
bool frozen_table(const WeightSpec& s) {
  return s.shape.size() == 2 && (s.is_linear || s.name == "embed_tokens.weight" ||
                                 s.name == "embed_tokens_per_layer.weight");
}
}  // namespace

void Gemma4Model::load(const Checkpoint& ckpt, const Gemma4LoadOptions& options) {
  check_text_decoder(config_, ckpt, /*allow_bnb_4bit=*/true);  // names the first missing or mis-shaped tensor
  const std::string prefix = decoder_prefix(ckpt);
  const DType act = ops_.act_dtype();
  w_ = {};
  nf4_.clear();
  expert_nf4_.clear();
  w_.layers.resize(size_t(config_.num_hidden_layers));
  // One tensor at a time: read it, then either quantize it on the host (the full-precision
  // copy is dropped at the end of the iteration, never uploaded) or upload it.
  for (const WeightSpec& s : text_decoder_weights(config_)) {
    const std::string full = prefix + s.name;
    Tensor* slot = weight_slot(w_, s.name);
    if (s.component != Component::LayerScalar && !slot) throw std::logic_error("unmapped weight " + s.name);
    if (is_bnb_4bit(ckpt, full)) {  // bitsandbytes' own bytes, used as they are
      set_nf4(s.name, nf4_from_state_dict(full.substr(0, full.size() - 6), ckpt));  // prefix without "weight"
      continue;
    }
    Tensor host = ckpt.get(full);
    if (s.component == Component::LayerScalar) {
      w_.layers[size_t(s.layer)].layer_scalar = host.get(0);
      continue;
    }
    if (!options.quantize || !options.quantize(s)) {
      const bool frozen = frozen_table(s) && !(options.trainable && options.trainable(s));
      *slot = ops_.upload(host, frozen ? ops_.frozen_dtype() : act);
      continue;
    }
    // bitsandbytes quantizes the weight in the dtype it was loaded in (quant_state.dtype);
    // NF4 takes F32 / BF16 / F16, so an F64 checkpoint is quantized from its F32 rounding.
    if (host.dtype() == DType::F64) host = host.to(DType::F32);
    if (s.shape.size() == 2) {
      set_nf4(s.name, nf4_quantize(host, options.double_quant));
    } else if (s.component == Component::Experts && s.shape.size() == 3) {
      // Each expert's [out, in] slice is its own NF4 matrix (as memory_plan counts it).
      std::vector<Nf4Tensor> experts;
      for (int64_t e = 0; e < s.shape[0]; ++e)
        experts.push_back(nf4_quantize(host.slice_rows(e, e + 1).view({s.shape[1], s.shape[2]}), options.double_quant));
      *slot = Tensor::wrap(nullptr, nullptr, s.shape, act, ops_.device());  // shape only
      expert_nf4_[slot] = std::make_shared<const std::vector<Nf4Tensor>>(std::move(experts));
    } else {
      throw Error(fmt::format("NF4: '{}' {} is neither a projection nor an expert tensor", s.name,
                              shape_str(s.shape)));
    }
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
    w_.lm_head = ops_.upload(t, options.trainable && options.trainable(head) ? act : ops_.frozen_dtype());
  }
}

namespace {
Tensor to_i32(const Tensor& t) { return t.dtype() == DType::I32 ? t : t.to(DType::I32); }
}  // namespace

// e = EmbedTable[ids] · √H, with √H rounded to fp32 as HF's buffer holds it (gemma4.md §2.1).
double embed_scale(int64_t width) { return double(float(std::sqrt(double(width)))); }

Tensor Gemma4Model::embed(const Tensor& ids) {
  Tensor x = ops_.empty({ids.numel(), config_.hidden_size});
  ops_.embedding_forward(w_.embed_tokens, ids, embed_scale(config_.hidden_size), x);
  return x;
}

// PLE (gemma4.md §2.2): ple = (RMSNorm_P(e·W_plmpᵀ · H^-½) + EmbedPLE[ids]·√P) · 2^-½, [N, L·P].
// `ctx_scaled` receives e·W_plmpᵀ·H^-½ (the norm's input) for the backward.
Tensor Gemma4Model::per_layer_inputs(ForwardState& st, const Tensor& e, Tensor& ctx_scaled) {
  const Tensor& ids = st.ids;
  // The tables' width, L·P: a parent_view runs fewer layers over its student's wider tables.
  const int64_t n = ids.numel(), P = config_.hidden_size_per_layer_input, LP = w_.per_layer_model_projection.dim(0);
  ctx_scaled = ops_.empty({n, LP});
  // One layer's slice of the base product at a time: each is [N, H]·[H, P] whatever the
  // depth, so a layer's numbers do not depend on how many layers surgery added. One [N, L·P]
  // product blocks its columns by L (a GEMM picks its kernels by shape), which changed the
  // last bits of the original layers beside inserted identity layers on some CPUs.
  linear(st, e, w_.per_layer_model_projection, ctx_scaled, /*column_block=*/P);
  ops_.scale(ctx_scaled, 1.0 / std::sqrt(double(config_.hidden_size)));
  Tensor ple = ops_.empty({n, LP});
  ops_.rmsnorm_forward(ctx_scaled, w_.per_layer_projection_norm, P, config_.rms_norm_eps, ple);
  Tensor tok = ops_.empty({n, LP});
  ops_.embedding_forward(w_.embed_tokens_per_layer, ids, embed_scale(P), tok);
  ops_.add(ple, tok, ple);
  ops_.scale(ple, 1.0 / std::sqrt(2.0));
  return ple;
}

void Gemma4Model::upload_batch(const Batch& batch, ForwardState& st) {
  if (batch.ids.rank() != 2) throw Error("batch ids must be [B, S]");
  const int64_t B = batch.ids.dim(0), S = batch.ids.dim(1), n = B * S;
  Tensor positions_host;
  if (batch.positions.defined()) {
    positions_host = to_i32(batch.positions);
  } else {
    positions_host = Tensor::zeros({B, S}, DType::I32);
    for (int64_t i = 0; i < n; ++i) positions_host.data<int32_t>()[i] = int32_t(i % S);
  }
  st.positions = ops_.upload(positions_host.view({n}), DType::I32);
  st.ids = ops_.upload(to_i32(batch.ids).view({n}), DType::I32);
  if (batch.doc_ids.defined()) {
    st.doc_ids_host = to_i32(batch.doc_ids);
    st.doc_ids = ops_.upload(st.doc_ids_host, DType::I32);
  }
}

void Gemma4Model::forward(const Batch& batch, ForwardState& st, bool keep_tapes,
                          std::vector<Tensor>* layer_outputs) {
  if (batch.ids.rank() != 2) throw Error("batch ids must be [B, S]");
  const int64_t B = batch.ids.dim(0), S = batch.ids.dim(1), n = B * S;
  st.B = B;
  st.S = S;
  st.keep = keep_tapes;
  if (!st.ids.defined()) upload_batch(batch, st);  // else uploaded by the caller (a student, for its teacher)
  st.x0 = embed(st.ids);
  st.lora_saved.clear();
  if (config_.has_ple()) st.ple = per_layer_inputs(st, st.x0, st.ple_ctx);

  Tensor x = ops_.zeros({n, config_.hidden_size});
  ops_.add(st.x0, x, x);  // the stream starts as a copy of the embedding
  if (layer_outputs) layer_outputs->push_back(ops_.download(x));
  st.kv.assign(size_t(config_.num_hidden_layers), {});
  st.tapes.assign(keep_tapes ? size_t(config_.num_hidden_layers) : 1, {});
  for (int i = 0; i < config_.num_hidden_layers; ++i) {
    LayerTape& tape = st.tapes[keep_tapes ? size_t(i) : 0];
    tape = {};
    layer_forward(i, x, st, tape);
    // Gradient checkpointing: keep only the layer's input; the backward recomputes the rest,
    // K/V included, except the K/V that later KV-shared layers read. Without a backward
    // nothing but those shared K/V outlives the layer.
    if (!keep_tapes || checkpointed(i)) {
      if (!kv_read_later(i)) st.kv[size_t(i)] = {};
      if (keep_tapes) {
        LayerTape kept;
        kept.x_in = tape.x_in;
        tape = std::move(kept);
      }
    }
    if (layer_outputs) layer_outputs->push_back(ops_.download(x));
  }
  st.final_in = x;
  st.hidden = ops_.empty({n, config_.hidden_size});
  ops_.rmsnorm_forward(x, w_.norm, config_.hidden_size, config_.rms_norm_eps, st.hidden);
}

void Gemma4Model::set_checkpointed_layers(std::vector<bool> checkpointed) {
  if (checkpointed.size() != size_t(config_.num_hidden_layers))
    throw Error(fmt::format("checkpointed layers: {} flags for {} layers", checkpointed.size(), config_.num_hidden_layers));
  checkpointed_ = std::move(checkpointed);
}

Tensor Gemma4Model::forward_hidden(const Batch& batch, std::vector<Tensor>* layer_outputs) {
  ForwardState st;
  forward(batch, st, false, layer_outputs);
  return st.hidden;
}

bool Gemma4Model::kv_read_later(int i) const {
  for (int j = i + 1; j < config_.num_hidden_layers; ++j)
    if (config_.layer(j).kv_source == i) return true;
  return false;
}

AttentionMask Gemma4Model::mask_for(int i, const ForwardState& st) const {
  AttentionMask m;
  m.window = config_.layer(i).type == LayerType::Sliding ? config_.sliding_window : 0;
  m.doc_ids = st.doc_ids.defined() ? &st.doc_ids : nullptr;
  m.doc_ids_host = st.doc_ids_host.defined() ? &st.doc_ids_host : nullptr;
  return m;
}

Tensor Gemma4Model::attention(int i, ForwardState& st, LayerTape& t) {
  const LayerGeometry& g = config_.layer(i);
  const Gemma4LayerWeights& lw = w_.layers[size_t(i)];
  const int64_t n = t.a.dim(0), B = st.B, S = st.S;
  const int64_t nh = config_.num_attention_heads, d = g.head_dim, nkv = g.num_kv_heads;
  const double eps = config_.rms_norm_eps;

  MatmulInputHold hold_a(ops_, t.a);  // the input of q, k and v (and of their adapters)
  // q = RoPE(RMSNorm_d(a·W_qᵀ; q_norm)), per head.
  t.q_raw = ops_.empty({n, nh * d});
  linear(st, t.a, lw.q_proj, t.q_raw);
  t.q = ops_.empty({n, nh * d});
  ops_.rmsnorm_forward(t.q_raw, lw.q_norm, d, eps, t.q);
  ops_.rope_forward(t.q, nh, st.positions, inv_freq_[size_t(i)]);

  if (g.kv_source < 0) {
    // k = RoPE(RMSNorm_d(a·W_kᵀ; k_norm)); v = RMSNorm_d(a·W_vᵀ) without weight; K=V full
    // layers take v from the same raw k projection.
    t.k_raw = ops_.empty({n, nkv * d});
    linear(st, t.a, lw.k_proj, t.k_raw);
    t.v_raw = t.k_raw;
    if (!g.k_eq_v) {
      t.v_raw = ops_.empty({n, nkv * d});
      linear(st, t.a, lw.v_proj, t.v_raw);
    }
    t.k = ops_.empty({n, nkv * d});
    ops_.rmsnorm_forward(t.k_raw, lw.k_norm, d, eps, t.k);
    ops_.rope_forward(t.k, nkv, st.positions, inv_freq_[size_t(i)]);
    t.v = ops_.empty({n, nkv * d});
    ops_.rmsnorm_forward(t.v_raw, Tensor(), d, eps, t.v);
    st.kv[size_t(i)] = {t.k, t.v};
  }
  t.attn = st.cache ? ops_.zeros({n, nh * d}) : ops_.empty({n, nh * d});
  if (st.cache) {
    cached_attention(i, st, t);
  } else {
    const auto& [k, v] = st.kv[size_t(g.kv_source < 0 ? i : g.kv_source)];
    AttentionMask mask = mask_for(i, st);
    if (st.keep) {  // the backward's probabilities come from these
      t.lse = ops_.empty({B, nh, S}, score_dtype());
      mask.lse = &t.lse;
    }
    ops_.attention_forward(t.q.view({B, S, nh, d}), k.view({B, S, k.dim(1) / d, d}),
                           v.view({B, S, v.dim(1) / d, d}), mask, t.attn);
  }
  t.o = ops_.empty({n, config_.hidden_size});
  linear(st, t.attn, lw.o_proj, t.o);
  return t.o;
}
// GeGLU: (gelu_tanh(y·W_gateᵀ) ∘ y·W_upᵀ)·W_downᵀ with y = t.m_in.
Tensor Gemma4Model::dense_mlp(const Gemma4LayerWeights& lw, ForwardState& st, LayerTape& t) {
  const int64_t n = t.m_in.dim(0), I = lw.gate_proj.dim(0);
  t.gate = ops_.empty({n, I});
  t.up = ops_.empty({n, I});
  {
    MatmulInputHold hold_m_in(ops_, t.m_in);
    linear(st, t.m_in, lw.gate_proj, t.gate);
    linear(st, t.m_in, lw.up_proj, t.up);
  }
  t.h = ops_.empty({n, I});
  ops_.gelu_tanh_mul_forward(t.gate, t.up, t.h);
  t.mlp = ops_.empty({n, config_.hidden_size});
  linear(st, t.h, lw.down_proj, t.mlp);
  return t.mlp;
}

// MoE branch (gemma4.md §3.4): the router and the expert pre-norm both read x1.
Tensor Gemma4Model::moe_block(const Gemma4LayerWeights& lw, ForwardState& st, LayerTape& t) {
  const int64_t n = t.x1.dim(0), H = config_.hidden_size, E = config_.num_experts,
                K = config_.top_k_experts, I = config_.moe_intermediate_size;
  const double eps = config_.rms_norm_eps;
  // r = RMSNorm_noscale(x1) ∘ router.scale · H^-½ (a norm with router.scale as its weight);
  // logits = r·W_routerᵀ
  t.router_in = ops_.zeros({n, H});
  ops_.rmsnorm_forward(t.x1, lw.router_scale, H, eps, t.router_in);
  ops_.scale(t.router_in, 1.0 / std::sqrt(double(H)));
  t.router_logits = ops_.zeros({n, E});
  linear(st, t.router_in, lw.router_proj, t.router_logits);
  t.route_w = ops_.zeros({n, K});
  t.route_idx = ops_.zeros({n, K}, DType::I32);
  ops_.moe_route_forward(t.router_logits, lw.per_expert_scale, K, t.route_w, t.route_idx);

  t.y2 = ops_.zeros({n, H});
  ops_.rmsnorm_forward(t.x1, lw.pre_feedforward_layernorm_2, H, eps, t.y2);
  t.m2 = ops_.zeros({n, H});
  if (!expert_grads_ && !moe_observer) {  // routed on the backend: nothing crosses the bus
    ops_.moe_experts_forward(t.y2, t.route_idx, t.route_w, moe_experts(lw), t.m2, t.moe);
    return t.m2;
  }
  Tensor idx_host = ops_.download(t.route_idx), w_host = ops_.download(t.route_w);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int32_t> slots;
    for (int64_t j = 0; j < n * K; ++j)
      if (idx_host.data<int32_t>()[j] == e) slots.push_back(int32_t(j));
    if (slots.empty()) continue;
    const int64_t m = int64_t(slots.size());
    ExpertTape x;
    x.expert = e;
    Tensor rows_host = Tensor::zeros({m}, DType::I32), scale_host = Tensor::zeros({m}, DType::F64);
    x.slots = Tensor::zeros({m}, DType::I32);
    for (int64_t j = 0; j < m; ++j) {
      x.slots.data<int32_t>()[j] = slots[size_t(j)];
      rows_host.data<int32_t>()[j] = int32_t(slots[size_t(j)] / K);
      scale_host.data<double>()[j] = w_host.get(slots[size_t(j)]);
    }
    x.rows = ops_.upload(rows_host, DType::I32);
    x.scales = ops_.upload(scale_host, ops_.act_dtype());
    x.ye = ops_.zeros({m, H});
    ops_.gather_rows(t.y2, x.rows, x.ye);
    Tensor gu = ops_.zeros({m, 2 * I});
    expert_linear(x.ye, lw.experts_gate_up, e, gu);
    x.gate = ops_.zeros({m, I});
    x.up = ops_.zeros({m, I});
    ops_.copy_columns(gu, 0, x.gate, 0, I);  // rows [0, I) of gate_up_proj are the gate
    ops_.copy_columns(gu, I, x.up, 0, I);
    x.h = ops_.zeros({m, I});
    ops_.gelu_tanh_mul_forward(x.gate, x.up, x.h);
    x.out = ops_.zeros({m, H});
    expert_linear(x.h, lw.experts_down, e, x.out);
    ops_.scatter_add_rows(x.out, x.rows, x.scales, t.m2);
    if (moe_observer) moe_observer(t.layer, e, x.rows, x.scales, x.out);
    t.experts.push_back(std::move(x));
  }
  return t.m2;
}

MoeExperts Gemma4Model::moe_experts(const Gemma4LayerWeights& lw) const {
  MoeExperts x;
  x.gate_up = &lw.experts_gate_up;
  x.down = &lw.experts_down;
  if (auto q = expert_nf4_.find(&lw.experts_gate_up); q != expert_nf4_.end()) x.gate_up_nf4 = q->second.get();
  if (auto q = expert_nf4_.find(&lw.experts_down); q != expert_nf4_.end()) x.down_nf4 = q->second.get();
  x.num_experts = config_.num_experts;
  x.intermediate = config_.moe_intermediate_size;
  return x;
}

void Gemma4Model::expert_linear(const Tensor& x, const Tensor& w, int64_t e, Tensor& y) {
  if (auto q = expert_nf4_.find(&w); q != expert_nf4_.end()) {
    ops_.linear_nf4_forward(x, (*q->second)[size_t(e)], y);
    return;
  }
  ops_.linear_forward(x, w.slice_rows(e, e + 1).view({w.dim(1), w.dim(2)}), y);
}

void Gemma4Model::layer_forward(int i, Tensor& x, ForwardState& st, LayerTape& t) {
  const Gemma4LayerWeights& lw = w_.layers[size_t(i)];
  const int64_t n = x.dim(0), H = config_.hidden_size, P = config_.hidden_size_per_layer_input;
  const double eps = config_.rms_norm_eps;
  t.x_in = x;
  t.layer = i;

  // x1 = x + RMSNorm(Attn(RMSNorm(x)))
  t.a = ops_.empty({n, H});
  ops_.rmsnorm_forward(x, lw.input_layernorm, H, eps, t.a);
  Tensor o = attention(i, st, t);
  t.x1 = ops_.empty({n, H});
  ops_.rmsnorm_forward(o, lw.post_attention_layernorm, H, eps, t.x1);
  ops_.add(x, t.x1, t.x1);

  // x2 = x1 + RMSNorm(MLP(RMSNorm(x1)) [+ MoE branch])
  t.m_in = ops_.empty({n, H});
  ops_.rmsnorm_forward(t.x1, lw.pre_feedforward_layernorm, H, eps, t.m_in);
  dense_mlp(lw, st, t);
  if (config_.enable_moe_block) {
    t.m_sum = ops_.zeros({n, H});
    ops_.rmsnorm_forward(t.mlp, lw.post_feedforward_layernorm_1, H, eps, t.m_sum);
    moe_block(lw, st, t);
    Tensor m2n = ops_.zeros({n, H});
    ops_.rmsnorm_forward(t.m2, lw.post_feedforward_layernorm_2, H, eps, m2n);
    ops_.add(t.m_sum, m2n, t.m_sum);
  } else {
    t.m_sum = t.mlp;
  }
  t.x2 = ops_.empty({n, H});
  ops_.rmsnorm_forward(t.m_sum, lw.post_feedforward_layernorm, H, eps, t.x2);
  ops_.add(t.x1, t.x2, t.x2);

  // x3 = x2 + RMSNorm((gelu(x2·W_gateᵀ) ∘ ple_i)·W_projᵀ)
  Tensor out = P > 0 ? ops_.empty({n, H}) : ops_.zeros({n, H});
  if (P > 0) {
    t.g = ops_.empty({n, P});
    linear(st, t.x2, lw.per_layer_input_gate, t.g);
    t.ple_i = ops_.empty({n, P});
    ops_.copy_columns(st.ple, int64_t(ple_block_.empty() ? i : ple_block_[size_t(i)]) * P, t.ple_i, 0, P);
    t.gh = ops_.empty({n, P});
    ops_.gelu_tanh_mul_forward(t.g, t.ple_i, t.gh);
    t.proj = ops_.empty({n, H});
    linear(st, t.gh, lw.per_layer_projection, t.proj);
    ops_.rmsnorm_forward(t.proj, lw.post_per_layer_input_norm, H, eps, out);
  }
  ops_.add(t.x2, out, out);
  // layer_scalar multiplies the whole stream, residual included.
  if (lw.layer_scalar != 1.0) ops_.scale(out, lw.layer_scalar);
  x = out;
}

Tensor Gemma4Model::logits(const Tensor& hidden) {
  Tensor out = ops_.empty({hidden.dim(0), config_.vocab_size});
  logits_into(hidden, out);
  return out;
}

void Gemma4Model::logits_into(const Tensor& hidden, Tensor& out) {
  ops_.linear_forward(hidden, w_.lm_head, out);
  if (config_.final_logit_softcapping) ops_.softcap_forward(out, *config_.final_logit_softcapping);
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
