// core/output_dir.h: how an output path is spelled never changes which directory it names,
// and an output overlapping an input is refused.
#include <gtest/gtest.h>
#include <unistd.h>

#include <csignal>
#include <fstream>

#include "core/dir_lock.h"
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

// An output folder in use is locked; a second writer is refused naming the holder's pid; the
// lock goes with its holder and leaves no file behind.
TEST(OutputDir, LockRefusesASecondWriterNamingThePid) {
  const fs::path d = fs::temp_directory_path() / ("tl_dir_lock_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  {
    DirLock held = DirLock::acquire(d, "output_dir");
    EXPECT_TRUE(held.locked());
    EXPECT_TRUE(DirLock::held(d));
    try {
      DirLock::acquire(d, "output_dir");
      ADD_FAILURE() << "a second lock of " << d << " was granted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("is in use by process " + std::to_string(::getpid())), std::string::npos)
          << e.what();
    }
    // --force cannot replace a folder in use.
    EXPECT_THROW(write_output_dir(d, {}, true, [](const fs::path&) {}), Error);
  }
  EXPECT_FALSE(DirLock::held(d));
  EXPECT_FALSE(fs::exists(d / kLockFileName));  // released: the file goes with the lock
  EXPECT_NO_THROW(DirLock::acquire(d, "output_dir"));
  fs::remove_all(d);
}

// A write killed with SIGKILL leaves its hidden temporary; the next write of the same output
// removes it, and leaves alone one that a live writer holds.
TEST(OutputDirDeathTest, KilledWriteLeavesAPartialTheNextWriteRemoves) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // Not named by pid: the threadsafe style runs this test again in a child up to EXPECT_EXIT.
  const fs::path d = fs::temp_directory_path() / "tl_output_dir_killed_write";
  fs::remove_all(d);
  fs::create_directories(d);
  EXPECT_EXIT(write_output_dir(d / "M", {}, false,
                               [](const fs::path& tmp) {
                                 std::ofstream(tmp / "model.safetensors") << "half";
                                 std::raise(SIGKILL);
                               }),
              ::testing::KilledBySignal(SIGKILL), "");
  std::vector<fs::path> partials;
  for (const auto& e : fs::directory_iterator(d)) partials.push_back(e.path());
  ASSERT_EQ(partials.size(), 1u);
  EXPECT_EQ(partials[0].filename().string().rfind(".M.partial-", 0), 0u) << partials[0];
  // Another writer's partial of M, still at work (its lock held), must survive.
  fs::create_directories(d / ".M.partial-live01");
  DirLock live = DirLock::acquire(d / ".M.partial-live01", "output");
  fs::create_directories(d / ".Mx.partial-000001");  // another output's: not ours to remove
  write_output_dir(d / "M", {}, false, [](const fs::path& tmp) { std::ofstream(tmp / "model.safetensors") << "whole"; });
  EXPECT_FALSE(fs::exists(partials[0]));
  EXPECT_TRUE(fs::exists(d / ".M.partial-live01"));
  EXPECT_TRUE(fs::exists(d / ".Mx.partial-000001"));
  EXPECT_TRUE(fs::exists(d / "M/model.safetensors"));
  EXPECT_FALSE(fs::exists(d / "M" / kLockFileName));
  fs::remove_all(d);
}

}  // namespace
}  // namespace tl
