// The Gemma 4 text decoder, written once against Ops (gemma4.md §2–§5). Weights live on
// the backend in its activation dtype.
#pragma once
#include <optional>
#include <span>
#include <vector>

#include "core/config.h"
#include "core/ops.h"
#include "core/weights.h"
#include "core/nf4.h"
#include "core/safetensors.h"
#include "train/model/lora.h"

#include <functional>
#include <memory>
#include <unordered_map>

namespace tl {

struct Gemma4LayerWeights {
  Tensor input_layernorm, post_attention_layernorm, pre_feedforward_layernorm,
      post_feedforward_layernorm;
  Tensor q_proj, q_norm, k_proj, v_proj, k_norm, o_proj;  // k/v undefined on KV-shared layers
  Tensor gate_proj, up_proj, down_proj;
  // MoE (enable_moe_block)
  Tensor router_proj, router_scale, per_expert_scale, experts_gate_up, experts_down;
  Tensor pre_feedforward_layernorm_2, post_feedforward_layernorm_1, post_feedforward_layernorm_2;
  // Per-layer embeddings (hidden_size_per_layer_input > 0)
  Tensor per_layer_input_gate, per_layer_projection, post_per_layer_input_norm;
  double layer_scalar = 1.0;  // a buffer in HF: multiplies the whole layer output
};

struct Gemma4Weights {
  Tensor embed_tokens, lm_head;  // lm_head is embed_tokens when tied
  Tensor embed_tokens_per_layer, per_layer_model_projection, per_layer_projection_norm;
  Tensor norm;
  std::vector<Gemma4LayerWeights> layers;
};

// The tensor of `w` that HF calls `name` (without the "model." prefix, e.g.
// "layers.3.self_attn.q_proj.weight"); nullptr for names the decoder does not have.
// layer_scalar is a plain double, not a tensor, and has no slot.
Tensor* weight_slot(Gemma4Weights& w, const std::string& name);

// A batch of token sequences: ids I32 [B, S] on the host; optional positions (I32 [B, S],
// default 0..S-1 per row) and document ids (I32 [B, S]; packed sequences never attend
// across documents).
struct Batch {
  Tensor ids;
  Tensor positions;
  Tensor doc_ids;
};

// What one layer's forward keeps for its backward (gemma4.md §3–§4 names).
struct ExpertTape {
  int64_t expert = 0;
  Tensor rows;      // I32 [m] token rows routed to this expert (device)
  Tensor slots;     // host I32 [m]: index t·K + k into the router outputs
  Tensor scales;    // [m] routing weight of each row
  Tensor ye, gate, up, h, out;  // input rows, gate/up pre-activation, gelu(gate)∘up, expert output
};

struct LayerTape {
  int layer = 0;
  Tensor x_in, a;                      // layer input; input_layernorm output
  Tensor q_raw, q;                     // q projection; after q_norm and RoPE
  Tensor k_raw, v_raw, k, v;           // own K/V only (KV-shared layers read the source's)
  Tensor attn, o;                      // attention output [n, nh·d]; o_proj output
  Tensor lse;                          // attention rows' log-sum-exp [B, nh, S] (backward's P)
  Tensor x1, m_in, gate, up, h, mlp;   // post-attention stream; dense MLP internals; its output
  // MoE
  Tensor router_in, router_logits, route_w, route_idx, y2, m2;
  std::vector<ExpertTape> experts;     // the per-expert path (expert gradients, pruning's observer)
  MoeTape moe;                         // the routed path (Ops::moe_experts_forward)
  Tensor m_sum, x2;                    // input of post_feedforward_layernorm; stream after the MLP
  // PLE
  Tensor ple_i, g, gh, proj;           // per-layer input slice; gate pre-activation; gelu(g)∘ple_i; projection
};

// Gradients of every trainable tensor, shaped like Gemma4Weights (undefined = not wanted).
struct Gemma4Grads {
  Gemma4Weights w;  // same field names; layer_scalar unused
};

// Keys and values kept between decoding steps (one sequence). A layer with its own K/V keeps
// them on the host in the activation dtype: a full-attention layer keeps every position, a
// sliding layer a ring of `window` slots (slot = position mod window), since a query at p sees
// only positions p − window + 1 … p. KV-shared layers keep nothing: they read their source
// layer's keys, as in the full forward.
struct KvCache {
  struct Layer {
    Tensor k, v;               // host [capacity, nkv·d]
    std::vector<int32_t> pos;  // position held by each slot, −1 when empty
    int64_t ring = 0;          // > 0: a ring of this many slots (sliding); 0: grows
  };
  std::vector<Layer> layers;
  int64_t length = 0;  // positions consumed so far (the next token's position)
};

// What Gemma4Model::load holds in NF4 (QLoRA's frozen base).
struct Gemma4LoadOptions {
  // Tensors for which this is true are quantized on the host as they are read (nf4_quantize
  // of the checkpoint's values, as bitsandbytes quantizes the loaded weight) and never
  // uploaded in full precision: 2-D projections as one Nf4Tensor, 3-D expert tensors
  // [E, out, in] as one Nf4Tensor per expert slice. Null: nothing is quantized.
  std::function<bool(const WeightSpec&)> quantize;
  bool double_quant = true;
  // Tensors for which this is true are trained (adapter: full, full_train_layers) and keep
  // the activation dtype; the frozen projections and embedding tables are held in the
  // backend's frozen_dtype() (bf16 with CpuMatmul::Bf16). Null: nothing is trained.
  std::function<bool(const WeightSpec&)> trainable;

