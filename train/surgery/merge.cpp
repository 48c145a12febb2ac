#include "train/surgery/merge.h"

#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/checkpoint_dir.h"
#include "core/config.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "train/model/peft_adapter.h"

namespace tl {

namespace fs = std::filesystem;

namespace {

// delta[o, i] = s·Σ_r B[o, r]·A[r, i] in fp32 (PEFT casts bf16/fp16 adapters up on the CPU).
Tensor lora_delta(const AdapterTensors& a, double scaling) {
  Tensor A = a.A.to(DType::F32), B = a.B.to(DType::F32);
  const int64_t out = B.dim(0), r = B.dim(1), in = A.dim(1);
  Tensor d = Tensor::zeros({out, in}, DType::F32);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < r; ++k) {
      const float b = B.data<float>()[o * r + k];
      const float* ar = A.data<float>() + k * in;
      float* dr = d.data<float>() + o * in;
      // One fused multiply-add per rank step, in rank order, as BLAS kernels accumulate.
      for (int64_t i = 0; i < in; ++i) dr[i] = std::fma(b, ar[i], dr[i]);
    }
  const float s = float(scaling);
  for (int64_t i = 0; i < d.numel(); ++i) d.data<float>()[i] *= s;
  return d;
}

}  // namespace

MergeReport merge_adapter(const fs::path& base, const fs::path& adapter_dir, const fs::path& out,
                          const MergeOptions& options) {
  // The base passes `surgery check` first: a Gemma 4 config, and every decoder tensor present
  // with the shape the config implies and a float dtype.
  const Gemma4Config cfg = Gemma4Config::load(base);
  Checkpoint ckpt = Checkpoint::open(base);
  // W' = W + s·B·A needs W itself; a -bnb-4bit checkpoint holds only NF4 codes of it, and a
  // merge into dequantized NF4 would bake the quantization error into every merged weight.
  if (const std::string q = first_bnb_4bit(ckpt); !q.empty())
    throw Error(fmt::format("{}: cannot merge into a base pre-quantized by bitsandbytes ('{}' is 4-bit); merging "
                            "needs the full-precision base model the -bnb-4bit checkpoint was made from",
                            base.string(), q));
  check_text_decoder(cfg, ckpt);
  const std::string prefix = decoder_prefix(ckpt);
  PeftAdapter ad = read_peft_adapter(adapter_dir);
  const std::string adapter_file = (adapter_dir / "adapter_model.safetensors").string();

  // Every adapted module must exist in the base with shapes that fit, before anything is written.
  std::map<std::string, const AdapterTensors*> by_tensor;
  for (const auto& a : ad.adapters) {
    const std::string full = prefix + a.weight;
    if (!ckpt.contains(full))
      throw Error(fmt::format("{}: adapts '{}', which the base {} does not have (adapter made for another model?)",
                              adapter_file, full, base.string()));
    const Shape& w = ckpt.entry(full).shape;
    if (w.size() != 2 || a.A.rank() != 2 || a.B.rank() != 2 || a.A.dim(1) != w[1] || a.B.dim(0) != w[0] ||
        a.A.dim(0) != a.B.dim(1))
      throw Error(fmt::format("{}: '{}' has lora_A {} and lora_B {}, which do not fit the base weight {}",
                              adapter_file, full, shape_str(a.A.shape()), shape_str(a.B.shape()), shape_str(w)));
    by_tensor[full] = &a;
  }

  // Stream: each shard is mapped, merged, written and unmapped before the next, so resident
  // memory stays near the largest shard (the Checkpoint above only read headers).
  std::vector<fs::path> shard_paths;
  for (const SafetensorsFile& f : ckpt.files()) shard_paths.push_back(f.path());
  ckpt = Checkpoint();
  MergeReport report;
  write_checkpoint_dir(out, {base, adapter_dir}, options.force, [&](const fs::path& tmp) {
    nlohmann::json weight_map = nlohmann::json::object();
    uint64_t total = 0;
    const bool sharded = shard_paths.size() > 1;
    for (const fs::path& shard_path : shard_paths) {
      const SafetensorsFile shard = SafetensorsFile::open(shard_path);
      // Declare the shard's tensors, then produce each (merged where adapted) as the writer
      // reaches it: one merged tensor in memory at a time.
      std::vector<NamedTensor> specs;
      for (const TensorEntry& e : shard.entries()) {
        const DType dt = options.out_dtype && dtype_is_float(e.dtype) ? *options.out_dtype : e.dtype;
        specs.push_back({e.name, Tensor::wrap(nullptr, nullptr, e.shape, dt)});
        total += uint64_t(shape_numel(e.shape)) * dtype_size(dt);
        weight_map[e.name] = shard.path().filename().string();
        ++report.tensors;
      }
      write_safetensors_streamed(tmp / shard.path().filename(), specs, [&](size_t i) {
        const std::string& name = specs[i].name;
        Tensor t = shard.get(name);
        // Merge in the output dtype, as PEFT merges in the dtype the model was loaded in.
        if (t.dtype() != specs[i].tensor.dtype()) t = t.to(specs[i].tensor.dtype());
        auto it = by_tensor.find(name);
        if (it == by_tensor.end()) return t;
        const AdapterTensors& a = *it->second;
        const std::string module = name.substr(0, name.size() - 7);
        // PEFT's get_delta_weight returns the delta in the ADAPTER's dtype (fp32 adapters:
        // no rounding); W += delta then rounds once to W's dtype.
        Tensor delta = lora_delta(a, ad.spec.scaling_for(module)).to(a.A.dtype()).to(DType::F32);
        Tensor w32 = t.to(DType::F32);
        for (int64_t k = 0; k < w32.numel(); ++k) w32.data<float>()[k] += delta.data<float>()[k];
        ++report.merged_modules;
        return w32.to(t.dtype());
      });
      ++report.shards;
    }
    if (sharded) {
      // Same layout as the base; weight_map in natural (numeric) order, as write_checkpoint.
      std::vector<std::string> names;
      for (auto& [k, v] : weight_map.items()) names.push_back(k);
      std::sort(names.begin(), names.end(), natural_less);
      std::string text = "{\n  \"metadata\": {\n    \"total_size\": " + std::to_string(total) + "\n  },\n  \"weight_map\": {\n";
      for (size_t i = 0; i < names.size(); ++i)
        text += "    " + nlohmann::json(names[i]).dump() + ": " + weight_map[names[i]].dump() + (i + 1 < names.size() ? ",\n" : "\n");
      text += "  }\n}\n";
      write_file_atomic(tmp / "model.safetensors.index.json", text);
    }
    for (const fs::path& f : non_weight_files(base)) fs::copy_file(f, tmp / f.filename());
    nlohmann::json record = {{"tool", "torchless-merge"}, {"base", base.string()}, {"adapter", adapter_dir.string()},
                             {"merged_modules", report.merged_modules}};
    std::ofstream(tmp / "torchless_merge.json") << record.dump(2) << "\n";
  });
  if (by_tensor.size() != size_t(report.merged_modules))
    throw Error(fmt::format("{}: merged {} of {} adapted modules", adapter_file, report.merged_modules, by_tensor.size()));
  return report;
}

}  // namespace tl
