#include "core/cpu/thread_policy.h"

#include <omp.h>
#include <unistd.h>

#include <cstdlib>

#include <fmt/format.h>

namespace tl {

namespace {
// Set beside OMP_WAIT_POLICY when torchless chose it, so the description can say whose it is
// (and child processes, which inherit both, say the same).
constexpr const char* kChosenMarker = "TORCHLESS_SET_OMP_WAIT_POLICY";
}  // namespace

void apply_thread_wait_policy(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr || std::getenv("GOMP_SPINCOUNT") != nullptr) return;
  // Set first: the re-executed process finds it and returns above, so this happens once.
  if (setenv("OMP_WAIT_POLICY", kDefaultWaitPolicy, 1) != 0 || setenv(kChosenMarker, "1", 1) != 0) return;
  execv("/proc/self/exe", argv);
  // Only reached if execv failed (no /proc): carry on with the policy the library loaded with.
  unsetenv("OMP_WAIT_POLICY");
  unsetenv(kChosenMarker);
}

std::string describe_threads() {
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  const char* spin = std::getenv("GOMP_SPINCOUNT");
  std::string wait;
  if (policy != nullptr && spin == nullptr && std::getenv(kChosenMarker) != nullptr)
    wait = fmt::format("OMP_WAIT_POLICY={} (torchless' default; set OMP_WAIT_POLICY or GOMP_SPINCOUNT to choose)",
                       policy);
  else if (policy != nullptr || spin != nullptr)
    wait = fmt::format("{}{}{} (from the environment)", policy ? fmt::format("OMP_WAIT_POLICY={}", policy) : "",
                       policy && spin ? ", " : "", spin ? fmt::format("GOMP_SPINCOUNT={}", spin) : "");
  else
    wait = "libgomp's default wait policy";
  return fmt::format("{} OpenMP threads, {}", omp_get_max_threads(), wait);
}

}  // namespace tl