  // QLoRA's choice: every projection and every MoE expert in NF4, except in the layers listed
  // (trained in full precision, `full_train_layers`).
  static Gemma4LoadOptions nf4(bool double_quant, std::vector<int> full_precision_layers = {});
};

class Gemma4Model {
 public:
  Gemma4Model(Gemma4Config config, Ops& ops);

  // Loads the decoder from a checkpoint, found under "model.language_model." or "model.",
  // one tensor at a time: peak host memory is the final host footprint plus one tensor, peak
  // device memory the final footprint. Projections a bitsandbytes checkpoint stores
  // pre-quantized (U8 + quant_state) are installed in NF4 with their bytes as they are,
  // whatever `options` says. Throws tl::Error naming a missing or mis-shaped tensor.
  void load(const Checkpoint& ckpt, const Gemma4LoadOptions& options = {});

  const Gemma4Config& config() const { return config_; }
  const Gemma4Weights& weights() const { return w_; }
  Gemma4Weights& mutable_weights() { return w_; }

  // Final-normed hidden states [B·S, H]. If `layer_outputs` is given it receives the
  // residual stream before layer 0 and after each layer (HF's hidden_states order,
  // without the final norm).
  Tensor forward_hidden(const Batch& batch, std::vector<Tensor>* layer_outputs = nullptr);
  // An empty cache for this model.
  KvCache make_cache() const;
  // Final-normed hidden states [S, H] of `ids` (host I32, S tokens) that continue the
  // sequence in `cache` (positions cache.length …), appending their keys and values. The
  // same values as forward_hidden over the whole sequence, for the new rows.
  Tensor forward_cached(std::span<const int32_t> ids, KvCache& cache);
  // Soft-capped logits [B·S, V] from final hidden states.
  Tensor logits(const Tensor& hidden);
  // The same into `out` ([rows of hidden, V], overwritten).
  void logits_into(const Tensor& hidden, Tensor& out);
  // HF causal-LM loss: position t predicts labels[t+1] of its row; −100 is ignored; the
  // mean over counted targets. labels: host I64 or I32 [B, S].
  struct Loss {
    double sum = 0;       // Σ cross-entropy
    int64_t count = 0;
    int64_t correct = 0;  // targets the argmax predicts (forward_backward only)
    double kl_sum = 0;    // Σ KL(p_teacher,T ‖ p_model,T) when distilling (forward_backward only)
    double mean() const { return count ? sum / double(count) : 0.0; }
  };
  Loss loss(const Tensor& hidden, const Tensor& labels);

