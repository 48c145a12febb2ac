// TimedOps: any backend's Ops, each call timed and counted by op and by op family, through
// the backend's own clock (Ops::make_clock: host time on the CPU, CUDA events on the GPU, so
// the GPU is not made to wait after each op). It wraps a backend as StrictOps wraps the CPU:
// the model runs on it unchanged. In blame mode it also waits after every op and names the
// op whose work failed (a GPU reports a kernel fault at a later synchronising call).
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/ops.h"

namespace tl {

struct OpTime {
  std::string name;    // the Ops method, or the family
  std::string family;  // matmul, nf4 matmul, attention, norm, rope, elementwise, embedding, moe,
                       // loss, optimizer, memory
  int64_t calls = 0;
  double seconds = 0;
};

class TimedOps final : public Ops {
 public:
  explicit TimedOps(Ops& inner, bool blame_each_op = false);
  ~TimedOps() override;

  // Times of every op since the last collect(), slowest first, by op and by family; then
  // starts afresh. Waits for the backend's work.
  struct Times {
    std::vector<OpTime> by_op, by_family;
    double seconds = 0;  // inside ops, all families
    int64_t calls = 0;
    // Families as rows "family  calls  seconds  share", and the JSON of both lists.
    std::string table() const;
    nlohmann::json to_json() const;
  };
  Times collect();
  // Off: calls pass straight through, neither timed nor counted (blame mode still waits after
  // each). On by default.
  void set_enabled(bool on) { enabled_ = on; }

  Device device() const override { return inner_.device(); }
  DType act_dtype() const override { return inner_.act_dtype(); }
  DType frozen_dtype() const override { return inner_.frozen_dtype(); }

  Tensor zeros(Shape shape, DType dtype) override;
  using Ops::zeros;
  Tensor empty(Shape shape, DType dtype) override;
  using Ops::empty;
  Tensor upload(const Tensor& host, DType dtype) override;
  Tensor download(const Tensor& t) override;
  void hold_matmul_input(const Tensor& x) override;
  void release_matmul_input() override;
  void linear_forward(const Tensor& x, const Tensor& w, Tensor& y, bool accumulate) override;
  void embedding_forward(const Tensor& table, const Tensor& ids, double scale, Tensor& out) override;
  void rmsnorm_forward(const Tensor& x, const Tensor& w, int64_t width, double eps, Tensor& y) override;
  void rope_forward(Tensor& x, int64_t heads, const Tensor& positions, const Tensor& inv_freq) override;
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                         Tensor& out) override;
  void attention_cached_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos,
                                const Tensor& k_pos, int64_t window, Tensor& out) override;
  void gelu_tanh_mul_forward(const Tensor& gate, const Tensor& up, Tensor& out) override;
  void add(const Tensor& a, const Tensor& b, Tensor& out) override;
  void mul(const Tensor& a, const Tensor& b, Tensor& out) override;
  void scale(Tensor& x, double s) override;
  void fill(Tensor& x, double value) override;
  void scale_rows(Tensor& x, const Tensor& s) override;
  void softcap_forward(Tensor& x, double cap) override;
  void copy_columns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t w) override;
  void moe_route_forward(const Tensor& logits, const Tensor& per_expert_scale, int64_t k, Tensor& weights,
                         Tensor& idx) override;
  void moe_experts_forward(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& experts,
                           Tensor& out, MoeTape& tape) override;
  void moe_experts_backward(const Tensor& y, const Tensor& idx, const Tensor& weights, const MoeExperts& experts,
                            const MoeTape& tape, const Tensor& dout, Tensor& dy, Tensor& dweights) override;
  void gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) override;
  void scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, Tensor& dst) override;
  double cross_entropy_sum(const Tensor& logits, const Tensor& labels, int64_t& count) override;
  void linear_nf4_forward(const Tensor& x, const Nf4Tensor& w, Tensor& y) override;
  void linear_nf4_backward(const Tensor& dy, const Nf4Tensor& w, Tensor& dx) override;
  void dropout_mask(uint64_t seed, double p, Tensor& mask) override;
  std::unique_ptr<OpClock> make_clock() override { return inner_.make_clock(); }
  double memory_available() override { return inner_.memory_available(); }
  void synchronize() override { inner_.synchronize(); }
  double norm2(const Tensor& x) override;
  void add_sum_squares(const Tensor& x, Tensor& acc, int64_t index) override;
  void adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                    double eps, double wd, double bc1, double bc2, double grad_scale) override;
  void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw) override;
  void embedding_backward(const Tensor& ids, const Tensor& dout, double scale, int64_t skip_id,
                          Tensor& dtable) override;
  void rmsnorm_backward(const Tensor& x, const Tensor& w, int64_t width, double eps, const Tensor& dy, Tensor& dx,
                        Tensor& dw) override;
  void rope_backward(Tensor& dx, int64_t heads, const Tensor& positions, const Tensor& inv_freq) override;
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionMask& mask,
                          const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) override;
  void gelu_tanh_mul_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                              Tensor& dup) override;
  void softcap_backward(const Tensor& y, double cap, Tensor& dy) override;
  void moe_route_backward(const Tensor& logits, const Tensor& per_expert_scale, const Tensor& idx,
                          const Tensor& dweights, Tensor& dlogits, Tensor& dscale) override;
  void scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) override;
  void rowwise_dot(const Tensor& a, const Tensor& rows, const Tensor& b, Tensor& out) override;
  void cross_entropy_backward(const Tensor& logits, const Tensor& labels, double grad_scale, double cap,
                                      Tensor& dlogits, Tensor& sums) override;
  DistillSums distill_kl_sum(const Tensor& student, const Tensor& teacher, const Tensor& labels, double temperature,
                             int64_t top_k) override;
  void distill_kl_backward(const Tensor& student, const Tensor& teacher, const Tensor& labels, double temperature,
                             int64_t top_k, double weight, double cap, Tensor& dstudent, Tensor& sums) override;

 private:
  struct Span {
    int op;
    size_t begin, end;  // clock marks
  };
  template <class F>
  auto timed(int op, F&& f) -> decltype(f());
  void finish(int op, size_t begin);

  void blame(int op);

  Ops& inner_;
  bool blame_;
  bool enabled_ = true;
  std::unique_ptr<OpClock> clock_;
  std::vector<Span> spans_;
};

}  // namespace tl
