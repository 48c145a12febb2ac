// safetensors reader/writer. The reader enforces what the reference Rust reader
// (`SafeTensors::read_metadata` + `Metadata::validate`) enforces; the writer reproduces the
// bytes of its `prepare` + `serialize`, i.e. of Python's `save_file`. See formats.md §4.
#include "core/safetensors.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

namespace tl {

namespace {

using json = nlohmann::json;
constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference reader's MAX_HEADER_SIZE

// Keeps every message on one line, whatever bytes a file or a JSON error puts in it.
[[noreturn]] void fail(const std::string& label, std::string what) {
  std::replace_if(
      what.begin(), what.end(), [](char c) { return c == '\n' || c == '\r'; }, ' ');
  throw Error(label + ": " + what);
}

// JSON string literal. Without ensure_ascii nlohmann escapes exactly what serde_json (the
// Rust writer) escapes: quote, backslash and control characters, lowercase hex, UTF-8 copied.
// Throws json::type_error on invalid UTF-8.
std::string json_quote(const std::string& s) {
  return json(s).dump(-1, ' ', false, json::error_handler_t::strict);
}

// Names in messages: quoted and escaped so a hostile name cannot break the one-line rule.
std::string show(const std::string& name) {
  return json(name.substr(0, 200)).dump(-1, ' ', false, json::error_handler_t::replace);
}

// Strict UTF-8 (nlohmann's decoder rejects overlongs and surrogates, as Rust's from_utf8).
bool valid_utf8(const std::string& s) {
  try {
    json_quote(s);
    return true;
  } catch (const json::type_error&) {
    return false;
  }
}

// A JSON value that is a non-negative integer fitting in `max`.
bool as_uint(const json& v, uint64_t max, uint64_t* out) {
  if (v.is_number_unsigned())
    *out = v.get<uint64_t>();
  else if (v.is_number_integer() && v.get<int64_t>() >= 0)
    *out = uint64_t(v.get<int64_t>());
  else
    return false;
  return *out <= max;
}

std::string clip(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

// Parses the header JSON. nlohmann silently keeps the last of duplicate keys, but the
// reference reader rejects them, so a parser callback tracks the keys of each open object;
// it also records the top-level keys in file order (nlohmann::json sorts them). Nesting is
// capped like serde_json's recursion limit (128): a real header nests 3 deep, and dumping
// a deeper value into a message would recurse once per level.
json parse_header_json(std::string_view text, const std::string& label,
                       std::vector<std::string>* order) {
  std::vector<std::set<std::string>> open;
  auto cb = [&](int depth, json::parse_event_t ev, json& parsed) {
    if ((ev == json::parse_event_t::object_start || ev == json::parse_event_t::array_start) &&
        depth > 128)
      fail(label, "header JSON nests deeper than 128 levels");
    if (ev == json::parse_event_t::object_start) open.emplace_back();
    if (ev == json::parse_event_t::object_end) open.pop_back();
    if (ev == json::parse_event_t::key) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (!open.back().insert(k).second) fail(label, "duplicate key " + show(k) + " in the header");
      if (open.size() == 1) order->push_back(k);
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), cb);
  } catch (const json::exception& e) {
    std::string msg = e.what();
    if (auto p = msg.find("] "); p != std::string::npos) msg = msg.substr(p + 2);
    fail(label, "header is not valid JSON: " + msg);
  }
}

TensorEntry parse_entry(const std::string& name, const json& v, const std::string& label) {
  std::string who = "tensor " + show(name);
  if (!v.is_object()) fail(label, who + ": header entry is not an object: " + clip(v));
  TensorEntry e;
  e.name = name;
  auto dt = v.find("dtype"), sh = v.find("shape"), off = v.find("data_offsets");
  if (dt == v.end() || sh == v.end() || off == v.end())
    fail(label, who + ": header entry needs \"dtype\", \"shape\" and \"data_offsets\"");
  if (!dt->is_string()) fail(label, who + ": dtype is not a string: " + clip(*dt));
  auto dtype = dtype_from_name(dt->get_ref<const std::string&>());
  if (!dtype) fail(label, who + " has unknown or unsupported dtype " + clip(*dt));
  e.dtype = *dtype;
  if (!sh->is_array()) fail(label, who + ": shape is not an array: " + clip(*sh));
  // numel is accumulated left to right with overflow checks, as the Rust reader does; the
  // int64 bound also keeps shape_numel() (signed) free of overflow later.
  int64_t numel = 1;
  for (const json& d : *sh) {
    uint64_t u;
    if (!as_uint(d, uint64_t(std::numeric_limits<int64_t>::max()), &u))
      fail(label, who + ": shape must hold non-negative integers, got " + clip(*sh));
    e.shape.push_back(int64_t(u));
    if (__builtin_mul_overflow(numel, int64_t(u), &numel))
      fail(label, who + ": shape " + clip(*sh) + " overflows the element count");
  }
  uint64_t b = 0, en = 0;
  if (!off->is_array() || off->size() != 2 || !as_uint((*off)[0], UINT64_MAX, &b) ||
      !as_uint((*off)[1], UINT64_MAX, &en))
    fail(label,
         who + ": data_offsets must be [begin, end] non-negative integers, got " + clip(*off));
  if (en < b) fail(label, who + ": data_offsets " + clip(*off) + " end before they begin");
  e.begin = b;
  e.end = en;
  uint64_t need;
  if (__builtin_mul_overflow(uint64_t(numel), uint64_t(dtype_size(e.dtype)), &need))
    fail(label, who + ": shape " + shape_str(e.shape) + " overflows the byte count");
  if (en - b != need)
    fail(label, fmt::format("{}: shape {} of {} needs {} bytes but data_offsets [{}, {}] span {}",
                            who, shape_str(e.shape), dtype_name(e.dtype), need, b, en, en - b));
  return e;
}

}  // namespace

