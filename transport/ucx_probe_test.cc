// UcxSupportsCudaMemory answers from a real UCX context: Debian's UCX (this project's build) has
// no CUDA transports, so it says no here; a CUDA-enabled UCX (deploy/docker/gpu.Dockerfile) with
// a GPU says yes.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "gtest/gtest.h"
#include "transport/ucx.h"

namespace dmoe::transport {
namespace {

TEST(UcxProbe, SaysWhetherCudaMemoryIsSupported) {
  setenv("UCX_NET_DEVICES", "lo", 1);
  auto cuda = UcxSupportsCudaMemory();
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  std::printf("UCX CUDA memory: %s\n", *cuda ? "supported" : "not supported");
  // A second context in the same process works the same (nothing is left behind).
  auto again = UcxSupportsCudaMemory();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, *cuda);
}

// Starts a server and a client where UCX has no transport to use (UCX_TLS names only RDMA ones,
// and this machine has none, or a typo); exits 0 when both starts failed with an error.
[[noreturn]] void StartWithoutATransport() {
  alarm(60);  // a hang ends the child with SIGALRM, failing the test
  setenv("UCX_TLS", "rc_verbs", 1);
  setenv("UCX_NET_DEVICES", "lo", 1);
  setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);
  auto server = NewUcxServer();
  auto client = NewUcxClient();
  std::fprintf(stderr, "server: %s\nclient: %s\n", server.status().ToString().c_str(),
               client.status().ToString().c_str());
  std::exit(!server.ok() && !client.ok() ? 0 : 3);
}

// A transport that cannot start is an error to its caller (naming the UCX step), never a crash or
// a hang: the half-built transport is torn down before its progress thread exists. That teardown
// handed its work to the missing thread: SIGSEGV (no worker to signal) or a wait forever.
TEST(UcxStart, FailureIsAnErrorNotACrashOrHang) {
  EXPECT_EXIT(StartWithoutATransport(), ::testing::ExitedWithCode(0), "client: UNAVAILABLE");
}

}  // namespace
}  // namespace dmoe::transport
