#include "core/output_dir.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <random>

#include "core/dir_lock.h"
#include "core/tensor.h"

namespace tl {

fs::path normalise_path(const fs::path& p) {
  if (p.empty()) throw Error("output path is empty");
  // weakly_canonical resolves symlinks in the part that exists and normalises the rest;
  // lexically_normal then drops a trailing "/" (which it keeps as an empty last element).
  fs::path n = fs::weakly_canonical(fs::absolute(p)).lexically_normal();
  if (n.has_relative_path() && n.filename().empty()) n = n.parent_path();
  return n;
}

namespace {
// Whether `inner` is `outer` or lies below it (both normalised).
bool within(const fs::path& inner, const fs::path& outer) {
  auto [o, i] = std::mismatch(outer.begin(), outer.end(), inner.begin(), inner.end());
  return o == outer.end();
}
}  // namespace

void refuse_overlap(const fs::path& out, const std::vector<fs::path>& inputs, const std::string& what) {
  const fs::path o = normalise_path(out);
  for (const fs::path& in : inputs) {
    if (in.empty()) continue;
    const fs::path i = normalise_path(in);
    if (o == i)
      throw Error(fmt::format("{} {} is the input {}; refusing to overwrite an input", what, o.string(), in.string()));
    if (within(i, o))
      throw Error(fmt::format("{} {} contains the input {}; refusing to overwrite an input", what, o.string(),
                              in.string()));
    if (within(o, i))
      throw Error(fmt::format("{} {} lies inside the input {}; write it elsewhere", what, o.string(), in.string()));
  }
}

fs::path check_output_file(const fs::path& out_arg, const std::vector<fs::path>& inputs, const std::string& what) {
  const fs::path out = normalise_path(out_arg);
  refuse_overlap(out, inputs, what);
  std::error_code ec;
  if (fs::is_directory(out, ec))
    throw Error(fmt::format("{} {} is a directory; give a file name", what, out.string()));
  if (!fs::is_directory(out.parent_path(), ec))
    throw Error(fmt::format("{} {}: its folder {} does not exist", what, out.string(), out.parent_path().string()));
  return out;
}

const std::vector<std::string>& output_record_files() {
  static const std::vector<std::string> names = {"torchless_merge.json", "torchless_surgery.json",
                                                 "expert_drop_map.json", "torchless_convert.json",
                                                 "torchless_init.json",  "torchless_run.json",
                                                 "trainer_state.json",   "report.json"};
  return names;
}

bool looks_like_our_output(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  // Empty, or empty but for a lock file a killed run of ours left (core/dir_lock.h).
  bool empty = true;
  for (const auto& e : fs::directory_iterator(dir, ec)) empty = empty && e.path().filename() == kLockFileName;
  if (empty && !ec) return true;
  for (const std::string& name : output_record_files())
    if (fs::is_regular_file(dir / name, ec)) return true;
  return false;
}

namespace {
// Hidden siblings a killed write of `out` left: .NAME.partial-* (a half-built output) and
// .NAME.old-* (the replaced one, renamed aside but not yet deleted). One whose lock a live
// process holds is another writer's, still at work, and is left alone.
void remove_stale_partials(const fs::path& out, std::ostream& notes) {
  const std::string name = out.filename().string();
  std::error_code ec;
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(out.parent_path(), ec)) {
    const std::string n = e.path().filename().string();
    if ((n.starts_with("." + name + ".partial-") || n.starts_with("." + name + ".old-")) &&
        e.is_directory(ec) && !e.is_symlink(ec) && !DirLock::held(e.path()))
      stale.push_back(e.path());
  }
  for (const fs::path& p : stale) {
    fs::remove_all(p, ec);
    if (!ec) notes << fmt::format("removed {} (left by an interrupted run)\n", p.string());
  }
}
}  // namespace

fs::path write_output_dir(const fs::path& out_arg, const std::vector<fs::path>& inputs, bool force,
                          const std::function<void(const fs::path&)>& fill, std::ostream& notes) {
  const fs::path out = normalise_path(out_arg);
  refuse_overlap(out, inputs, "output");
  std::error_code ec;
  const bool exists = fs::exists(fs::symlink_status(out, ec));
  if (exists) {
    if (!force)
      throw Error(fmt::format("{}: output directory exists (pass --force to replace it)", out.string()));
    if (!fs::is_directory(out, ec))
      throw Error(fmt::format("{}: exists and is not a directory; refusing to replace it", out.string()));
    if (!looks_like_our_output(out))
      throw Error(fmt::format("{}: --force replaces only a directory written by torchless (none of {} in it); "
                              "refusing to delete it",
                              out.string(), fmt::join(output_record_files(), ", ")));
  }
  const fs::path parent = out.parent_path();
  if (!fs::is_directory(parent, ec))
    throw Error(fmt::format("{}: parent directory does not exist", out.string()));
  // The directory replaced is locked from here until it is gone: a running trainer (or another
  // merge) that holds it refuses this write instead of losing its files under it.
  DirLock old_lock;
  if (exists) old_lock = DirLock::acquire(out, "output");
  remove_stale_partials(out, notes);
  std::mt19937_64 rng(std::random_device{}());
  const fs::path tmp = parent / fmt::format(".{}.partial-{:06x}", out.filename().string(), rng() & 0xffffff);
  fs::create_directory(tmp, ec);
  if (ec) throw Error(fmt::format("{}: cannot create a temporary directory: {}", tmp.string(), ec.message()));
  try {
    // Locked while it is built, so that another writer of the same output (which removes
    // stale partials when it starts) tells it from one a killed run left.
    DirLock tmp_lock = DirLock::acquire(tmp, "output");
    fill(tmp);
    ::sync();
    if (exists) {
      // Renamed aside first so `out` is never a half-deleted directory under its real name.
      const fs::path old = parent / fmt::format(".{}.old-{:06x}", out.filename().string(), rng() & 0xffffff);
      fs::rename(out, old);
      old_lock.moved_to(old);
      fs::rename(tmp, out);
      tmp_lock.moved_to(out);
      fs::remove_all(old, ec);
    } else if (::rename(tmp.c_str(), out.c_str()) != 0) {
      // Another writer made `out` while this one was filling: its result stays.
      if (errno == ENOTEMPTY || errno == EEXIST)
        throw Error(fmt::format("{}: appeared while this output was being written (another writer?); left as it "
                                "is, nothing written",
                                out.string()));
      throw fs::filesystem_error("rename", tmp, out, std::error_code(errno, std::generic_category()));
    } else {
      tmp_lock.moved_to(out);
    }
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw Error(fmt::format("{}: cannot write the output: {}", out.string(), e.code().message()));
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  return out;
}

}  // namespace tl
