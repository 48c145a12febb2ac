#include "core/output_dir.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <random>

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

const std::vector<std::string>& output_record_files() {
  static const std::vector<std::string> names = {"torchless_merge.json", "torchless_surgery.json",
                                                 "expert_drop_map.json", "torchless_convert.json",
                                                 "torchless_init.json",  "torchless_run.json",
                                                 "trainer_state.json"};
  return names;
}

bool looks_like_our_output(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  if (fs::is_empty(dir, ec)) return true;
  for (const std::string& name : output_record_files())
    if (fs::is_regular_file(dir / name, ec)) return true;
  return false;
}

fs::path write_output_dir(const fs::path& out_arg, const std::vector<fs::path>& inputs, bool force,
                          const std::function<void(const fs::path&)>& fill) {
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
  std::mt19937_64 rng(std::random_device{}());
  const fs::path tmp = parent / fmt::format(".{}.partial-{:06x}", out.filename().string(), rng() & 0xffffff);
  fs::create_directory(tmp, ec);
  if (ec) throw Error(fmt::format("{}: cannot create a temporary directory: {}", tmp.string(), ec.message()));
  try {
    fill(tmp);
    ::sync();
    if (exists) {
      // Renamed aside first so `out` is never a half-deleted directory under its real name.
      const fs::path old = parent / fmt::format(".{}.old-{:06x}", out.filename().string(), rng() & 0xffffff);
      fs::rename(out, old);
      fs::rename(tmp, out);
      fs::remove_all(old, ec);
    } else {
      fs::rename(tmp, out);
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
