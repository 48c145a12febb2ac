// An output folder in use is locked: an advisory flock(2) on FOLDER/.torchless.lock, held for
// as long as the DirLock lives (the trainer's whole run; a merge's or surgery's whole write).
// The kernel drops the lock when the process dies, however it dies, so a kill -9 never leaves
// a folder locked; the file holds the holder's pid and program, so a second writer is refused
// with one line naming them. The file is removed when the lock is released (a waiting opener
// re-checks that the file it locked is still the one at the path, so removal cannot let two
// holders in).
#pragma once
#include <filesystem>
#include <string>

namespace tl {

namespace fs = std::filesystem;

inline constexpr const char* kLockFileName = ".torchless.lock";

class DirLock {
 public:
  DirLock() = default;
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;
  DirLock(DirLock&& o) noexcept;
  DirLock& operator=(DirLock&& o) noexcept;
  ~DirLock() { release(); }

  // Locks `dir` (an existing directory), or throws tl::Error, in one line:
  // "<what> <dir> is in use by process <pid> (<program>); …".
  static DirLock acquire(const fs::path& dir, const std::string& what);
  // Whether a live process holds `dir`'s lock (false without a lock file).
  static bool held(const fs::path& dir);

  bool locked() const { return fd_ >= 0; }
  // The folder was renamed to `dir` (the lock is on the file, which moved with it).
  void moved_to(const fs::path& dir);
  // Removes the lock file (when it is still this lock's) and drops the lock.
  void release();

 private:
  int fd_ = -1;
  fs::path file_;
};

}  // namespace tl
