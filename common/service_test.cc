#include "common/service.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "gtest/gtest.h"

namespace dmoe {
namespace {

// A service outlives a write to a pipe whose reader has gone (its stdout, when whoever read it
// exited): the write fails with EPIPE; SIGPIPE's default action would have killed the process.
TEST(ServiceMain, AWriteToAClosedPipeFailsInsteadOfKillingTheService) {
  ServiceMain service("dmoe-test");
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
  close(fds[0]);
  const char byte = 'x';
  EXPECT_EQ(write(fds[1], &byte, 1), -1);
  EXPECT_EQ(errno, EPIPE);
  close(fds[1]);
}

}  // namespace
}  // namespace dmoe