SafetensorsFile SafetensorsFile::from_image(std::shared_ptr<void> owner, const uint8_t* p,
                                            size_t size, const std::string& label) {
  if (size < 8)
    fail(label, fmt::format("file is {} bytes, too short for the 8-byte header length", size));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | p[i];
  if (n > kMaxHeaderBytes)
    fail(label, fmt::format("header length {} exceeds the limit of {} bytes", n, kMaxHeaderBytes));
  if (8 + n > size)
    fail(label, fmt::format("header length {} runs past the end of the file (size {})", n, size));
  std::string_view text(reinterpret_cast<const char*>(p + 8), n);
  if (text.empty() || text[0] != '{')
    fail(label, "header is not a JSON object (does not start with '{')");
  SafetensorsFile f;
  std::vector<std::string> order;
  json doc = parse_header_json(text, label, &order);
  if (!doc.is_object()) fail(label, "header is not a JSON object");

  for (const std::string& name : order) {
    const json& v = doc.at(name);
    if (name == "__metadata__") {
      if (!v.is_object()) fail(label, "__metadata__ is not a map of strings: " + clip(v));
      for (const auto& [k, s] : v.items()) {
        if (!s.is_string())
          fail(label, "__metadata__ value for key " + show(k) + " is not a string: " + clip(s));
        f.metadata_[k] = s.get<std::string>();
      }
      continue;
    }
    f.index_[name] = f.entries_.size();
    f.entries_.push_back(parse_entry(name, v, label));
  }

  // The entries, sorted by offsets, must tile the data buffer exactly.
  std::vector<const TensorEntry*> sorted;
  for (const auto& e : f.entries_) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(), [](const TensorEntry* a, const TensorEntry* b) {
    return std::pair(a->begin, a->end) < std::pair(b->begin, b->end);
  });
  uint64_t at = 0;
  const TensorEntry* prev = nullptr;
  for (const TensorEntry* e : sorted) {
    if (e->begin > at && !prev)
      fail(label, fmt::format("gap in the data buffer: bytes [0, {}) before tensor {} belong to "
                              "no tensor",
                              e->begin, show(e->name)));
    if (e->begin > at)
      fail(label, fmt::format("gap in the data buffer between tensor {} (ends at {}) and tensor "
                              "{} (begins at {})",
                              show(prev->name), at, show(e->name), e->begin));
    if (e->begin < at)
      fail(label,
           fmt::format("tensors {} [{}, {}) and {} [{}, {}) overlap in the data buffer",
                       show(prev->name), prev->begin, prev->end, show(e->name), e->begin, e->end));
    at = e->end;
    prev = e;
  }
  uint64_t have = size - 8 - n;  // bytes of data buffer in the file
  if (at > have)
    fail(label, fmt::format("data buffer is shorter than the offsets: tensor {} ends at data "
                            "byte {} but the file holds {} data bytes (file size {})",
                            show(prev->name), at, have, size));
  if (at < have)
    fail(label, fmt::format("{} trailing bytes after the data buffer (data ends at file byte {}, "
                            "file size {})",
                            have - at, 8 + n + at, size));
  f.owner_ = std::move(owner);
  f.data_ = p + 8 + n;
  return f;
}

