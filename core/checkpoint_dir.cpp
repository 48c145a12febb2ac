#include "core/checkpoint_dir.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "core/config.h"
#include "core/dir_lock.h"
#include "core/output_dir.h"
#include "core/weights.h"

namespace tl {

uint64_t parse_size(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0) throw Error(fmt::format("size '{}' does not start with a number", text));
  double value = std::stod(text.substr(0, i));
  std::string unit = text.substr(i);
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::toupper(c); });
  static const std::pair<const char*, double> units[] = {
      {"", 1},           {"B", 1},          {"KB", 1e3},       {"MB", 1e6},
      {"GB", 1e9},       {"TB", 1e12},      {"KIB", 1024.0},   {"MIB", 1048576.0},
      {"GIB", 1073741824.0}, {"TIB", 1099511627776.0}};
  for (const auto& [name, mult] : units)
    if (unit == name) return uint64_t(value * mult);
  throw Error(fmt::format("size '{}' has unknown unit '{}' (use KB, MB, GB, KiB, MiB or GiB)", text, unit));
}

std::vector<fs::path> non_weight_files(const fs::path& dir) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    std::string name = e.path().filename().string();
    // A lock file belongs to a writer of that folder, not to the checkpoint (core/dir_lock.h).
    if (name.ends_with(".safetensors") || name == "model.safetensors.index.json" || name.ends_with(".tmp") ||
        name == kLockFileName)
      continue;
    out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

void write_checkpoint_dir(const fs::path& out, const std::vector<fs::path>& inputs, bool force,
                          const std::function<void(const fs::path&)>& fill) {
  write_output_dir(out, inputs, force, fill);
}

namespace {
// config.json's "dtype" (top level and text_config) names the weights' dtype, which
// transformers uses for dtype="auto".
void set_config_dtype(const fs::path& path, DType dtype) {
  const char* name = dtype == DType::BF16 ? "bfloat16" : dtype == DType::F16 ? "float16"
                   : dtype == DType::F64 ? "float64" : "float32";
  std::ifstream in(path);
  nlohmann::json j = nlohmann::json::parse(in);
  j["dtype"] = name;
  if (j.contains("text_config") && j["text_config"].is_object()) j["text_config"]["dtype"] = name;
  write_file_atomic(path, j.dump(2) + "\n");
}
}  // namespace

void write_derived_checkpoint(const fs::path& src, const fs::path& out, bool force,
                              const std::vector<NamedTensor>& tensors, const std::string& config_text,
                              const std::string& record_name, const std::string& record_text) {
  write_checkpoint_dir(out, {src}, force, [&](const fs::path& tmp) {
    write_checkpoint(tmp, tensors, 5'000'000'000ull);
    for (const fs::path& f : non_weight_files(src))
      if (f.filename() != "config.json" && f.filename() != record_name) fs::copy_file(f, tmp / f.filename());
    write_file_atomic(tmp / "config.json", config_text);
    write_file_atomic(tmp / record_name, record_text);
  });
}

void convert_checkpoint(const fs::path& src, const fs::path& out, std::optional<DType> dtype,
                        uint64_t max_shard_bytes, bool force) {
  Checkpoint ckpt = Checkpoint::open(src);
  // What `check` refuses is not copied into an output called good: a config contradicting the
  // weights, or (with a dtype) a bitsandbytes checkpoint, whose U8 codes would stay while their
  // float32 scales became another dtype.
  check_text_decoder(Gemma4Config::load(src), ckpt, /*allow_bnb_4bit=*/!dtype);
  write_checkpoint_dir(out, {src}, force, [&](const fs::path& tmp) {
    std::vector<NamedTensor> tensors;
    for (const std::string& name : ckpt.names()) {
      Tensor t = ckpt.get(name);
      if (dtype && dtype_is_float(t.dtype()) && t.dtype() != *dtype) t = t.to(*dtype);
      tensors.push_back({name, t});
    }
    write_checkpoint(tmp, tensors, max_shard_bytes);
    for (const fs::path& f : non_weight_files(src)) fs::copy_file(f, tmp / f.filename());
    if (dtype && fs::exists(tmp / "config.json")) set_config_dtype(tmp / "config.json", *dtype);
    nlohmann::json record = {{"tool", "torchless-surgery convert"}, {"source", src.string()},
                             {"max_shard_bytes", max_shard_bytes}};
    if (dtype) record["dtype"] = std::string(dtype_name(*dtype));
    write_file_atomic(tmp / "torchless_convert.json", record.dump(2) + "\n");
  });
}

}  // namespace tl