  // Zero gradients for every weight (the full-parameter case, `adapter: full`).
  Gemma4Grads zero_grads();
  // No base-weight gradients at all (LoRA only; adapters keep their own).
  Gemma4Grads no_grads() const {
    Gemma4Grads g;
    g.w.layers.resize(w_.layers.size());
    return g;
  }
  // One forward and backward pass: adds d(loss_sum · grad_scale)/dθ into `grads` and
  // returns the summed loss and target count. grad_scale is 1/N for a token mean over N
  // targets (N may span several micro-batches, as HF's num_items_in_batch). With a teacher
  // set (set_distillation) the loss is (1 − α)·Σ CE + α·T²·Σ KL over the same targets,
  // normalised by the same N, and the returned Loss carries both sums.
  Loss forward_backward(const Batch& batch, const Tensor& labels, double grad_scale, Gemma4Grads& grads);
  // The same for the optimizer step, with nothing read back: the loss sum, the argmax hits and,
  // when distilling, the KL sum are added into stats[0], stats[1] and stats[2] (an F64 tensor
  // of at least 3 on the backend, read by the caller once per optimizer step). The labels are checked and counted on the host before their
  // one upload; returns the target count.
  int64_t forward_backward(const Batch& batch, const Tensor& labels, double grad_scale, Gemma4Grads& grads,
                           Tensor& stats);

  // ---- distillation (gemma4_teacher.cpp, issue 24) ----------------------------------------
  // The parent of a surgery, run over this model's frozen weights: a forward-only model with
  // the parent's config whose layer j is this model's layer order[j] (the copy surgery made
  // of parent layer j), sharing every tensor and NF4 base with this model (nothing copied)
  // and without LoRA, dropout or gradients. Its per-layer inputs are this model's, block
  // order[j] for layer j. Throws tl::Error naming the first parent layer whose copy does not
  // fit (geometry, K/V weights) or a global size that differs. For forward use only (no load,
  // attach_lora or backward on it); the base weights it shares must stay frozen.
  std::unique_ptr<Gemma4Model> parent_view(const Gemma4Config& parent, std::span<const int> order) const;
  struct Distillation {
    Gemma4Model* teacher = nullptr;  // null: cross-entropy only
    double alpha = 0.5;              // weight of the KL term: (1 − α)·CE + α·T²·KL
    double temperature = 1.0;
    int64_t top_k = 0;               // 0: the whole vocabulary (Ops::distill_kl_sum)
  };
  // Sets (or with a null teacher, clears) the teacher forward_backward distils from. The
  // teacher runs tape-less on each batch before the student; its logits are made chunk by
  // chunk beside the student's cross-entropy and never held as [tokens × vocab].
  void set_distillation(const Distillation& d);
  const Distillation& distillation() const { return distill_; }
  // Σ over the targets of `labels` of KL(p_teacher,T ‖ p_model,T) and the argmax agreements,
  // from final hidden states of this model and of `teacher` for the same batch (chunked).
  Ops::DistillSums distill_sums(const Tensor& hidden, Gemma4Model& teacher, const Tensor& teacher_hidden,
                                const Tensor& labels, double temperature = 1.0, int64_t top_k = 0);

