#include "train/step/memory_plan.h"

#include "core/attention_blocks.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "core/plan.h"
#include "core/weights.h"

namespace tl {

int64_t lora_param_count(const Gemma4Config& c, const LoraSpec& spec, const std::string& decoder_prefix) {
  std::map<std::string, Shape> shapes;
  for (const WeightSpec& s : text_decoder_weights(c)) shapes[s.name] = s.shape;
  int64_t n = 0;
  for (const std::string& name : select_lora_targets(c, spec, decoder_prefix)) {
    const Shape& s = shapes.at(name);
    n += spec.rank_for(decoder_prefix + name.substr(0, name.size() - 7)) * (s[0] + s[1]);  // less ".weight"
  }
  return n;
}

namespace {

// Elements per token of each layer's tape (LayerTape), and the widest layer's backward
// temporaries.
std::vector<double> layer_tapes(const Gemma4Config& c, double T, double& backward_max) {
  const int64_t H = c.hidden_size, nh = c.num_attention_heads, P = c.hidden_size_per_layer_input;
  std::vector<double> tapes;
  backward_max = 0;
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const LayerGeometry& g = c.layer(i);
    const double q = double(nh * g.head_dim), kv = double(g.num_kv_heads * g.head_dim);
    const double I = double(g.mlp_width);
    // a, o, x1, m_in, mlp, x2 (H each); q_raw, q, attn; k_raw, v_raw, k, v (own K/V only);
    // gate, up, h; PLE g, ple_i, gh (P) and proj (H); MoE: router and expert norms (3 H), the
    // routed rows' gate/up/h (top_k · 3 · moe_intermediate) and their outputs (top_k · H).
    double tape = 6.0 * double(H) + 3.0 * q + (g.kv_source < 0 ? 4.0 * kv : 0.0) + 3.0 * I;
    if (P > 0) tape += 3.0 * double(P) + double(H);
    // MoE: the router and expert norms (4 H); the routed rows' gate, up, gelu(gate)∘up and
    // expert outputs, per routed row (Ops::moe_experts_forward), with the GPU's padding of
    // each expert's rows to 64-row tiles: up to 64·E rows beside the T·K routed ones.
    if (c.enable_moe_block)
      tape += 4.0 * double(H) + (double(c.top_k_experts) + 64.0 * double(c.num_experts) / T) *
                                    (3.0 * double(c.moe_intermediate_size) + double(H));
    // Backward: the MLP's dh, dgate, dup and three H-wide gradients; or attention's dq,
    // dattn, dk, dv and dq_raw, whichever is wider.
    const double back = std::max(3.0 * I + 3.0 * double(H), 3.0 * q + 2.0 * kv + 3.0 * double(H));
    backward_max = std::max(backward_max, back);
    tapes.push_back(tape);
  }
  return tapes;
}

// The layers recomputed under `in`: its own list, else all or none.
std::vector<bool> recomputed(const Gemma4Config& c, const MemoryPlanInput& in) {
  if (!in.checkpointed.empty()) return in.checkpointed;
  return std::vector<bool>(static_cast<size_t>(c.num_hidden_layers), in.gradient_checkpointing);
}

}  // namespace

