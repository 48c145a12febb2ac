// core/output_dir.h: how an output path is spelled never changes which directory it names,
// and an output overlapping an input is refused.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "core/output_dir.h"
#include "core/tensor.h"

namespace tl {
namespace {

TEST(OutputDir, NormalisationIgnoresSpelling) {
  const fs::path d = fs::temp_directory_path() / ("tl_output_dir_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d / "a");
  fs::create_directory_symlink(d / "a", d / "link");
  const fs::path a = normalise_path(d / "a");
  EXPECT_EQ(a, fs::canonical(d / "a"));
  EXPECT_EQ(normalise_path((d / "a").string() + "/"), a);
  EXPECT_EQ(normalise_path(d / "a" / ".." / "a" / "."), a);
  EXPECT_EQ(normalise_path(d / "link"), a);
  EXPECT_EQ(normalise_path(d / "link" / "new/"), a / "new");
  fs::remove_all(d);
}

TEST(OutputDir, OverlapWithAnInputIsRefused) {
  const fs::path d = fs::temp_directory_path() / ("tl_output_dir_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d / "in/sub");
  auto refused = [&](const fs::path& out, const char* needle) {
    try {
      refuse_overlap(out, {d / "in"}, "output");
      ADD_FAILURE() << out << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  refused(d / "in/", "is the input");
  refused(d, "contains the input");
  refused(d / "in/sub/x", "lies inside the input");
  EXPECT_NO_THROW(refuse_overlap(d / "in2", {d / "in"}, "output"));  // a sibling sharing a prefix
  // --force replaces only our own outputs, and a failed fill leaves nothing behind.
  std::ofstream(d / "in/notes.txt") << "x";
  EXPECT_FALSE(looks_like_our_output(d / "in"));
  EXPECT_THROW(write_output_dir(d / "in", {}, true, [](const fs::path&) {}), Error);
  EXPECT_TRUE(fs::exists(d / "in/notes.txt"));
  EXPECT_THROW(write_output_dir(d / "o", {}, false, [](const fs::path&) { throw Error("disk full"); }), Error);
  for (const auto& e : fs::directory_iterator(d)) EXPECT_EQ(e.path().filename().string().find(".partial"), std::string::npos);
  fs::remove_all(d);
}

}  // namespace
}  // namespace tl
