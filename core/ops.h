// The Ops interface: every numeric primitive the Gemma 4 model needs. The model is written
// once against it; core/cpu implements it on the host (the reference), cuda/ on the GPU.
//
// Conventions: activations are contiguous tensors of the backend's activation dtype
// (F32, F64 for gradient checks on the CPU, or BF16 on the GPU); rows are tokens; weights
// are stored PyTorch-style [out, in] so Linear(x) = x·Wᵀ. Index tensors are I32. Trainable
// master weights (LoRA), their gradients and Adam moments have master_dtype(): F32 beside
// BF16 activations, so linear_forward/backward then take an F32 W (and give an F32 dW).
#pragma once
#include <cstddef>
#include <memory>
#include <vector>

#include "core/tensor.h"

namespace tl {

struct Nf4Tensor;

// Which keys a query may attend to: causal, optionally limited to a window of `window`
// keys (itself included), and never across a document boundary when `doc_ids` is given.
struct AttentionMask {
  int64_t window = 0;        // 0: no window (full attention)
  const Tensor* doc_ids = nullptr;  // optional I32 [B, S]; equal ids = same document
  // The same ids on the host, when the caller has them (the batch came from there): a backend
  // whose doc_ids live on a device bounds the keys each block of queries reads without
  // reading them back.
  const Tensor* doc_ids_host = nullptr;
  // Each query row's log-sum-exp of its scores, [B, nh, S] on the backend, F32 (F64 with F64
  // activations): written by attention_forward when given, read by attention_backward when given
  // (which then recomputes the probabilities from it, without each row's max and sum).
  Tensor* lse = nullptr;
};

// Marks in a backend's order of work, so that ops are timed without waiting after each one
// (TimedOps, core/timed_ops.h): host time on the CPU, CUDA events on the GPU.
class OpClock {
 public:
  virtual ~OpClock() = default;
  // A mark after all the work issued so far; returns its index (0, 1, …).
  virtual size_t mark() = 0;
  // Waits for the work before both marks, then gives the seconds between marks a and b.
  virtual double seconds(size_t a, size_t b) = 0;
  // Forgets every mark (a backend reuses their resources).
  virtual void clear() = 0;
};

// A MoE layer's experts as the model holds them: dense [E, 2I, H] gate_up and [E, H, I]
// down tensors, or one NF4 matrix per expert ([2I, H] and [H, I]), frozen either way.
struct MoeExperts {
  const Tensor* gate_up = nullptr;  // dense (its data unused when gate_up_nf4 is given)
  const Tensor* down = nullptr;
  const std::vector<Nf4Tensor>* gate_up_nf4 = nullptr;
  const std::vector<Nf4Tensor>* down_nf4 = nullptr;
  int64_t num_experts = 0, intermediate = 0;  // E, I
};

// What moe_experts_forward keeps for moe_experts_backward, in the backend's own layout (the
// CPU: per routed slot t·K + k, [n·K, …]; the GPU: per tile of an expert's rows).
struct MoeTape {
  Tensor gate, up, h, out;  // gate and up projections, gelu(gate)∘up, the expert's output
  Tensor aux;               // backend routing state (the GPU: slot → tile row, tile table)
};

class Ops {
 public:
  virtual ~Ops() = default;
  virtual Device device() const = 0;
  virtual DType act_dtype() const = 0;
  // The dtype of trainable master weights, their gradients and optimizer moments: F32 when
  // activations are BF16 (fp32 masters, issue 10), else the activation dtype.
  DType master_dtype() const { return act_dtype() == DType::BF16 ? DType::F32 : act_dtype(); }
  // The dtype the frozen base's projections and embedding tables are held in (no gradient
  // ever updates them): the activation dtype, or BF16 where a backend with F32 activations
  // multiplies in bf16 anyway (CpuMatmul::Bf16), so that the table is rounded once at load,
  // not on every product, and takes half the memory. linear_forward / linear_backward (dx
  // only) and embedding_forward then take a BF16 W beside F32 activations.
  virtual DType frozen_dtype() const { return act_dtype(); }

  // Zero-filled tensor on this backend.
  virtual Tensor zeros(Shape shape, DType dtype) = 0;
  Tensor zeros(Shape shape) { return zeros(std::move(shape), act_dtype()); }
  // A tensor whose contents are unspecified, for an output that the next op overwrites
  // whole (a product without accumulate, a norm, an elementwise op): no fill pass over it.
  virtual Tensor empty(Shape shape, DType dtype) { return zeros(std::move(shape), dtype); }
  Tensor empty(Shape shape) { return empty(std::move(shape), act_dtype()); }
  // Host tensor -> backend tensor of dtype `dtype` (converted).
  virtual Tensor upload(const Tensor& host, DType dtype) = 0;
  // Backend tensor -> host tensor (same dtype).
  virtual Tensor download(const Tensor& t) = 0;