  // Attaches a LoRA adapter to the projection HF calls `name` (e.g.
  // "layers.3.self_attn.q_proj.weight"); A, B are host tensors, uploaded in the backend's
  // master dtype (F32 beside BF16 activations, else the activation dtype). Its gradients (dA, dB) are zeroed and accumulated by forward_backward.
  LoraAdapter& attach_lora(const std::string& name, const Tensor& A, const Tensor& B, double scaling,
                           double dropout = 0.0, uint64_t dropout_seed = 0);
  std::vector<LoraAdapter*> adapters();  // in the order they were attached
  // QLoRA: holds the projection HF calls `name` in NF4 (quantized from its values rounded
  // to `stored`, the checkpoint's dtype, as bitsandbytes quantizes the loaded weight) and
  // frees the dense copy; the shape stays. Forward and backward dequantize it by tiles.
  void quantize_nf4(const std::string& name, DType stored, bool double_quant);
  const Nf4Tensor* nf4(const std::string& name);
  // Expert e of a 3-D expert tensor held in NF4 ("layers.3.experts.gate_up_proj"); nullptr
  // when that tensor is dense.
  const Nf4Tensor* expert_nf4(const std::string& name, int64_t e);
  // Installs a base already quantized elsewhere (on the device while streaming, or read from
  // a bitsandbytes checkpoint); the dense slot keeps only the shape.
  void set_nf4(const std::string& name, Nf4Tensor q);
  // Per-layer gradient checkpointing: the forward keeps only each layer's input and the
  // backward recomputes the layer before differentiating it.
  void set_gradient_checkpointing(bool on) {
    checkpointed_.assign(static_cast<size_t>(config_.num_hidden_layers), on);
  }
  // The same per layer (`gradient_checkpointing: auto` recomputes only some): layer i keeps
  // only its input when checkpointed[i], else its whole tape.
  void set_checkpointed_layers(std::vector<bool> checkpointed);
  bool checkpointed(int layer) const { return !checkpointed_.empty() && checkpointed_[size_t(layer)]; }
  // Called in every MoE layer's forward for each expert that received tokens: the layer, the
  // expert, the token rows (I32 [m]), their routing weights ([m]) and the expert's outputs
  // ([m, H]) before weighting. Used by expert pruning to score experts.
  std::function<void(int layer, int64_t expert, const Tensor& rows, const Tensor& weights, const Tensor& out)>
      moe_observer;
  // Called by forward_backward when layer i's parameter gradients are final (after its
  // backward; later layers never write them): data parallelism starts reducing them then.
  std::function<void(int layer)> layer_grads_done;
  // Training mode turns LoRA dropout on; `step` selects the dropout masks of this pass.
  void set_training(bool on, uint64_t step = 0) {
    training_ = on;
    step_ = step;
  }

 private:
  // The state of one forward pass that the backward needs beyond the layer tapes.
  struct ForwardState {
    int64_t B = 0, S = 0;
    Tensor ids, positions, doc_ids, x0, ple_ctx, ple;
    Tensor doc_ids_host;  // the batch's document ids on the host (attention's key bounds)
    std::vector<LayerTape> tapes;
    std::vector<std::pair<Tensor, Tensor>> kv;
    Tensor final_in, hidden;
    bool keep = false;  // keeping what the backward needs
    // Per adapted projection: the (dropped-out) input and x·Aᵀ, for the LoRA backward.
    std::unordered_map<const Tensor*, std::pair<Tensor, Tensor>> lora_saved;
    KvCache* cache = nullptr;            // decoding: attend over cached keys too
    std::vector<Tensor> kv_pos;          // with a cache: host I32 positions of st.kv's keys
  };
  // Attention of the new rows over cache + new keys (forward_cached's path).
  void cached_attention(int i, ForwardState& st, LayerTape& t);
  Tensor dropout_mask(const LoraAdapter& a, const Shape& shape);
  // y = x·Wᵀ (+ the LoRA path when W has an adapter). With column_block > 0 a dense base's
  // product is taken column_block outputs at a time (the same shape whatever W's height).
  void linear(ForwardState& st, const Tensor& x, const Tensor& w, Tensor& y, int64_t column_block = 0);
  // dx += dy·W, dW += dyᵀ·x (when wanted), plus the adapter's dA, dB and its part of dx.
  void linear_backward(ForwardState& st, const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw);
  void forward(const Batch& batch, ForwardState& st, bool keep_tapes, std::vector<Tensor>* layer_outputs);
  // The batch's ids, positions and document ids on the backend, into st.
  void upload_batch(const Batch& batch, ForwardState& st);
  // A teacher's final hidden states for the batch its student has uploaded into `student`
  // (the same device tensors: the batch crosses once).
  Tensor teacher_hidden(const Batch& batch, const ForwardState& student);
  Tensor embed(const Tensor& ids);
  Tensor per_layer_inputs(ForwardState& st, const Tensor& embedded, Tensor& ctx_scaled);
  void layer_forward(int i, Tensor& x, ForwardState& st, LayerTape& tape);
  Tensor attention(int i, ForwardState& st, LayerTape& tape);
  Tensor dense_mlp(const Gemma4LayerWeights& lw, ForwardState& st, LayerTape& tape);
  Tensor moe_block(const Gemma4LayerWeights& lw, ForwardState& st, LayerTape& tape);
  AttentionMask mask_for(int i, const ForwardState& st) const;
  // The dtype of attention's log-sum-exp: F32, or F64 with F64 activations.
  DType score_dtype() const { return ops_.act_dtype() == DType::F64 ? DType::F64 : DType::F32; }
  // Whether a later KV-shared layer reads layer i's K/V.
  bool kv_read_later(int i) const;
  Tensor rope_inv_freq(const LayerGeometry& g) const;

