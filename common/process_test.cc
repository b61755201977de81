#include "common/process.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>

#include "gtest/gtest.h"

namespace dmoe {
namespace {

std::string TempPath(const char* name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}

// A descriptor the launcher holds without O_CLOEXEC (a socket, a pipe) is not the child's: the
// child sees only stdin, stdout and stderr (the log).
TEST(ChildProcess, InheritsNoDescriptorButTheStandardThree) {
  const std::string held = TempPath("held_by_launcher");
  const int fd = open(held.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);  // no O_CLOEXEC
  ASSERT_GE(fd, 0);
  constexpr int kHigh = 201;
  ASSERT_EQ(dup2(fd, kHigh), kHigh);
  ASSERT_EQ(fcntl(kHigh, F_GETFD) & FD_CLOEXEC, 0);
  // The shell lists its own descriptors; `ls` runs in the shell's children, so /proc/$$ is read.
  ChildProcess child({"/bin/sh", "-c", "ls /proc/$$/fd; echo end"}, TempPath("child.log"));
  ASSERT_GT(child.pid(), 0);
  EXPECT_EQ(child.Wait(std::chrono::seconds(20)), 0) << child.Log();
  close(kHigh);
  close(fd);
  const std::string log = child.Log();
  EXPECT_EQ(log, "0\n1\n2\nend\n");
}

// A program that cannot be executed: the child says why in its log and exits 127.
TEST(ChildProcess, AProgramThatCannotRunExits127WithTheReason) {
  ChildProcess child({"/nonexistent/dmoe-no-such-program"}, TempPath("missing.log"));
  ASSERT_GT(child.pid(), 0);
  EXPECT_EQ(child.Wait(std::chrono::seconds(20)), 127);
  EXPECT_EQ(child.Log(),
            "cannot run /nonexistent/dmoe-no-such-program: No such file or directory\n");
}

}  // namespace
}  // namespace dmoe
