#include "train/run_dir.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <ostream>
#include <random>
#include <set>

#include "core/output_dir.h"
#include "core/safetensors.h"
#include "core/tensor.h"

namespace tl {

using nlohmann::json;

namespace {

// FNV-1a 64: h = (h ^ byte) · 1099511628211, from 14695981039346656037.
struct Fnv {
  uint64_t h = 14695981039346656037ull;
  void add(const char* p, size_t n) {
    for (size_t i = 0; i < n; ++i) h = (h ^ uint8_t(p[i])) * 1099511628211ull;
  }
};

std::string file_hash(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return "missing";
  Fnv f;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    f.add(buf.data(), size_t(in.gcount()));
  }
  return fmt::format("{:016x}", f.h);
}

bool checkpoint_name(const std::string& n, int64_t& step) {
  if (!n.starts_with("checkpoint-") || n.size() <= 11 || n.find_first_not_of("0123456789", 11) != std::string::npos)
    return false;
  step = std::stoll(n.substr(11));
  return true;
}

// The run_id a checkpoint records; "" when it has none or its state does not parse.
std::string checkpoint_run_id(const fs::path& dir) {
  std::ifstream in(dir / "trainer_state.json");
  if (!in) return "";
  try {
    json st = json::parse(in);
    return st.value("run_id", std::string());
  } catch (const json::exception&) {
    return "";
  }
}

// Removes a directory by first renaming it to a hidden name, so no moment leaves it
// half-deleted under its real name.
void remove_dir_atomically(const fs::path& dir, const std::function<void(const fs::path&)>& midway = {}) {
  std::mt19937_64 rng(std::random_device{}());
  const fs::path aside = dir.parent_path() / fmt::format(".{}.deleting-{:06x}", dir.filename().string(), rng() & 0xffffff);
  std::error_code ec;
  fs::rename(dir, aside, ec);
  if (ec) throw Error(fmt::format("{}: cannot remove: {}", dir.string(), ec.message()));
  if (midway) midway(aside);
  fs::remove_all(aside, ec);
}

}  // namespace

json run_identity_keys(const TrainConfig& c) {
  json lora = {{"r", c.lora.r}, {"alpha", c.lora.alpha}, {"dropout", c.lora.dropout},
               {"use_rslora", c.lora.use_rslora}, {"target_modules", c.lora.target_modules},
               {"target_regex", c.lora.target_regex ? json(*c.lora.target_regex) : json(nullptr)},
               {"rank_pattern", c.lora.rank_pattern}, {"alpha_pattern", c.lora.alpha_pattern}};
  json datasets = json::array();
  for (const auto& d : c.datasets)
    datasets.push_back({{"path", normalise_path(d.path).string()}, {"bytes", file_hash(d.path)}, {"type", d.type},
                        {"field", d.field}, {"field_instruction", d.field_instruction},
                        {"field_input", d.field_input}, {"field_output", d.field_output},
                        {"field_messages", d.field_messages}, {"message_field_role", d.message_field_role},
                        {"message_field_content", d.message_field_content}, {"roles_to_train", d.roles_to_train}});
  json j = {{"base_model", normalise_path(c.base_model).string()},
            {"base_config", file_hash(fs::path(c.base_model) / "config.json")},
            {"adapter", c.adapter}, {"load_in_4bit", c.load_in_4bit}, {"double_quant", c.double_quant},
            {"lora", c.adapter == "full" ? json(nullptr) : lora}, {"full_train_layers", c.full_train_layers},
            {"sequence_len", c.sequence_len}, {"sample_packing", c.sample_packing}, {"overlong", c.overlong},
            {"datasets", datasets}, {"train_on_inputs", c.train_on_inputs}, {"val_set_size", c.val_set_size},
            {"micro_batch_size", c.micro_batch_size}, {"gradient_accumulation_steps", c.gradient_accumulation_steps},
            {"num_epochs", c.num_epochs}, {"max_steps", c.max_steps}, {"learning_rate", c.learning_rate},
            {"lr_scheduler", c.lr_scheduler}, {"warmup_ratio", c.warmup_ratio}, {"warmup_steps", c.warmup_steps},
            {"cosine_min_lr_ratio", c.cosine_min_lr_ratio}, {"optimizer", c.optimizer},
            {"weight_decay", c.weight_decay}, {"adam_beta1", c.adam_beta1}, {"adam_beta2", c.adam_beta2},
            {"adam_epsilon", c.adam_epsilon}, {"max_grad_norm", c.max_grad_norm}, {"nan_policy", c.nan_policy},
            {"bf16", c.bf16}, {"seed", c.seed}};
  // Only with distillation on, so the identity of every other run stays what it was.
  if (!c.distill_from.empty())
    j["distill"] = {{"from", c.distill_from == "auto" ? c.distill_from : normalise_path(c.distill_from).string()},
                    {"alpha", c.distill_alpha}, {"temperature", c.distill_temperature}, {"top_k", c.distill_top_k}};
  return j;
}

