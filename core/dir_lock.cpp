#include "core/dir_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "core/tensor.h"

namespace tl {

namespace {
// The holder's own words ("pid 123 (torchless-train)"), or "" when it has not written them yet.
std::string holder_of(int fd) {
  char buf[256] = {};
  const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  std::string s(buf, n > 0 ? size_t(n) : 0);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\0')) s.pop_back();
  return s;
}

bool same_file(int fd, const fs::path& path) {
  struct stat a {}, b {};
  return ::fstat(fd, &a) == 0 && ::stat(path.c_str(), &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}
}  // namespace

DirLock::DirLock(DirLock&& o) noexcept : fd_(o.fd_), file_(std::move(o.file_)) { o.fd_ = -1; }

DirLock& DirLock::operator=(DirLock&& o) noexcept {
  if (this != &o) {
    release();
    fd_ = o.fd_;
    file_ = std::move(o.file_);
    o.fd_ = -1;
  }
  return *this;
}

DirLock DirLock::acquire(const fs::path& dir, const std::string& what) {
  const fs::path file = dir / kLockFileName;
  for (int attempt = 0; attempt < 100; ++attempt) {
    const int fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
      throw Error(fmt::format("{} {}: cannot create its lock file {}: {}", what, dir.string(), file.string(),
                              std::strerror(errno)));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      const std::string holder = err == EWOULDBLOCK ? holder_of(fd) : "";
      ::close(fd);
      if (err != EWOULDBLOCK)
        throw Error(fmt::format("{} {}: cannot lock {}: {}", what, dir.string(), file.string(), std::strerror(err)));
      throw Error(fmt::format("{} {} is in use by {} (it holds {}); wait for it to finish or stop it, or write "
                              "elsewhere",
                              what, dir.string(), holder.empty() ? "another process" : holder, file.string()));
    }
    // A holder releasing its lock removes the file first: the file locked here must still be
    // the one at the path, else another process may lock a new one beside it. Try again.
    if (!same_file(fd, file)) {
      ::close(fd);
      continue;
    }
    const std::string me = fmt::format("process {} ({})\n", ::getpid(), program_invocation_short_name);
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, me.data(), me.size(), 0) != ssize_t(me.size())) {
      const int err = errno;
      ::close(fd);
      throw Error(fmt::format("{} {}: cannot write its lock file {}: {}", what, dir.string(), file.string(),
                              std::strerror(err)));
    }
    DirLock l;
    l.fd_ = fd;
    l.file_ = file;
    return l;
  }
  throw Error(fmt::format("{} {}: its lock file {} keeps being replaced; is another writer starting?", what,
                          dir.string(), file.string()));
}

bool DirLock::held(const fs::path& dir) {
  const int fd = ::open((dir / kLockFileName).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool busy = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);  // also drops the shared lock taken when it was free
  return busy;
}

void DirLock::moved_to(const fs::path& dir) {
  if (fd_ >= 0) file_ = dir / kLockFileName;
}

void DirLock::release() {
  if (fd_ < 0) return;
  if (same_file(fd_, file_)) ::unlink(file_.c_str());
  ::close(fd_);
  fd_ = -1;
}

}  // namespace tl
