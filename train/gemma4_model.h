// The Gemma 4 text decoder, written once against Ops (gemma4.md §2–§5). Weights live on
// the backend in its activation dtype.
#pragma once
#include <optional>
#include <vector>

#include "core/config.h"
#include "core/ops.h"
#include "core/safetensors.h"

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

// A batch of token sequences: ids I32 [B, S] on the host; optional positions (I32 [B, S],
// default 0..S-1 per row) and document ids (I32 [B, S]; packed sequences never attend
// across documents).
struct Batch {
  Tensor ids;
  Tensor positions;
  Tensor doc_ids;
};

class Gemma4Model {
 public:
  Gemma4Model(Gemma4Config config, Ops& ops);

  // Loads the decoder from a checkpoint, found under "model.language_model." or "model.";
  // throws tl::Error naming a missing or mis-shaped tensor.
  void load(const Checkpoint& ckpt);

  const Gemma4Config& config() const { return config_; }
  const Gemma4Weights& weights() const { return w_; }

  // Final-normed hidden states [B·S, H]. If `layer_outputs` is given it receives the
  // residual stream before layer 0 and after each layer (HF's hidden_states order,
  // without the final norm).
  Tensor forward_hidden(const Batch& batch, std::vector<Tensor>* layer_outputs = nullptr);
  // Soft-capped logits [B·S, V] from final hidden states.
  Tensor logits(const Tensor& hidden);
  // HF causal-LM loss: position t predicts labels[t+1] of its row; −100 is ignored; the
  // mean over counted targets. labels: host I64 or I32 [B, S].
  struct Loss {
    double sum = 0;
    int64_t count = 0;
    double mean() const { return count ? sum / double(count) : 0.0; }
  };
  Loss loss(const Tensor& hidden, const Tensor& labels);

 private:
  Tensor embed(const Batch& batch, Tensor& ids_dev);
  Tensor per_layer_inputs(const Tensor& ids, const Tensor& embedded);
  void layer_forward(int i, Tensor& x, const Batch& batch, const Tensor& positions,
                     const Tensor& ple, std::vector<std::pair<Tensor, Tensor>>& kv);
  Tensor attention(int i, const Tensor& a, const Batch& batch, const Tensor& positions,
                   std::vector<std::pair<Tensor, Tensor>>& kv);
  Tensor dense_mlp(const Gemma4LayerWeights& lw, const Tensor& y);
  Tensor moe_block(const Gemma4LayerWeights& lw, const Tensor& x1);
  Tensor rope_inv_freq(const LayerGeometry& g) const;

  Gemma4Config config_;
  Ops& ops_;
  Gemma4Weights w_;
  std::vector<Tensor> inv_freq_;  // per layer, host F64
};

// Shifted targets as HF builds them: target[b, t] = labels[b, t+1], −100 at the last
// position. Returns host I32 [B·S].
Tensor shift_labels(const Tensor& labels);

}  // namespace tl
