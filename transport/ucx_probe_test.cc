// UcxSupportsCudaMemory answers from a real UCX context: Debian's UCX (this project's build) has
// no CUDA transports, so it says no here; a CUDA-enabled UCX (deploy/docker/gpu.Dockerfile) with
// a GPU says yes.
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

}  // namespace
}  // namespace dmoe::transport
