#include "train/surgery/inspect.h"

#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/cpu/cpu_ops.h"
#include "core/weights.h"
#include "train/model/gemma4_model.h"
#include "train/model/peft_adapter.h"

namespace tl {

namespace fs = std::filesystem;

namespace {
double frobenius(const Tensor& t) {
  double s = 0;
  for (int64_t i = 0; i < t.numel(); ++i) s += t.get(i) * t.get(i);
  return std::sqrt(s);
}
}  // namespace

std::vector<LayerReport> inspect_model(const fs::path& model_dir, const fs::path& adapter,
                                       const std::vector<std::vector<int32_t>>& samples) {
  const Gemma4Config c = Gemma4Config::load(model_dir);
  CpuOps ops(DType::F32);
  Gemma4Model model(c, ops);
  Checkpoint ckpt = Checkpoint::open(model_dir);
  model.load(ckpt);
  const std::string prefix = decoder_prefix(ckpt);
  std::vector<LayerReport> out(size_t(c.num_hidden_layers));
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    out[size_t(i)].layer = i;
    out[size_t(i)].type = layer_type_name(c.layer(i).type);
    auto& lw = model.weights().layers[size_t(i)];
    out[size_t(i)].o_proj_norm = frobenius(ops.download(lw.o_proj));
    out[size_t(i)].down_proj_norm = frobenius(ops.download(lw.down_proj));
  }
  if (std::ifstream rec(model_dir / "torchless_surgery.json"); rec) {
    auto j = nlohmann::json::parse(rec);
    if (j.contains("layer_map"))
      for (size_t i = 0; i < j["layer_map"].size() && i < out.size(); ++i)
        out[i].inserted = j["layer_map"][i].value("mode", "") == "identity";
  }
  if (!adapter.empty()) {
    PeftAdapter ad = read_peft_adapter(adapter);
    for (const auto& a : ad.adapters) {
      const size_t dot = a.weight.find('.', 7);
      const int layer = a.weight.starts_with("layers.") ? std::stoi(a.weight.substr(7, dot - 7)) : -1;
      if (layer < 0 || layer >= c.num_hidden_layers) continue;
      out[size_t(layer)].lora_b_norms.push_back({a.weight.substr(dot + 1, a.weight.size() - dot - 8), frobenius(a.B)});
    }
  }
  for (const auto& seq : samples) {
    Tensor ids = Tensor::zeros({1, int64_t(seq.size())}, DType::I32);
    std::copy(seq.begin(), seq.end(), ids.data<int32_t>());
    std::vector<Tensor> states;
    model.forward_hidden({ids, {}, {}}, &states);
    const int64_t n = int64_t(seq.size()), H = c.hidden_size;
    for (int i = 0; i < c.num_hidden_layers; ++i) {
      double acc = 0;
      for (int64_t t = 0; t < n; ++t) {
        double d = 0, x = 0;
        for (int64_t h = 0; h < H; ++h) {
          const double a = states[size_t(i)].get(t * H + h), b = states[size_t(i) + 1].get(t * H + h);
          d += (b - a) * (b - a);
          x += a * a;
        }
        acc += std::sqrt(d) / std::max(1e-30, std::sqrt(x));
      }
      out[size_t(i)].residual_contribution += acc / double(n) / double(samples.size());
    }
  }
  return out;
}

std::string format_inspection(const std::vector<LayerReport>& layers) {
  std::string s = fmt::format("{:>5} {:<8} {:<9} {:>10} {:>10} {:>12}  {}\n", "layer", "type", "inserted", "|o_proj|",
                              "|down|", "residual", "LoRA |B| per module");
  for (const auto& l : layers) {
    std::string lora;
    for (const auto& [m, v] : l.lora_b_norms) lora += fmt::format("{}={:.3g} ", m, v);
    s += fmt::format("{:>5} {:<8} {:<9} {:>10.4g} {:>10.4g} {:>12.4g}  {}\n", l.layer,
                     l.type == "full_attention" ? "full" : "sliding", l.inserted ? "yes" : "", l.o_proj_norm,
                     l.down_proj_norm, l.residual_contribution, lora);
  }
  return s;
}

}  // namespace tl