MemoryPlan plan_training_memory(const Gemma4Config& c, const MemoryPlanInput& in) {
  const ModelPlan mp = plan_model(c);
  const double T = double(in.micro_batch * in.sequence_len), a = double(in.act_bytes);
  const int64_t H = c.hidden_size, P = c.hidden_size_per_layer_input;
  MemoryPlan p;
  p.weights = in.load_in_4bit ? mp.bytes_nf4 : mp.bytes_bf16;
  p.trainable = 16.0 * double(in.lora_params);

  std::vector<bool> kv_source(size_t(c.num_hidden_layers), false);
  for (int i = 0; i < c.num_hidden_layers; ++i)
    if (c.layer(i).kv_source >= 0) kv_source[size_t(c.layer(i).kv_source)] = true;
  double backward_max = 0, recomputed_max = 0;
  const std::vector<double> tapes = layer_tapes(c, T, backward_max);
  const std::vector<bool> ckpt = recomputed(c, in);
  // A recomputed layer keeps its input [T, H]; a kept one its whole tape.
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    p.checkpoints += (ckpt[size_t(i)] ? double(H) : tapes[size_t(i)]) * T * a;
    if (ckpt[size_t(i)]) recomputed_max = std::max(recomputed_max, tapes[size_t(i)]);
  }
  for (int i = 0; i < c.num_hidden_layers; ++i)
    if (kv_source[size_t(i)]) p.kv_kept += 2.0 * double(c.layer(i).num_kv_heads * c.layer(i).head_dim) * T * a;
  // One recomputed layer's tape is rebuilt at a time; the kept tapes are counted above and
  // only the backward temporaries come on top.
  p.working_set = (recomputed_max + backward_max) * T * a +
                  (P > 0 ? 2.0 * double(c.num_hidden_layers * P) * T * a : 0.0);  // PLE inputs and gradient
  // cuda/attention.cu, per (batch, KV head) and block of 128 queries of the GQA group's G
  // heads: fp32 scores P and dP [G·128, S]; with bf16 activations bf16 copies of P and dS to
  // multiply V, K and Q, and dK, dV summed in fp32 over the blocks and heads before one
  // rounding.
  const double S = double(in.sequence_len);
  double kv_width = 0;
  for (int i = 0; i < c.num_hidden_layers; ++i)
    kv_width = std::max(kv_width, double(c.layer(i).num_kv_heads * c.layer(i).head_dim));
  p.attention = attention_block_scores(widest_gqa_group(c), in.sequence_len) *
                    (2.0 * 4.0 + (in.act_bytes == 2 ? 2.0 * 2.0 : 0.0)) +
                (in.act_bytes == 2 ? 2.0 * T * kv_width * 4.0 : 0.0);
  p.cross_entropy = 2.0 * double(std::min<int64_t>(in.ce_chunk, int64_t(T))) * double(c.vocab_size) * 4.0;
  // The largest projection (or one expert's gate_up) dequantized to bf16.
  double largest = 0;
  for (const WeightSpec& s : text_decoder_weights(c)) {
    if (s.component == Component::Experts) largest = std::max(largest, double(shape_numel(s.shape) / s.shape[0]));
    else if (s.is_linear) largest = std::max(largest, double(shape_numel(s.shape)));
  }
  p.dequant = in.load_in_4bit ? 2.0 * largest : 0.0;
  // The routed experts multiply every expert of a layer at once: all of them dequantized
  // (gate_up [E, 2I, H] and down [E, H, I], in the activation dtype).
  if (in.load_in_4bit && c.enable_moe_block)
    p.dequant += a * double(c.num_experts) * 3.0 * double(c.moe_intermediate_size) * double(H);
  // The teacher runs tape-less before the student's forward, so its layer working set is
  // gone by the student's backward; what stays is its hidden states and a logits chunk.
  p.teacher = in.teacher_weights;
  if (in.distill)
    p.teacher += T * double(H) * a + double(std::min<int64_t>(in.ce_chunk, int64_t(T))) * double(c.vocab_size) * 4.0;
  const double transient = p.checkpoints + p.kv_kept + p.working_set + p.attention + p.cross_entropy + p.dequant +
                           (p.teacher - in.teacher_weights);
  p.slack = 0.05 * transient + 256.0 * double(1 << 20);
  return p;
}

std::vector<bool> checkpointed_layers(const Gemma4Config& c, MemoryPlanInput in, double budget) {
  const size_t L = size_t(c.num_hidden_layers);
  in.checkpointed.assign(L, false);
  if (plan_training_memory(c, in).total() <= budget) return in.checkpointed;
  double backward_max = 0;
  const std::vector<double> tapes = layer_tapes(c, double(in.micro_batch * in.sequence_len), backward_max);
  std::vector<size_t> order(L);
  for (size_t i = 0; i < L; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return tapes[x] > tapes[y]; });
  for (size_t i : order) {
    in.checkpointed[i] = true;
    if (plan_training_memory(c, in).total() <= budget) break;
  }
  return in.checkpointed;
}

std::string format_memory_plan(const Gemma4Config& config, const MemoryPlanInput& in) {
  const Gemma4Config* c = &config;
  const MemoryPlan p = plan_training_memory(config, in);
  auto g = [](double b) { return fmt::format("{:.2f}", b / double(1ull << 30)); };
  std::string s = fmt::format(
      "peak per GPU     {} GiB = weights {} + trainable {} + checkpoints {} + kv kept {} + layer working set {} "
      "+ attention block {} + CE chunk {} + dequant scratch {}{} + slack {} ({} tokens, {} activations{})\n",
      g(p.total()), g(p.weights), g(p.trainable), g(p.checkpoints), g(p.kv_kept), g(p.working_set),
      g(p.attention), g(p.cross_entropy), g(p.dequant),
      in.distill || in.teacher_weights > 0 ? fmt::format(" + teacher {}", g(p.teacher)) : std::string(), g(p.slack),
      in.micro_batch * in.sequence_len,
      in.act_bytes == 2 ? "bf16" : in.act_bytes == 4 ? "fp32" : "fp64",
      [&] {
        const std::vector<bool> ckpt = recomputed(*c, in);
        const int64_t n = std::count(ckpt.begin(), ckpt.end(), true);
        if (n == 0) return std::string(", no layer recomputed");
        if (size_t(n) == ckpt.size()) return std::string(", gradient checkpointing");
        return fmt::format(", {} of {} layers recomputed", n, ckpt.size());
      }());
  if (in.act_bytes > 2) {
    // The GPU numerics issue 10 asks for store activations in bf16; today's backends store
    // the activation dtype. Both figures, so neither is mistaken for the other.
    MemoryPlanInput bf16 = in;
    bf16.act_bytes = 2;
    s += fmt::format("                 {} GiB with bf16 activation storage (this backend stores {} activations)\n",
                     g(plan_training_memory(*c, bf16).total()), in.act_bytes == 4 ? "fp32" : "fp64");
  }
  return s;
}

}  // namespace tl
