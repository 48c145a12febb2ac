#include "train/surgery/prune.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "core/checkpoint_dir.h"
#include "core/cpu/cpu_ops.h"
#include "core/weights.h"
#include "train/model/gemma4_model.h"

namespace tl {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Rows `keep` (ascending) of a tensor along dimension 0.
Tensor take_rows(const Tensor& t, const std::vector<int64_t>& keep) {
  Shape s = t.shape();
  const size_t row = t.nbytes() / size_t(s[0]);
  s[0] = int64_t(keep.size());
  Tensor out = Tensor::zeros(s, t.dtype());
  for (size_t i = 0; i < keep.size(); ++i)
    std::memcpy(static_cast<char*>(out.raw()) + i * row, static_cast<const char*>(t.raw()) + size_t(keep[i]) * row, row);
  return out;
}

}  // namespace

PruneReport prune_experts(const fs::path& src, const fs::path& out, const std::vector<std::vector<int32_t>>& calibration,
                          const PruneOptions& o) {
  const Gemma4Config c = Gemma4Config::load(src);
  if (!c.enable_moe_block) throw Error(fmt::format("{}: not a MoE model (enable_moe_block is false)", src.string()));
  const int64_t E = c.num_experts, L = c.num_hidden_layers;
  if (o.keep < c.top_k_experts || o.keep >= E)
    throw Error(fmt::format("--keep {}: must be at least top_k_experts ({}) and below num_experts ({})", o.keep,
                            c.top_k_experts, E));
  if (o.method != "coverage" && o.method != "reap" && o.method != "frequency")
    throw Error(fmt::format("--method '{}': use coverage, reap or frequency", o.method));
  if (calibration.empty()) throw Error("prune: the calibration set is empty");

  CpuOps ops(DType::F32);
  Gemma4Model model(c, ops);
  Checkpoint ckpt = Checkpoint::open(src);
  // The pruned router keeps rows of router.proj: packed NF4 bytes have no rows to keep.
  if (const std::string q = first_bnb_4bit(ckpt); !q.empty())
    throw Error(fmt::format("{}: cannot prune a checkpoint pre-quantized by bitsandbytes ('{}' is 4-bit); prune "
                            "the full-precision model and quantize afterwards",
                            src.string(), q));
  model.load(ckpt);
  const std::string prefix = decoder_prefix(ckpt);

  PruneReport report;
  // Per layer and expert: Σ‖w·y‖ over routed tokens, routed-token count, samples protecting
  // it, and this sample's Σ‖w·y‖.
  const std::vector<double> zeros(static_cast<size_t>(E), 0.0);
  std::vector<std::vector<double>> total(static_cast<size_t>(L), zeros), routed = total, coverage = total, sample = total;
  model.moe_observer = [&](int layer, int64_t e, const Tensor& rows, const Tensor& w, const Tensor& y) {
    const int64_t m = rows.numel(), H = y.dim(1);
    for (int64_t j = 0; j < m; ++j) {
      const double wj = w.get(j);
      double sq = 0;  // ‖w·y‖² in fp64: a bf16 norm overflows
      bool finite = std::isfinite(wj);
      for (int64_t h = 0; h < H && finite; ++h) {
        const double v = double(y.data<float>()[j * H + h]);
        finite = std::isfinite(v);
        sq += (wj * v) * (wj * v);
      }
      if (!finite || !std::isfinite(sq)) {
        ++report.skipped_tokens;
        continue;
      }
      const double n = std::sqrt(sq);
      sample[size_t(layer)][size_t(e)] += n;
      total[size_t(layer)][size_t(e)] += n;
      routed[size_t(layer)][size_t(e)] += 1;
      ++report.routed_tokens;
    }
  };
  for (const auto& seq : calibration) {
    for (auto& l : sample) std::fill(l.begin(), l.end(), 0.0);
    Tensor ids = Tensor::zeros({1, int64_t(seq.size())}, DType::I32);
    std::copy(seq.begin(), seq.end(), ids.data<int32_t>());
    model.forward_hidden({ids, {}, {}});
    for (int64_t l = 0; l < L; ++l) {  // protect this sample's top experts in each layer
      std::vector<int64_t> order(static_cast<size_t>(E));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sample[size_t(l)][size_t(a)] > sample[size_t(l)][size_t(b)]; });
      for (int64_t k = 0; k < std::min(o.protect, E); ++k)
        if (sample[size_t(l)][size_t(order[size_t(k)])] > 0) coverage[size_t(l)][size_t(order[size_t(k)])] += 1;
    }
    ++report.samples;
  }

  json drop = {{"method", o.method}, {"keep", o.keep}, {"protect", o.protect}, {"samples", report.samples},
               {"routed_tokens", report.routed_tokens}, {"skipped_tokens", report.skipped_tokens}};
  json layers = json::object();
  std::vector<NamedTensor> tensors;
  std::vector<std::vector<int64_t>> kept(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    auto key = [&](int64_t e) {
      const size_t le = size_t(l), ee = size_t(e);
      if (o.method == "coverage") return std::pair{coverage[le][ee], total[le][ee]};
      // REAP: mean over routed tokens of weight × ‖output‖ = mean of ‖w·y‖.
      if (o.method == "reap") return std::pair{routed[le][ee] ? total[le][ee] / routed[le][ee] : 0.0, total[le][ee]};
      return std::pair{routed[le][ee], total[le][ee]};
    };
    std::vector<int64_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) > key(b); });
    kept[size_t(l)].assign(order.begin(), order.begin() + o.keep);
    std::sort(kept[size_t(l)].begin(), kept[size_t(l)].end());
    std::vector<int64_t> dropped(order.begin() + o.keep, order.end());
    std::sort(dropped.begin(), dropped.end());
    layers[std::to_string(l)] = json{{"kept", kept[size_t(l)]}, {"dropped", dropped}};
  }
  drop["layers"] = layers;
  report.kept = kept;

  for (const std::string& name : ckpt.names()) {
    Tensor t = ckpt.get(name);
    const std::string layers_prefix = prefix + "layers.";
    if (name.starts_with(layers_prefix)) {
      const size_t dot = name.find('.', layers_prefix.size());
      const int64_t l = std::stoll(name.substr(layers_prefix.size(), dot - layers_prefix.size()));
      const std::string rest = name.substr(dot + 1);
      if (rest == "router.proj.weight" || rest == "router.per_expert_scale" || rest == "experts.gate_up_proj" ||
          rest == "experts.down_proj")
        t = take_rows(t, kept[size_t(l)]);
    }
    tensors.push_back({name, t});
  }
  std::ifstream in(src / "config.json");
  json cfg = json::parse(in);
  (cfg.contains("text_config") ? cfg["text_config"] : cfg)["num_experts"] = o.keep;
  write_derived_checkpoint(src, out, o.force, tensors, cfg.dump(2) + "\n", "expert_drop_map.json",
                           drop.dump(2) + "\n");
  return report;
}

}  // namespace tl