SafetensorsFile SafetensorsFile::open(const fs::path& path) {
  const std::string label = path.string();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(label, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(label, "not a regular file");
  }
  size_t size = size_t(st.st_size);
  // mmap refuses length 0, and anything under 8 bytes is an error anyway.
  if (size < 8) {
    ::close(fd);
    fail(label, fmt::format("file is {} bytes, too short for the 8-byte header length", size));
  }
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);  // the mapping stays valid without the descriptor
  if (addr == MAP_FAILED) fail(label, std::string("cannot mmap: ") + std::strerror(err));
  std::shared_ptr<void> owner(addr, [size](void* a) { ::munmap(a, size); });
  SafetensorsFile f = from_image(owner, static_cast<const uint8_t*>(addr), size, label);
  f.path_ = path;
  return f;
}

SafetensorsFile SafetensorsFile::parse(std::shared_ptr<const std::vector<uint8_t>> bytes,
                                       const std::string& label) {
  const uint8_t* p = bytes->data();
  size_t size = bytes->size();
  SafetensorsFile f =
      from_image(std::const_pointer_cast<std::vector<uint8_t>>(bytes), p, size, label);
  f.path_ = label;
  return f;
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) > 0; }

const TensorEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail(path_.string(), "no tensor named " + show(name));
  return entries_[it->second];
}

Tensor SafetensorsFile::get(const std::string& name) const {
  const TensorEntry& e = entry(name);
  void* p = const_cast<uint8_t*>(data_ + e.begin);  // read-only mapping: never write to it
  Tensor view = Tensor::wrap(owner_, p, e.shape, e.dtype);
  // Our writer keeps every tensor aligned to its element size (8-byte padded header, wide
  // dtypes first); another writer's file may not, and typed access needs alignment.
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(e.dtype) != 0) return view.clone();
  return view;
}

// ----------------------------------------------------------------------------- writing

namespace {

struct Prepared {
  std::string head;                                  // 8-byte length + padded JSON header
  std::vector<std::pair<const void*, size_t>> data;  // tensor bytes in file order
  std::vector<size_t> order;                         // file order as indices into the input
};

Prepared prepare(const std::vector<NamedTensor>& tensors,
                 const std::map<std::string, std::string>& metadata, const std::string& label,
                 bool shapes_only = false) {
  std::vector<const NamedTensor*> order;
  std::set<std::string_view> names;
  for (const NamedTensor& t : tensors) {
    if (!names.insert(t.name).second) fail(label, "duplicate tensor name " + show(t.name));
    if (t.name == "__metadata__") fail(label, "\"__metadata__\" cannot name a tensor");
    if (!valid_utf8(t.name)) fail(label, "tensor name " + show(t.name) + " is not valid UTF-8");
    if (!t.tensor.defined() && !shapes_only) fail(label, "tensor " + show(t.name) + " is undefined");
    if (t.tensor.device() != Device::CPU)
      fail(label, "tensor " + show(t.name) + " is not in host memory");
    order.push_back(&t);
  }
  for (const auto& [k, v] : metadata)
    if (!valid_utf8(k) || !valid_utf8(v))
      fail(label, "metadata entry " + show(k) + " is not valid UTF-8");
  // Rust `prepare`: dtype descending in enum order, then name ascending (bytewise).
  std::sort(order.begin(), order.end(), [](const NamedTensor* a, const NamedTensor* b) {
    int ra = dtype_safetensors_rank(a->tensor.dtype()),
        rb = dtype_safetensors_rank(b->tensor.dtype());
    return ra != rb ? ra > rb : a->name < b->name;
  });
  // An empty map writes no "__metadata__" key, like Python's save_file(metadata=None).
  std::string h = "{";
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    for (auto it = metadata.begin(); it != metadata.end(); ++it)
      h += (it == metadata.begin() ? "" : ",") + json_quote(it->first) + ":" +
           json_quote(it->second);
    h += "}";
  }
  Prepared out;
  uint64_t offset = 0;
  for (const NamedTensor* t : order) {
    const Tensor& x = t->tensor;
    std::string shape;
    for (int64_t d : x.shape()) shape += (shape.empty() ? "" : ",") + std::to_string(d);
    size_t n = x.nbytes();
    h += fmt::format("{}{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                     h.size() > 1 ? "," : "", json_quote(t->name), dtype_name(x.dtype()), shape,
                     offset, offset + n);
    offset += n;
    out.data.emplace_back(x.raw(), n);
    out.order.push_back(size_t(t - tensors.data()));
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');
  uint64_t len = h.size();
  for (int i = 0; i < 8; ++i) out.head += char((len >> (8 * i)) & 0xff);
  out.head += h;
  return out;
}

// Writes to `path.tmp`, fsyncs, renames over `path`, then fsyncs the directory so the
// rename itself is durable. On failure the tmp file is removed. Readers never see a partial
// file, and existing mappings of the old file stay valid (its inode lives on).
void write_atomic(const fs::path& path, const std::vector<std::pair<const void*, size_t>>& chunks) {
  fs::path tmp = path;
  tmp += ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path.string(), "cannot create " + tmp.string() + ": " + std::strerror(errno));
  auto abort = [&](const std::string& what) {
    int err = errno;
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    fail(path.string(), what + ": " + std::strerror(err));
  };
  for (auto [p, n] : chunks) {
    auto* c = static_cast<const char*>(p);
    while (n > 0) {
      ssize_t w = ::write(fd, c, std::min<size_t>(n, size_t(1) << 30));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) abort("cannot write " + tmp.string());
      c += w;
      n -= size_t(w);
    }
  }
  if (::fsync(fd) != 0) abort("cannot fsync " + tmp.string());
  int rc = ::close(fd);
  fd = -1;
  if (rc != 0) abort("cannot close " + tmp.string());
  if (::rename(tmp.c_str(), path.c_str()) != 0) abort("cannot rename " + tmp.string() + " over it");
  fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace

