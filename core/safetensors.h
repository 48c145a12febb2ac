// safetensors I/O: single files (mmap, zero-copy views) and sharded checkpoints
// (`model.safetensors.index.json`). Format: 8-byte little-endian header length N, N bytes
// of JSON (space-padded), then the data buffer. Every fault is reported as tl::Error with
// one line naming the file and the fault.
#pragma once
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"

namespace tl {

namespace fs = std::filesystem;

struct TensorEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin = 0, end = 0;  // offsets in the data buffer
};

// One safetensors file, memory-mapped. Tensors returned by get() view the mapping and
// keep it alive.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const fs::path& path);
  // Parses an in-memory image (used by the fuzzer and by tests); `label` names it in errors.
  static SafetensorsFile parse(std::shared_ptr<const std::vector<uint8_t>> bytes,
                               const std::string& label);

  const fs::path& path() const { return path_; }
  // In the order the JSON header lists them (not offset order).
  const std::vector<TensorEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const;
  const TensorEntry& entry(const std::string& name) const;  // throws Error if absent
  // Zero-copy view of the read-only mapping (never write through it). A tensor not aligned
  // to its element size (possible only in files from other writers) comes back as a copy.
  Tensor get(const std::string& name) const;

 private:
  static SafetensorsFile from_image(std::shared_ptr<void> owner, const uint8_t* bytes,
                                    size_t size, const std::string& label);

  fs::path path_;
  std::shared_ptr<void> owner_;  // the mapping (or the byte vector)
  const uint8_t* data_ = nullptr;  // start of the data buffer
  std::vector<TensorEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A named tensor to write. Host tensors only.
struct NamedTensor {
  std::string name;
  Tensor tensor;
};

// The exact bytes the reference Python/Rust writer produces: tensors sorted by dtype
// (descending, safetensors enum order) then name, compact JSON header with
// `__metadata__` first, padded with spaces to a multiple of 8.
std::vector<uint8_t> serialize_safetensors(const std::vector<NamedTensor>& tensors,
                                           const std::map<std::string, std::string>& metadata =
                                               {{"format", "pt"}});

// Writes atomically: to `path.tmp`, fsync, then rename.
// An empty `metadata` writes no "__metadata__" key (Python's metadata=None).
void write_safetensors(const fs::path& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// As write_safetensors, for tensors made one at a time: `specs` give each tensor's name,
// dtype and shape (their Tensor may be shape-only); `produce(i)` returns tensor i's values
// when the writer reaches it, so only one produced tensor is alive at a time. Same bytes as
// write_safetensors of the produced tensors.
void write_safetensors_streamed(const fs::path& path, const std::vector<NamedTensor>& specs,
                                const std::function<Tensor(size_t)>& produce,
                                const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// Writes `bytes` to `path.tmp`, fsyncs, renames over `path`; on failure removes the tmp
// file and throws Error naming `path` and the system error.
void write_file_atomic(const fs::path& path, std::string_view bytes);

// A checkpoint directory: the shards named by `model.safetensors.index.json` when that
// exists, else `model.safetensors`. Looks tensors up by name across shards; the index's
// weight_map is authoritative (a tensor a shard holds but the map omits is not listed).
class Checkpoint {
 public:
  static Checkpoint open(const fs::path& dir);
  const fs::path& dir() const { return dir_; }
  std::vector<std::string> names() const;  // all tensor names, in natural_less order
  bool contains(const std::string& name) const;
  const TensorEntry& entry(const std::string& name) const;
  Tensor get(const std::string& name) const;
  const std::vector<SafetensorsFile>& files() const { return files_; }

 private:
  fs::path dir_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
};

// Writes a checkpoint split into shards of at most `max_shard_bytes` (greedy in the given
// order, as huggingface_hub splits). One shard: `model.safetensors`, no index. Several:
// `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` whose weight_map
// is ordered by name with layer indices compared numerically (layers.2 < layers.10).
// Creates `dir` if needed; removes weight files of an earlier save that this one replaces.
void write_checkpoint(const fs::path& dir, const std::vector<NamedTensor>& tensors,
                      uint64_t max_shard_bytes);

// Name order that compares digit runs as numbers: "layers.2.x" < "layers.10.x".
bool natural_less(const std::string& a, const std::string& b);

}  // namespace tl
