// libFuzzer target for the safetensors reader and writer.
//   parse(input) either throws tl::Error or yields a file whose every tensor can be read;
//   re-serialising that file must parse back to the same names, dtypes, shapes, bytes and
//   metadata, and serialising it again must give the same bytes (the writer is canonical).
// Any other exception escaping, a sanitizer report or a failed check is a finding.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "core/safetensors.h"

namespace {

[[noreturn]] void die(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz_safetensors: %s: %s\n", what, detail.c_str());
  std::abort();
}

bool same(const tl::Tensor& a, const tl::Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && a.nbytes() == b.nbytes() &&
         (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);
}

void check_image(std::shared_ptr<const std::vector<uint8_t>> input) {
  tl::SafetensorsFile f;
  try {
    f = tl::SafetensorsFile::parse(input, "fuzz-input");
  } catch (const tl::Error&) {
    return;  // rejected cleanly: the expected outcome for most inputs
  }

  // Touch every byte of every tensor (ASan checks each read lies in the buffer).
  std::vector<tl::NamedTensor> tensors;
  uint64_t sum = 0;
  for (const auto& e : f.entries()) {
    tl::Tensor t = f.get(e.name);
    if (t.nbytes() != e.end - e.begin) die("size mismatch", e.name);
    const auto* p = static_cast<const uint8_t*>(t.raw());
    for (size_t i = 0; i < t.nbytes(); ++i) sum += p[i];
    tensors.push_back({e.name, t});
  }
  static volatile uint64_t sink;
  sink = sum;

  std::vector<uint8_t> out;
  tl::SafetensorsFile g;
  try {
    out = tl::serialize_safetensors(tensors, f.metadata());
    g = tl::SafetensorsFile::parse(std::make_shared<const std::vector<uint8_t>>(out),
                                   "reserialized");
  } catch (const tl::Error& e) {
    die("round trip of a valid file failed", e.what());
  }
  if (g.entries().size() != f.entries().size()) die("entry count changed", "");
  if (g.metadata() != f.metadata()) die("metadata changed", "");
  for (const auto& e : f.entries()) {
    if (!g.contains(e.name)) die("tensor lost", e.name);
    if (!same(f.get(e.name), g.get(e.name))) die("tensor changed", e.name);
  }
  std::vector<tl::NamedTensor> again;
  for (const auto& e : g.entries()) again.push_back({e.name, g.get(e.name)});
  if (tl::serialize_safetensors(again, g.metadata()) != out) die("writer is not canonical", "");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  check_image(std::make_shared<const std::vector<uint8_t>>(data, data + size));
  // Random mutations rarely keep the 8-byte header length consistent with the JSON, so also
  // try the input with that length rewritten to end at its last '}': this lets the fuzzer
  // reach the header checks and the round trip far more often.
  if (size > 8) {
    size_t last = size;
    while (last > 8 && data[last - 1] != '}') --last;
    if (last > 8) {
      auto fixed = std::make_shared<std::vector<uint8_t>>(data, data + size);
      uint64_t n = last - 8;
      for (int i = 0; i < 8; ++i) (*fixed)[i] = uint8_t(n >> (8 * i));
      if (!std::equal(fixed->begin(), fixed->begin() + 8, data)) check_image(fixed);
    }
  }
  return 0;
}
