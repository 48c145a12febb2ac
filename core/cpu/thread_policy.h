#pragma once
// How the CPU backend's OpenMP threads wait between parallel regions.
//
// libgomp's default lets an idle thread spin for ~300,000 iterations before it sleeps. On a
// quiet machine that saves a wake-up per region; on a shared one a spinning thread burns the
// time slice that the thread it waits for needs, and the step time multiplies. The 10-step
// demo heal on 2 cores (bench/under_load.sh, bench/README.md): libgomp's default 22.0 s alone,
// 97.4 s beside one busy process, 152 s for two heals at once; OMP_WAIT_POLICY=PASSIVE 25.7 s,
// 37.7 s and 33.3 s. Passive costs ~15% on an idle machine and saves 2.5-4.5x on a loaded
// one (CI, a shared box, ctest -j), so it is the default.
// libgomp reads its policy from the environment once, when the library loads, before main;
// so the tools set it and re-execute themselves, first thing in main.
#include <string>

namespace tl {

// The OMP_WAIT_POLICY torchless runs with when the user has set neither OMP_WAIT_POLICY nor
// GOMP_SPINCOUNT (either is respected as given: OMP_WAIT_POLICY=ACTIVE restores spinning).
inline constexpr const char* kDefaultWaitPolicy = "PASSIVE";

// If neither variable is set: sets OMP_WAIT_POLICY=kDefaultWaitPolicy and re-executes
// /proc/self/exe with the same arguments (never returns then). Returns if either is set, or
// if the re-execution is impossible (the process then runs with libgomp's default).
void apply_thread_wait_policy(char** argv);

// "2 OpenMP threads, OMP_WAIT_POLICY=PASSIVE (torchless' default; ...)": for the backend line.
std::string describe_threads();

}  // namespace tl
