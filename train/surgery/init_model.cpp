#include "train/surgery/init_model.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/checkpoint_dir.h"
#include "core/weights.h"

namespace tl {

namespace {
uint64_t mix(uint64_t x) {  // SplitMix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
double unit(uint64_t b) { return (double(b >> 11) + 0.5) * 0x1.0p-53; }
}  // namespace

void init_checkpoint(const Gemma4Config& c, const std::filesystem::path& out, uint64_t seed, double std_dev,
                     bool force, const std::vector<std::filesystem::path>& inputs,
                     const std::filesystem::path& copy_from) {
  std::vector<std::filesystem::path> all = inputs;
  if (!copy_from.empty()) all.push_back(copy_from);
  write_checkpoint_dir(out, all, force, [&](const std::filesystem::path& tmp) {
    std::vector<NamedTensor> tensors;
    uint64_t stream = mix(seed);
    for (const WeightSpec& s : text_decoder_weights(c)) {
      Tensor t = Tensor::zeros(s.shape, DType::F32);
      const bool ones = s.shape.size() == 1;  // norms, router scales, layer_scalar
      for (int64_t i = 0; i < t.numel(); ++i) {
        if (ones) {
          t.data<float>()[i] = 1.0f;
          continue;
        }
        // Box–Muller from two counter-based uniforms.
        const uint64_t k = mix(stream + uint64_t(i));
        const double u1 = unit(mix(k)), u2 = unit(mix(k ^ 0xabcdef));
        t.data<float>()[i] = float(std_dev * std::sqrt(-2.0 * std::log(u1)) * std::cos(2 * M_PI * u2));
      }
      stream = mix(stream ^ uint64_t(t.numel()));
      tensors.push_back({std::string(kPlainPrefix) + s.name, t.to(DType::BF16)});
    }
    write_checkpoint(tmp, tensors, 5'000'000'000ull);
    nlohmann::json j = c.to_text_json();
    j["architectures"] = {"Gemma4ForCausalLM"};
    j["dtype"] = "bfloat16";
    j["initializer_range"] = std_dev;
    write_file_atomic(tmp / "config.json", j.dump(2) + "\n");
    if (!copy_from.empty())
      for (const auto& f : non_weight_files(copy_from))
        if (f.filename() != "config.json" && f.filename() != "torchless_init.json") fs::copy_file(f, tmp / f.filename());
    nlohmann::json record = {{"tool", "torchless-surgery init"}, {"seed", seed}, {"initializer_range", std_dev}};
    write_file_atomic(tmp / "torchless_init.json", record.dump(2) + "\n");
  });
}

}  // namespace tl
