// Sharded checkpoints: `model.safetensors.index.json` + shards, as transformers and
// huggingface_hub read and write them (formats.md §4.2).
#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "core/safetensors.h"

namespace tl {

namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& label, std::string what) {
  std::replace_if(
      what.begin(), what.end(), [](char c) { return c == '\n' || c == '\r'; }, ' ');
  throw Error(label + ": " + what);
}

std::string show(const std::string& name) {
  return json(name.substr(0, 200)).dump(-1, ' ', false, json::error_handler_t::replace);
}

// Python's json.dumps string escaping (ensure_ascii=True): non-ASCII and DEL as \uXXXX with
// surrogate pairs, lowercase hex; nlohmann's ensure_ascii output is the same.
std::string py_json_quote(const std::string& s) {
  return json(s).dump(-1, ' ', true, json::error_handler_t::strict);
}

constexpr const char* kSingle = "model.safetensors";
constexpr const char* kIndex = "model.safetensors.index.json";

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path.string(), std::string("cannot open: ") + std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
}  // namespace

Checkpoint Checkpoint::open(const fs::path& dir) {
  Checkpoint c;
  c.dir_ = dir;
  std::error_code ec;
  if (!fs::exists(dir, ec)) fail(dir.string(), "no such checkpoint directory");
  if (!fs::is_directory(dir, ec)) fail(dir.string(), "not a directory");
  fs::path index = dir / kIndex;
  if (!fs::exists(index, ec)) {
    if (!fs::exists(dir / kSingle, ec))
      fail(dir.string(), std::string("no ") + kSingle + " or " + kIndex + " in the directory");
    c.files_.push_back(SafetensorsFile::open(dir / kSingle));
    for (const auto& e : c.files_[0].entries()) c.where_[e.name] = 0;
    return c;
  }
  const std::string label = index.string();
  json doc;
  try {
    doc = json::parse(read_text(index));
  } catch (const json::exception& e) {
    std::string msg = e.what();
    if (auto p = msg.find("] "); p != std::string::npos) msg = msg.substr(p + 2);
    fail(label, "not valid JSON: " + msg);
  }
  if (!doc.is_object() || !doc.contains("weight_map") || !doc["weight_map"].is_object())
    fail(label, "no \"weight_map\" object");
  // The weight_map is authoritative: tensors a shard holds but the map omits are not listed.
  std::map<std::string, size_t> shard_index;
  for (const auto& [name, v] : doc["weight_map"].items()) {
    if (!v.is_string()) fail(label, "weight_map entry " + show(name) + " is not a string");
    const std::string& shard = v.get_ref<const std::string&>();
    // Shards live next to the index; a path elsewhere is not a checkpoint we wrote or read.
    if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos)
      fail(label, "weight_map entry " + show(name) + " names " + show(shard) +
                      ", which is not a plain file name");
    auto [it, fresh] = shard_index.try_emplace(shard, c.files_.size());
    if (fresh) {
      if (!fs::exists(dir / shard, ec))
        fail(label, "shard " + show(shard) + " (holding tensor " + show(name) + ") does not exist");
      c.files_.push_back(SafetensorsFile::open(dir / shard));
    }
    if (!c.files_[it->second].contains(name))
      fail(label, "tensor " + show(name) + " is mapped to shard " + show(shard) +
                      ", which does not contain it");
    c.where_[name] = it->second;
  }
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  std::sort(out.begin(), out.end(), natural_less);
  return out;
}

bool Checkpoint::contains(const std::string& name) const { return where_.count(name) > 0; }

const TensorEntry& Checkpoint::entry(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end())
    fail(dir_.string(), "no tensor named " + show(name) + " in the checkpoint");
  return files_[it->second].entry(name);
}

Tensor Checkpoint::get(const std::string& name) const {
  entry(name);  // throws when absent
  return files_[where_.at(name)].get(name);
}

