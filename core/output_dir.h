// The one discipline every tool that writes a directory follows (merge, surgery convert /
// expand / upscale / prune / init, the trainer's output_dir):
//   - the path is normalised first: absolute, symlinks resolved, no trailing slash, so
//     "M/", "./M" and a link to M all name the same directory;
//   - an output that is, contains, or lies inside any input is refused, even with --force;
//   - the directory is built in a sibling temporary and renamed into place;
//   - --force replaces only a directory that looks like one of our outputs (empty, or holding
//     one of the record files our tools write); anything else is refused;
//   - an output folder in use is locked (core/dir_lock.h): the temporary while it is built, the
//     directory --force replaces until it is gone, the trainer's output_dir for the whole run;
//     a second writer is refused naming the holder's pid;
//   - hidden temporaries a killed write of the same output left (.NAME.partial-*, .NAME.old-*)
//     are removed when the next write of it starts.
// A tool that writes a file (not a directory) checks it with check_output_file and writes it
// with write_file_atomic / write_safetensors (a temporary beside it, then a rename).
#pragma once
#include <filesystem>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace tl {

namespace fs = std::filesystem;

// Absolute, lexically normal, with every existing component's symlinks resolved and no
// trailing separator ("out/" → "/abs/out"). Throws tl::Error when `p` is empty.
fs::path normalise_path(const fs::path& p);

// Refuses `out` when, after normalising both, it equals an input, is an ancestor of one, or
// lies inside one (`what` names the output in the message: "--out", "output_dir").
void refuse_overlap(const fs::path& out, const std::vector<fs::path>& inputs, const std::string& what);

// An output file (`what` names it in messages: "--output", "--out"): normalised, refused when
// it is, contains or lies inside an input (a model directory, a prompts file, a symlink to
// either), when it is a directory, or when its folder does not exist. Returns the normalised
// path, which the caller writes atomically.
fs::path check_output_file(const fs::path& out, const std::vector<fs::path>& inputs, const std::string& what);

// Files whose presence marks a directory as written by a torchless tool.
const std::vector<std::string>& output_record_files();

// Empty, or holds one of output_record_files() (or, for the trainer, its run record).
bool looks_like_our_output(const fs::path& dir);

// The whole discipline: normalises `out`, refuses overlap with `inputs`, refuses an existing
// `out` without `force` (or one that is not ours even with it, or one another process holds
// locked), removes stale temporaries of `out` (saying so on `notes`), builds the result with
// `fill(tmp)` in a locked sibling temporary, and renames it into place. Returns the normalised
// path.
fs::path write_output_dir(const fs::path& out, const std::vector<fs::path>& inputs, bool force,
                          const std::function<void(const fs::path& tmp_dir)>& fill, std::ostream& notes = std::cout);

}  // namespace tl