  // backward (gemma4_backward.cpp)
  void layer_backward(int i, Tensor& dx, ForwardState& st, Gemma4LayerWeights& g,
                      std::vector<std::pair<Tensor, Tensor>>& dkv, Tensor& dple);
  void attention_backward(int i, const Tensor& dattn_out, ForwardState& st, Gemma4LayerWeights& g,
                          std::vector<std::pair<Tensor, Tensor>>& dkv, Tensor& da);
  void moe_backward(const Gemma4LayerWeights& lw, ForwardState& st, LayerTape& tape, const Tensor& dm2,
                    Gemma4LayerWeights& g, Tensor& dx1);
  Tensor moe_backward_per_expert(const Gemma4LayerWeights& lw, LayerTape& tape, const Tensor& dm2,
                                 Gemma4LayerWeights& g, Tensor& dy2);

  Gemma4Config config_;
  Ops& ops_;
  Gemma4Weights w_;
  std::vector<Tensor> inv_freq_;  // per layer, F64 on the backend (uploaded once)
  std::unordered_map<const Tensor*, LoraAdapter> lora_;  // keyed by the base weight's slot
  // Frozen NF4 bases, same keys; shared, so that a parent_view runs on the same bytes.
  std::unordered_map<const Tensor*, std::shared_ptr<const Nf4Tensor>> nf4_;
  // Frozen NF4 experts: per 3-D expert slot, one Nf4Tensor per expert's [out, in] slice.
  std::unordered_map<const Tensor*, std::shared_ptr<const std::vector<Nf4Tensor>>> expert_nf4_;
  // y = x·W_eᵀ for expert e of `w` ([E, out, in]), dense or NF4.
  void expert_linear(const Tensor& x, const Tensor& w, int64_t e, Tensor& y);
  // dx += dy·W_e; dW_e += dyᵀ·x when `dw` (the whole [E, out, in] gradient) is defined.
  void expert_linear_backward(const Tensor& x, const Tensor& w, int64_t e, const Tensor& dy, Tensor& dx,
                              Tensor& dw);
  std::vector<const Tensor*> lora_order_;
  Distillation distill_;
  // The teacher's logits for one chunk (into teacher_logits), then the KL term's gradient
  // added to dlogits (weighted α·grad_scale); the chunk's Σ KL added to kl_sum[0] (device F64).
  void distill_chunk(const Tensor& student_logits, const Tensor& teacher_hidden, Tensor& teacher_logits,
                     const Tensor& targets, double grad_scale, double cap, Tensor& dlogits, Tensor& kl_sum);
  // A parent_view's layer i reads column block ple_block_[i] of the per-layer inputs (its
  // student's layer that holds the copy); empty: block i.
  std::vector<int> ple_block_;
  bool training_ = false;
  std::vector<bool> checkpointed_;  // per layer; empty: none
  // The MoE experts take the per-expert path, which reads the routing back, only where it is
  // needed: gradients of the experts themselves (full training) or pruning's observer.
  bool expert_grads_ = false;
  MoeExperts moe_experts(const Gemma4LayerWeights& lw) const;
  uint64_t step_ = 0;
};

// Shifted targets as HF builds them: target[b, t] = labels[b, t+1], −100 at the last
// position. Returns host I32 [B·S].
Tensor shift_labels(const Tensor& labels);

}  // namespace tl
