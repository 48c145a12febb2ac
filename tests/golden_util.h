// Helpers for tests that compare against the transformers fixtures in tests/golden/.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>

#include "core/tensor.h"

namespace tl::test {

// The checkout the fixtures are read from: TL_SOURCE_DIR from the environment when set (a
// test binary that travels, scripts/gpu-check.sh), else where it was built.
inline std::string source_dir() {
  const char* env = std::getenv("TL_SOURCE_DIR");
  return env && *env ? std::string(env) : std::string(TL_SOURCE_DIR);
}
inline std::string golden(const std::string& rel) { return source_dir() + "/tests/golden/" + rel; }

struct Diff {
  double max_abs = 0, max_ref = 0;
  double rel() const { return max_ref > 0 ? max_abs / max_ref : max_abs; }
};

// max|a − b| and max|ref| over all elements; sizes must agree.
inline Diff compare(const Tensor& got, const Tensor& ref) {
  EXPECT_EQ(got.numel(), ref.numel());
  Diff d;
  int64_t n = std::min(got.numel(), ref.numel());
  for (int64_t i = 0; i < n; ++i) {
    double r = ref.get(i), g = got.get(i);
    d.max_abs = std::max(d.max_abs, std::isnan(g) ? INFINITY : std::abs(g - r));
    d.max_ref = std::max(d.max_ref, std::abs(r));
  }
  return d;
}

// A file's bytes.
inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// f must throw tl::Error whose one-line message contains `needle`.
inline void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected: " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << "error must be one line: " << e.what();
  }
}

}  // namespace tl::test
