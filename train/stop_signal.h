// SIGINT / SIGTERM during training: the first one asks the trainer to finish the current
// step, save a checkpoint and exit with a message; the handler resets itself on entry
// (SA_RESETHAND), so a second signal takes the default action and stops at once.
#pragma once

namespace tl {

void install_stop_signals();
// The signal that asked to stop (SIGINT, SIGTERM), or 0.
int stop_signal();
// For tests: as if `sig` had arrived.
void request_stop(int sig);

}  // namespace tl