  // The caller will not write x until the matching release_matmul_input (MatmulInputHold
  // below), so a backend that converts the inputs of its products (CpuOps under
  // CpuMatmul::Bf16 rounds them to bf16) may convert x once for every product that reads it
  // (q, k and v from one normed input; a projection and its adapter's A). Holds nest.
  virtual void hold_matmul_input(const Tensor& x) { (void)x; }
  virtual void release_matmul_input() {}

  // y[n,o] = Σ_i x[n,i]·W[o,i]  (y += … when accumulate). x: [N, in], W: [out, in].
  virtual void linear_forward(const Tensor& x, const Tensor& w, Tensor& y, bool accumulate = false) = 0;

  // out[n,:] = table[ids[n],:] · scale. table: [V, D], ids: I32 [N], out: [N, D].
  virtual void embedding_forward(const Tensor& table, const Tensor& ids, double scale, Tensor& out) = 0;

  // y = x · (mean(x², last dim) + eps)^(-1/2) · w over rows of width D = w's size
  // (or `width` when w is undefined, a norm without scale). x, y: [rows, D].
  virtual void rmsnorm_forward(const Tensor& x, const Tensor& w, int64_t width, double eps, Tensor& y) = 0;

  // NeoX-style rotation in place: x viewed [N, heads, d]; pairs (i, i+d/2) rotate by
  // pos[n]·inv_freq[i] (angle and cos/sin in the activation dtype); inv_freq: F64 [d/2]
  // on this backend (the model uploads it once, at load) holding the fp32 values HF
  // computes (zeros leave dims untouched).
  virtual void rope_forward(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq) = 0;

  // Scaled-dot-product attention with scale 1.0 and GQA (query head h uses KV head
  // h / (nh/nkv)). q: [B,S,nh,d], k, v: [B,S,nkv,d], out: [B,S,nh,d].
  virtual void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const AttentionMask& mask, Tensor& out) = 0;

