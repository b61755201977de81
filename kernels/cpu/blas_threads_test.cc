#include "kernels/cpu/blas_threads.h"

#include <sched.h>

#include <thread>

#include "gtest/gtest.h"
#include "kernels/cpu/thread_pool.h"

namespace dmoe::cpu {
namespace {

TEST(BlasThreads, SetsTheCountAndRefusesNegatives) {
  ASSERT_TRUE(SetBlasThreads(1).ok());
  EXPECT_EQ(BlasThreads(), 1);
  const int before = BlasThreads();
  ASSERT_TRUE(SetBlasThreads(0).ok());  // 0 leaves it as it is
  EXPECT_EQ(BlasThreads(), before);
  const absl::Status bad = SetBlasThreads(-2, "--blas-threads");
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("--blas-threads"), absl::string_view::npos) << bad.message();
}

// The same count sizes the kernel pool (one count for all of a process's compute); once the pool
// runs, another size is refused with a clear error and the pool keeps its size.
TEST(BlasThreads, SizesTheKernelPoolBeforeItsFirstUse) {
  ASSERT_TRUE(SetBlasThreads(1).ok());
  EXPECT_EQ(ThePool().size(), 1);
  int ran = 0;
  ThePool().Run(3, [&](int) { ++ran; });  // one thread: no race on `ran`
  EXPECT_EQ(ran, 3);
  EXPECT_TRUE(SetKernelThreads(1));
  EXPECT_FALSE(SetKernelThreads(2));
  const absl::Status late = SetBlasThreads(2, "--blas-threads");
  EXPECT_EQ(late.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(late.message().find("already runs with 1"), absl::string_view::npos) << late.message();
  EXPECT_EQ(ThePool().size(), 1);
}

TEST(BlasThreads, ShareDividesTheCpusThisProcessMayUse) {
  const int cpus = UsableCpus();
  EXPECT_GE(cpus, 1);
  EXPECT_LE(cpus, static_cast<int>(std::thread::hardware_concurrency()));
  EXPECT_EQ(BlasThreadsShare(1), cpus);
  EXPECT_EQ(BlasThreadsShare(cpus + 1), 1);  // never 0
  // Limited to one CPU, every share is 1.
  cpu_set_t saved, one;
  ASSERT_EQ(sched_getaffinity(0, sizeof(saved), &saved), 0);
  CPU_ZERO(&one);
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &saved)) {
      CPU_SET(c, &one);
      break;
    }
  }
  ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
  EXPECT_EQ(UsableCpus(), 1);
  EXPECT_EQ(BlasThreadsShare(1), 1);
  ASSERT_EQ(sched_setaffinity(0, sizeof(saved), &saved), 0);
}

}  // namespace
}  // namespace dmoe::cpu