std::vector<uint8_t> serialize_safetensors(const std::vector<NamedTensor>& tensors,
                                           const std::map<std::string, std::string>& metadata) {
  Prepared p = prepare(tensors, metadata, "serialize_safetensors");
  std::vector<uint8_t> out(p.head.begin(), p.head.end());
  for (auto [ptr, n] : p.data) {
    auto* c = static_cast<const uint8_t*>(ptr);
    if (n) out.insert(out.end(), c, c + n);
  }
  return out;
}

void write_safetensors(const fs::path& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Tensor bytes go straight from memory to the file: no second copy of a large model.
  Prepared p = prepare(tensors, metadata, path.string());
  std::vector<std::pair<const void*, size_t>> chunks{{p.head.data(), p.head.size()}};
  for (auto c : p.data)
    if (c.second) chunks.push_back(c);
  write_atomic(path, chunks);
}

void write_safetensors_streamed(const fs::path& path, const std::vector<NamedTensor>& specs,
                                const std::function<Tensor(size_t)>& produce,
                                const std::map<std::string, std::string>& metadata) {
  Prepared p = prepare(specs, metadata, path.string(), true);
  fs::path tmp = path;
  tmp += ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail(path.string(), "cannot create " + tmp.string() + ": " + std::strerror(errno));
  auto abort = [&](const std::string& what) {
    int err = errno;
    std::fclose(f);
    ::unlink(tmp.c_str());
    fail(path.string(), what + ": " + std::strerror(err));
  };
  if (std::fwrite(p.head.data(), 1, p.head.size(), f) != p.head.size()) abort("cannot write " + tmp.string());
  for (size_t k = 0; k < p.order.size(); ++k) {
    const size_t i = p.order[k];
    Tensor t;
    try {
      t = produce(i);
    } catch (...) {
      std::fclose(f);
      ::unlink(tmp.c_str());
      throw;
    }
    if (t.dtype() != specs[i].tensor.dtype() || t.shape() != specs[i].tensor.shape() || t.device() != Device::CPU)
      abort("produced tensor " + show(specs[i].name) + " does not match its declared dtype and shape");
    if (t.nbytes() && std::fwrite(t.raw(), 1, t.nbytes(), f) != t.nbytes()) abort("cannot write " + tmp.string());
  }
  if (std::fflush(f) != 0 || ::fsync(::fileno(f)) != 0) abort("cannot flush " + tmp.string());
  if (std::fclose(f) != 0) fail(path.string(), "cannot close " + tmp.string());
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    fail(path.string(), "cannot rename " + tmp.string() + " over it: " + std::strerror(errno));
  }
}

void write_file_atomic(const fs::path& path, std::string_view bytes) {
  write_atomic(path, {{bytes.data(), bytes.size()}});
}

}  // namespace tl
