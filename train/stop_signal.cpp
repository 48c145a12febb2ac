#include "train/stop_signal.h"

#include <fmt/format.h>

#include <atomic>
#include <csignal>

#include "train/trainer.h"

namespace tl {

namespace {
std::atomic<int> g_signal{0};
void on_signal(int sig) { g_signal.store(sig); }
}  // namespace

void install_stop_signals() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;  // the second signal: default action, immediate stop
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

int stop_signal() { return g_signal.load(); }
void request_stop(int sig) { g_signal.store(sig); }

bool Trainer::stop_if_signalled() {
  const int sig = stop_signal();
  if (sig == 0) return false;
  if (cfg_.save_steps <= 0 || state_.step % cfg_.save_steps != 0) save_checkpoint();
  interrupted_by = sig;
  log_ << fmt::format("interrupted by {} after step {}: saved checkpoint-{} (resume with resume_from_checkpoint: "
                      "auto)\n",
                      sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : fmt::format("signal {}", sig),
                      state_.step, state_.step)
       << std::flush;
  return true;
}

}  // namespace tl
