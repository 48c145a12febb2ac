// tl_safetensors_diff A B FRO_TOL MAX_TOL: compares two safetensors files (same names and
// shapes) and prints the relative difference of all tensors together, ‖a−b‖₂ / ‖a‖₂, and the
// largest per-tensor ‖a−b‖∞ / ‖a‖∞; exits 0 when they are at most FRO_TOL and MAX_TOL, 1
// otherwise (or when names or shapes differ). For CLI tests.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "core/safetensors.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: tl_safetensors_diff A.safetensors B.safetensors FRO_TOL MAX_TOL\n");
    return 2;
  }
  try {
    const auto a = tl::SafetensorsFile::open(argv[1]), b = tl::SafetensorsFile::open(argv[2]);
    const double fro_tol = std::atof(argv[3]), max_tol = std::atof(argv[4]);
    double d2 = 0, a2 = 0;
    if (a.entries().size() != b.entries().size()) {
      std::printf("different tensor counts: %zu vs %zu\n", a.entries().size(), b.entries().size());
      return 1;
    }
    double worst = 0;
    std::string worst_name;
    for (const auto& e : a.entries()) {
      if (!b.contains(e.name)) {
        std::printf("%s: missing from %s\n", e.name.c_str(), argv[2]);
        return 1;
      }
      const tl::Tensor x = a.get(e.name), y = b.get(e.name);
      if (x.shape() != y.shape()) {
        std::printf("%s: shapes differ\n", e.name.c_str());
        return 1;
      }
      double diff = 0, scale = 0;
      for (int64_t i = 0; i < x.numel(); ++i) {
        const double u = x.get(i), d = u - y.get(i);
        diff = std::max(diff, std::abs(d));
        scale = std::max(scale, std::abs(u));
        d2 += d * d;
        a2 += u * u;
      }
      const double rel = scale > 0 ? diff / scale : diff;
      if (!(rel <= worst)) worst = rel, worst_name = e.name;
    }
    const double fro = a2 > 0 ? std::sqrt(d2 / a2) : std::sqrt(d2);
    std::printf("relative difference %.3e over all %zu tensors, at most %.3e in one tensor (%s)\n", fro,
                a.entries().size(), worst, worst_name.c_str());
    return fro <= fro_tol && worst <= max_tol ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tl_safetensors_diff: %s\n", e.what());
    return 1;
  }
}