  // Attention of S new queries against L keys held by a KV cache, keys in any order (a ring
  // buffer): q [S, nh, d], k, v [L, nkv, d] on this backend; q_pos I32 [S] and k_pos I32 [L]
  // on the host, k_pos −1 for an empty slot. Query s sees key j iff 0 ≤ k_pos[j] ≤ q_pos[s]
  // and, with a window, q_pos[s] − k_pos[j] < window: the mask attention_forward applies to
  // positions. Scale 1.0 and GQA as there. The default computes on the host in double.
  virtual void attention_cached_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos,
                                        const Tensor& k_pos, int64_t window, Tensor& out);

  // out = gelu_tanh(gate) ∘ up, elementwise.
  virtual void gelu_tanh_mul_forward(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // out = a + b (same shape); out may alias a or b.
  virtual void add(const Tensor& a, const Tensor& b, Tensor& out) = 0;
  // out = a ∘ b (same shape); out may alias a or b.
  virtual void mul(const Tensor& a, const Tensor& b, Tensor& out) = 0;
  // x *= s in place.
  virtual void scale(Tensor& x, double s) = 0;
  // x[i] = value for every i, whatever x held (NaN and Inf included: zeroing a gradient by
  // scale(x, 0) would keep a NaN, NaN · 0 = NaN, and poison every later step).
  virtual void fill(Tensor& x, double value) = 0;
  // x[m,:] *= s[m] in place. x: [M, D], s: [M].
  virtual void scale_rows(Tensor& x, const Tensor& s) = 0;
  // x = cap · tanh(x / cap) in place.
  virtual void softcap_forward(Tensor& x, double cap) = 0;
  // Copy columns: dst[:, dst_col:dst_col+w] = src[:, src_col:src_col+w] for 2-D row-major tensors.
  virtual void copy_columns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t w) = 0;

  // MoE routing: p = softmax(logits) over E experts; take the top k by p (ties to the lower
  // index); weights = p_k / Σ p_top · per_expert_scale[idx]. logits: [N,E];
  // weights: [N,k] act dtype; idx: I32 [N,k].
  virtual void moe_route_forward(const Tensor& logits, const Tensor& per_expert_scale, int64_t k,
                                 Tensor& weights, Tensor& idx) = 0;
  // The routed experts of a MoE layer, routed on this backend (no host loop over experts, no
  // routing read back): for each token t and choice k, with e = idx[t,k] and w = weights[t,k],
  //   gate|up = y[t]·W_gu,eᵀ;  h = gelu_tanh(gate)∘up;  o = h·W_down,eᵀ;  out[t] += w·o.
  // y, out: [n, H]; idx: I32 [n, K]; weights: [n, K]. `tape` receives what the backward needs.
  virtual void moe_experts_forward(const Tensor& y, const Tensor& idx, const Tensor& weights,
                                   const MoeExperts& experts, Tensor& out, MoeTape& tape) = 0;
  // Its backward for frozen experts: dy += ∂/∂y, dweights[t,k] = ⟨o_{t,k}, dout[t]⟩ (set).
  virtual void moe_experts_backward(const Tensor& y, const Tensor& idx, const Tensor& weights,
                                    const MoeExperts& experts, const MoeTape& tape, const Tensor& dout, Tensor& dy,
                                    Tensor& dweights) = 0;
  // out[m,:] = src[rows[m],:].
  virtual void gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) = 0;
  // dst[rows[m],:] += scale[m] · src[m,:].
  virtual void scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, Tensor& dst) = 0;

  // Σ over rows with label ≠ -100 of −log softmax(logits[n])[label[n]]; returns the sum
  // (double) and sets `count`. logits: [N, V], labels: I32 [N].
  virtual double cross_entropy_sum(const Tensor& logits, const Tensor& labels, int64_t& count) = 0;

  // Linear layers whose frozen weight is held in NF4 (QLoRA): W is dequantized a tile of
  // rows at a time, in the weight's original dtype as bitsandbytes does, and never whole.
  //   y = x·Wᵀ;  dx += dy·W (no weight gradient: the base is frozen).
  // The defaults build on the primitives above; backends may fuse them.
  virtual void linear_nf4_forward(const Tensor& x, const Nf4Tensor& w, Tensor& y);
  virtual void linear_nf4_backward(const Tensor& dy, const Nf4Tensor& w, Tensor& dx);

  // Inverted dropout's mask, made where `mask` lives: mask[i] = dropout_keep(seed, i, p)
  // (core/math.h: 1/(1−p) when unit_double(splitmix64(seed + i)) ≥ p, else 0) in mask's
  // dtype. The default fills it on the host and uploads it; backends make it in place.
  virtual void dropout_mask(uint64_t seed, double p, Tensor& mask);

  // ---- timing and faults --------------------------------------------------------------
  // A clock over this backend's work (OpClock). The default reads the host's steady clock,
  // right for a backend whose ops return when their work is done (the CPU).
  virtual std::unique_ptr<OpClock> make_clock();
  // Bytes this backend may still allocate: the GPU's free memory, or the host's available
  // memory (MemAvailable) on the CPU. What `gradient_checkpointing: auto` plans against.
  virtual double memory_available();
  // Waits for all the work issued so far and throws tl::Error if it failed. A GPU reports a
  // kernel's fault at the next synchronising call, so a caller that synchronizes after each
  // op (TimedOps' blame mode) names the op at fault. The default has nothing to wait for.
  virtual void synchronize() {}

  // ---- optimisation ----------------------------------------------------------------------
  // ‖x‖₂ (accumulated in double), read back to the host.
  virtual double norm2(const Tensor& x) = 0;
  // acc[index] += Σ x² (in double, the same sum whatever the threads), acc an F64 tensor on
  // this backend: a step's squared gradient norm stays on the device until its one read.
  virtual void add_sum_squares(const Tensor& x, Tensor& acc, int64_t index) = 0;
  // One PyTorch AdamW update of p with gradient g and moments m, v (bc1, bc2 the bias
  // corrections 1−β^t), the gradient first multiplied by grad_scale (the clipping
  // coefficient, rounded to p's dtype as torch's grad.mul_ rounds it):  g ← g·grad_scale;
  // p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
  // p ← p − (lr/bc1)·m / (√v/√bc2 + eps).  g itself is left as it was.
  virtual void adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1,
                            double beta2, double eps, double wd, double bc1, double bc2, double grad_scale) = 0;

  // ---- backward ------------------------------------------------------------------------
  // Each *_backward takes the forward's inputs and the gradient of its output, and ADDS the
  // gradients of its inputs into the given tensors (so consumers can accumulate: tied
  // weights, K/V read by several layers, residual branches). An undefined output tensor
  // means that gradient is not wanted.

  // dx += dy·W;  dW += dyᵀ·x.
  virtual void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw) = 0;
  // dtable[ids[n]] += scale·dout[n], except rows equal to `skip_id` (PyTorch's padding_idx
  // gets no gradient); skip_id < 0 skips nothing.
  virtual void embedding_backward(const Tensor& ids, const Tensor& dout, double scale, int64_t skip_id,
                                  Tensor& dtable) = 0;
  // With r = (mean(x²)+eps)^-½ and y = x·r·w per row:
  //   dx += r·(dy∘w) − x·r³·mean(x∘dy∘w);  dw += Σ_rows dy∘x·r.
  virtual void rmsnorm_backward(const Tensor& x, const Tensor& w, int64_t width, double eps, const Tensor& dy,
                                Tensor& dx, Tensor& dw) = 0;
  // The transpose of rope_forward (rotation by −θ), in place on the gradient.
  virtual void rope_backward(Tensor& dx, int64_t heads, const Tensor& positions, const Tensor& inv_freq) = 0;
  // Gradients of attention_forward (probabilities recomputed from q and k).
  virtual void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                                  const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) = 0;
  // out = gelu_tanh(gate)∘up:  dgate += dout∘up∘gelu'(gate);  dup += dout∘gelu(gate).
  virtual void gelu_tanh_mul_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                                      Tensor& dup) = 0;
  // y = cap·tanh(x/cap) given y:  dx = dy·(1 − (y/cap)²), in place on dy.
  virtual void softcap_backward(const Tensor& y, double cap, Tensor& dy) = 0;
  // Gradients of moe_route_forward w.r.t. the router logits and per_expert_scale. With
  // w_k = p̃_k·s_{e_k} (p̃ the softmax restricted to the chosen experts):
  //   dp̃_k = dw_k·s_{e_k};  dlogit_{e_k} = p̃_k·(dp̃_k − Σ_j p̃_j·dp̃_j);  ds_{e_k} += dw_k·p̃_k.
  virtual void moe_route_backward(const Tensor& logits, const Tensor& per_expert_scale, const Tensor& idx,
                                  const Tensor& dweights, Tensor& dlogits, Tensor& dscale) = 0;
  // dst[rows[m],:] += src[m,:] (the backward of gather_rows).
  virtual void scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) = 0;
  // dscale[m] = ⟨src[m,:], ddst[rows[m],:]⟩ (the scale part of scatter_add_rows' backward;
  // the src part is gather_rows of ddst times scale).
  virtual void rowwise_dot(const Tensor& a, const Tensor& rows, const Tensor& b, Tensor& out) = 0;
  // Fused soft-capped cross-entropy gradient for a chunk: given logits (already capped) and
  // targets (labels: I32 on this backend, checked by the caller), dlogits = (softmax −
  // onehot)·grad_scale on counted rows, 0 on ignored ones, then the cap's derivative. Adds the
  // chunk's loss sum to sums[0] and its argmax hits (token accuracy; ties to the lower index)
  // to sums[1], sums an F64 tensor on this backend: nothing is read back here.
  virtual void cross_entropy_backward(const Tensor& logits, const Tensor& labels, double grad_scale, double cap,
                                      Tensor& dlogits, Tensor& sums) = 0;

  // ---- distillation from a teacher (issue 24) ----------------------------------------------
  // For a chunk of student logits s and teacher logits t ([N, V], both already soft-capped),
  // temperature T and top_k, per row whose label ≠ −100 (a trained target):
  //   q = softmax(s/T) over the whole vocabulary;
  //   p = softmax(t/T) (top_k = 0), or with top_k > 0 the softmax of t/T over the teacher's
  //       top_k logits (ties to the lower index) and 0 elsewhere: the teacher's top k
  //       renormalised, the student still normalised over the whole vocabulary, as Axolotl's
  //       KD loss does;
  //   kl = Σ_j p_j·(log p_j − log q_j)   (over the top k only when top_k > 0).
  struct DistillSums {
    double kl = 0;      // Σ kl over the counted rows
    int64_t count = 0;  // rows with label ≠ −100
    int64_t agree = 0;  // counted rows where argmax s = argmax t (ties to the lower index)
  };
  // For evaluation: the sums, read back.
  virtual DistillSums distill_kl_sum(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                     double temperature, int64_t top_k) = 0;
  // For training: the fused gradient of weight·T²·kl for a chunk, ADDED to dstudent (which the
  // cross-entropy backward has just set), through the student's soft-cap:
  //   dstudent_j += weight·T·(q_j − p_j)·(1 − (s_j/cap)²)   on counted rows (cap 0: no cap),
  // since d(T²·kl)/ds_j = T·(q_j − p_j). Adds the chunk's Σ kl to sums[0] (F64 on this
  // backend; labels checked by the caller, as for the cross-entropy): nothing is read back.
  virtual void distill_kl_backward(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                   double temperature, int64_t top_k, double weight, double cap, Tensor& dstudent,
                                   Tensor& sums) = 0;
};

// Holds x as an unchanged matmul input for the guard's lifetime (Ops::hold_matmul_input).
class MatmulInputHold {
 public:
  MatmulInputHold(Ops& ops, const Tensor& x) : ops_(ops) { ops_.hold_matmul_input(x); }
  ~MatmulInputHold() { ops_.release_matmul_input(); }
  MatmulInputHold(const MatmulInputHold&) = delete;
  MatmulInputHold& operator=(const MatmulInputHold&) = delete;

 private:
  Ops& ops_;
};

}  // namespace tl