std::string run_identity(const json& keys) {
  const std::string text = keys.dump();
  Fnv f;
  f.add(text.data(), text.size());
  return fmt::format("{:016x}", f.h);
}


namespace {
void key_differences(const json& a, const json& b, const std::string& path, std::vector<std::string>& out) {
  if (a == b) return;
  if (a.is_object() && b.is_object()) {
    std::set<std::string> keys;
    for (const auto& [k, v] : a.items()) keys.insert(k);
    for (const auto& [k, v] : b.items()) keys.insert(k);
    for (const std::string& k : keys)
      key_differences(a.contains(k) ? a[k] : json(), b.contains(k) ? b[k] : json(), path.empty() ? k : path + "." + k,
                      out);
    return;
  }
  if (a.is_array() && b.is_array() && a.size() == b.size()) {
    for (size_t i = 0; i < a.size(); ++i) key_differences(a[i], b[i], fmt::format("{}[{}]", path, i), out);
    return;
  }
  auto shown = [](const json& v) {
    std::string t = v.is_null() ? "unset" : v.dump();
    return t.size() > 60 ? t.substr(0, 57) + "..." : t;
  };
  if (path.ends_with("bytes") || path == "base_config")
    out.push_back(fmt::format("{} (the file's contents changed)", path));
  else
    out.push_back(fmt::format("{} {} → {}", path, shown(a), shown(b)));
}
}  // namespace

std::string run_key_differences(const json& recorded, const json& now) {
  if (!recorded.is_object()) return "";
  std::vector<std::string> diffs;
  key_differences(recorded, now, "", diffs);
  return fmt::format("{}", fmt::join(diffs, ", "));
}

std::vector<std::pair<int64_t, fs::path>> run_checkpoints(const fs::path& out, const std::string& id) {
  std::vector<std::pair<int64_t, fs::path>> all;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(out, ec)) {
    int64_t step = 0;
    if (e.is_directory() && checkpoint_name(e.path().filename().string(), step) && checkpoint_run_id(e.path()) == id)
      all.push_back({step, e.path()});
  }
  std::sort(all.begin(), all.end());
  return all;
}

void prune_run_checkpoints(const fs::path& out, const std::string& id, int64_t limit,
                           const std::function<void(const fs::path&)>& midway) {
  if (limit <= 0) return;
  auto all = run_checkpoints(out, id);
  for (size_t i = 0; i + size_t(limit) < all.size(); ++i) remove_dir_atomically(all[i].second, midway);
}