void write_checkpoint(const fs::path& dir, const std::vector<NamedTensor>& tensors,
                      uint64_t max_shard_bytes) {
  std::set<std::string_view> seen;
  for (const auto& t : tensors)
    if (!seen.insert(t.name).second) fail(dir.string(), "duplicate tensor name " + show(t.name));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(dir.string(), "cannot create the directory: " + ec.message());

  // huggingface_hub's split_state_dict_into_shards_factory, step for step: an oversized
  // tensor becomes its own shard at once (ahead of the shard still being filled), and a
  // tensor that would tip the current shard over the limit closes it first.
  std::vector<std::vector<const NamedTensor*>> shards;
  std::vector<const NamedTensor*> current;
  uint64_t current_bytes = 0, total = 0;
  for (const auto& t : tensors) {
    uint64_t n = t.tensor.nbytes();
    total += n;
    if (n > max_shard_bytes) {
      shards.push_back({&t});
      continue;
    }
    if (current_bytes + n > max_shard_bytes) {
      shards.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(&t);
    current_bytes += n;
  }
  if (!current.empty() || shards.empty()) shards.push_back(std::move(current));

  auto subset = [](const std::vector<const NamedTensor*>& s) {
    std::vector<NamedTensor> out;
    for (auto* t : s) out.push_back(*t);
    return out;
  };
  std::set<std::string> keep;
  if (shards.size() == 1) {
    // Written before the stale index goes, so every moment leaves one consistent checkpoint.
    write_safetensors(dir / kSingle, subset(shards[0]));
    fs::remove(dir / kIndex, ec);
    keep.insert(kSingle);
  } else {
    std::vector<std::pair<const std::string*, std::string>> map;  // tensor -> shard file
    for (size_t i = 0; i < shards.size(); ++i) {
      std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size());
      write_safetensors(dir / file, subset(shards[i]));
      for (auto* t : shards[i]) map.emplace_back(&t->name, file);
      keep.insert(file);
    }
    // Transformers writes json.dumps(index, indent=2, sort_keys=True) + "\n". We copy that
    // layout but order weight_map keys naturally (layers.2 before layers.10) where Python's
    // sort_keys would order them bytewise; JSON readers do not care, humans reading it do.
    std::sort(map.begin(), map.end(),
              [](const auto& a, const auto& b) { return natural_less(*a.first, *b.first); });
    std::string s = fmt::format(
        "{{\n  \"metadata\": {{\n    \"total_size\": {}\n  }},\n"
        "  \"weight_map\": {{\n",
        total);
    for (size_t i = 0; i < map.size(); ++i)
      s += "    " + py_json_quote(*map[i].first) + ": " + py_json_quote(map[i].second) +
           (i + 1 < map.size() ? ",\n" : "\n");
    s += "  }\n}\n";
    // Last, so an interrupted write never leaves an index naming shards not yet written.
    write_file_atomic(dir / kIndex, s);
    keep.insert(kIndex);
  }
  // Like save_pretrained, drop weight files of an earlier save that the new one replaces
  // (a stale model.safetensors or shard would otherwise be read instead, or alongside).
  static const std::regex kWeights(R"(model(-\d{5}-of-\d{5})?\.safetensors)");
  for (const auto& f : fs::directory_iterator(dir, ec)) {
    std::string name = f.path().filename().string();
    if (std::regex_match(name, kWeights) && !keep.count(name)) fs::remove(f.path(), ec);
  }
}

bool natural_less(const std::string& a, const std::string& b) {
  // Element-wise: a digit run is one element compared by value (leading zeros ignored); any
  // other byte compares as itself. Names equal in that order fall back to bytewise order,
  // which keeps this a strict weak ordering ("a01" vs "a1").
  size_t i = 0, j = 0;
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  while (i < a.size() && j < b.size()) {
    if (digit(a[i]) && digit(b[j])) {
      size_t ie = i, je = j;
      while (ie < a.size() && digit(a[ie])) ++ie;
      while (je < b.size() && digit(b[je])) ++je;
      size_t iz = i, jz = j;  // skip leading zeros
      while (iz + 1 < ie && a[iz] == '0') ++iz;
      while (jz + 1 < je && b[jz] == '0') ++jz;
      std::string_view x(a.data() + iz, ie - iz), y(b.data() + jz, je - jz);
      if (x.size() != y.size()) return x.size() < y.size();
      if (x != y) return x < y;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return uint8_t(a[i]) < uint8_t(b[j]);
      ++i;
      ++j;
    }
  }
  if ((i < a.size()) != (j < b.size())) return j < b.size();
  return a < b;
}

}  // namespace tl