fs::path prepare_run_dir(const TrainConfig& cfg, const json& keys, std::ostream& log, DirLock& lock) {
  const std::string id = run_identity(keys);
  const fs::path out = normalise_path(cfg.output_dir);
  // Every folder and file the run reads: the model, the data, and the models it measures or
  // distils from.
  std::vector<fs::path> inputs{cfg.base_model};
  for (const auto& d : cfg.datasets) inputs.push_back(d.path);
  for (const std::string& dir : {cfg.upscale_from, cfg.eval_reference_model, cfg.distill_from})
    if (!dir.empty() && dir != "auto") inputs.push_back(dir);
  refuse_overlap(out, inputs, "output_dir");
  const std::string file = cfg.source.string();
  std::error_code ec;
  if (fs::exists(out, ec) && !fs::is_directory(out, ec))
    throw Error(fmt::format("{}: output_dir {} exists and is not a directory", file, out.string()));
  if (fs::is_directory(out, ec) && !fs::is_empty(out, ec)) {
    // Ours: a run record, a checkpoint, metrics or an adapter we wrote.
    bool ours = looks_like_our_output(out) || fs::exists(out / "metrics.jsonl") ||
                fs::exists(out / "adapter_config.json");
    for (const auto& e : fs::directory_iterator(out, ec)) {
      int64_t step = 0;
      ours = ours || (e.is_directory() && checkpoint_name(e.path().filename().string(), step));
    }
    if (!ours)
      throw Error(fmt::format("{}: output_dir {} is not empty and holds no torchless run; refusing to write into it",
                              file, out.string()));
  }
  fs::create_directories(out, ec);
  if (ec) throw Error(fmt::format("{}: cannot create output_dir {}: {}", file, out.string(), ec.message()));
  // Before anything in it is read or changed: a second trainer (or a merge --force) on this
  // folder would log steps twice, race the run-identity check or delete this run's files.
  lock = DirLock::acquire(out, fmt::format("{}: output_dir", file));

  // Leftovers of killed saves (.checkpoint-N.partial-*) and prunes (.checkpoint-N.deleting-*).
  for (const auto& e : fs::directory_iterator(out, ec)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.starts_with(".checkpoint-") &&
        (n.find(".partial-") != std::string::npos || n.find(".deleting-") != std::string::npos)) {
      fs::remove_all(e.path(), ec);
      log << fmt::format("removed {} (left by an interrupted save)\n", e.path().string());
    }
  }

  // Another run: checkpoints that are not this run's, or a run record with another id.
  std::string other, differs;
  std::vector<fs::path> foreign;
  for (const auto& e : fs::directory_iterator(out, ec)) {
    int64_t step = 0;
    if (!e.is_directory() || !checkpoint_name(e.path().filename().string(), step)) continue;
    json st;
    if (std::ifstream in(e.path() / "trainer_state.json"); in) {
      try {
        st = json::parse(in);
      } catch (const json::exception& x) {
        // Perhaps this very run's checkpoint, damaged: no advice that would delete it. Asked to
        // overwrite the folder, it goes with the rest.
        if (!cfg.overwrite_output_dir)
          throw Error(fmt::format("{}: {}/trainer_state.json is unreadable (truncated or edited? {}); repair it, or "
                                  "move {} out of output_dir {}, then run again",
                                  file, e.path().string(), x.what(), e.path().filename().string(), out.string()));
        st = json();
      }
    }
    const std::string rid = st.is_object() ? st.value("run_id", std::string()) : std::string();
    if (rid != id) {
      foreign.push_back(e.path());
      if (other.empty()) {
        other = fmt::format("{} is of run {}", e.path().filename().string(), rid.empty() ? "unknown" : rid);
        differs = run_key_differences(st.is_object() && st.contains("run_keys") ? st["run_keys"] : json(), keys);
      }
    }
  }
  if (std::ifstream in(out / "torchless_run.json"); in && other.empty()) {
    try {
      const json rec = json::parse(in);
      const std::string rid = rec.value("run_id", std::string());
      if (rid != id) {
        other = fmt::format("torchless_run.json names run {}", rid.empty() ? "?" : rid);
        differs = run_key_differences(rec.contains("keys") ? rec["keys"] : json(), keys);
      }
    } catch (const json::exception&) {
      other = "its torchless_run.json is unreadable";
    }
  }
  if (!other.empty() || (fs::exists(out / "metrics.jsonl") && !fs::exists(out / "torchless_run.json"))) {
    if (other.empty()) other = "metrics.jsonl of an unrecorded run";
    if (!cfg.overwrite_output_dir)
      throw Error(fmt::format("{}: output_dir {} belongs to another run ({}; this run is {}{}); choose another "
                              "output_dir or set overwrite_output_dir: true",
                              file, out.string(), other, id, differs.empty() ? "" : "; it differs in " + differs));
    for (const fs::path& d : foreign) remove_dir_atomically(d);
    for (const char* f : {"metrics.jsonl", "generations.jsonl", "adapter_config.json", "adapter_model.safetensors",
                          "trainable.safetensors"})
      fs::remove(out / f, ec);
    if (fs::is_directory(out / "model")) remove_dir_atomically(out / "model");
    log << fmt::format("overwrite_output_dir: removed another run's files from {}\n", out.string());
  }
  write_file_atomic(out / "torchless_run.json",
                    json{{"run_id", id}, {"config", cfg.source.string()}, {"keys", keys}}.dump(2) + "\n");
  return out;
}

int64_t append_line(const fs::path& file, const std::string& line) {
  const int fd = ::open(file.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(fmt::format("{}: cannot open for appending: {}", file.string(), std::strerror(errno)));
  const std::string bytes = line + "\n";
  const ssize_t n = ::write(fd, bytes.data(), bytes.size());
  const int write_errno = errno;
  const off_t end = ::lseek(fd, 0, SEEK_END);
  if (n != ssize_t(bytes.size())) {
    // A short write left part of a line: cut it off again, so the file holds whole lines.
    if (n > 0 && end >= n && ::ftruncate(fd, end - n) != 0) {
    }
    ::close(fd);
    throw Error(fmt::format("{}: cannot append a record: {}", file.string(),
                            n < 0 ? std::strerror(write_errno) : "short write (disk full?)"));
  }
  if (::close(fd) != 0) throw Error(fmt::format("{}: cannot append a record: {}", file.string(), std::strerror(errno)));
  return int64_t(end);
}

void truncate_metrics(const fs::path& file, int64_t bytes) {
  std::error_code ec;
  const bool exists = fs::exists(file, ec);
  if (exists && !fs::is_regular_file(file, ec)) {
    if (bytes == 0) return;  // a device or pipe the user pointed metrics.jsonl at
    throw Error(fmt::format("{}: is not a regular file; cannot resume its records", file.string()));
  }
  const int64_t size = exists ? int64_t(fs::file_size(file, ec)) : 0;
  if (size < bytes)
    throw Error(fmt::format("{}: is {} bytes, shorter than the {} the checkpoint recorded (edited or lost?); "
                            "refusing to resume",
                            file.string(), size, bytes));
  if (exists && size != bytes) fs::resize_file(file, uint64_t(bytes), ec);
  if (ec) throw Error(fmt::format("{}: cannot truncate: {}", file.string(), ec.message()));
}

}  // namespace tl
