// A thread that asks for a small stack gets that much usable stack even though OpenBLAS (linked
// here, as in every dmoe service) puts 60 KiB of static TLS on every thread's stack.
#include "common/thread_stack.h"

#include <cblas.h>
#include <link.h>
#include <pthread.h>

#include <cstddef>

#include "gtest/gtest.h"

namespace dmoe {
namespace {

int LargestTls(struct dl_phdr_info* info, size_t, void* data) {
  size_t& largest = *static_cast<size_t*>(data);
  for (ElfW(Half) i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type == PT_TLS && info->dlpi_phdr[i].p_memsz > largest) {
      largest = info->dlpi_phdr[i].p_memsz;
    }
  }
  return 0;
}

// Writes kUsed bytes of a stack array one page at a time from its top down, the order in which a
// growing stack meets its guard page, so an overflow faults instead of writing past the guard.
constexpr size_t kUsed = 64 << 10;
void* UseStack(void* out) {
  char buf[kUsed];
  volatile char* p = buf;
  for (size_t i = kUsed; i >= 4096; i -= 4096) p[i - 1] = 1;
  p[0] = 1;
  *static_cast<size_t*>(out) = kUsed;
  return nullptr;
}

TEST(ThreadStack, OpenBlasTlsIsInThisProcess) {
  // The hazard this library removes: without OpenBLAS loaded the other tests prove less.
  EXPECT_GE(openblas_get_num_threads(), 1);
  size_t largest = 0;
  dl_iterate_phdr(LargestTls, &largest);
  EXPECT_GE(largest, size_t{32} << 10) << "no module with a large static TLS is loaded";
  EXPECT_GE(StaticTlsReserve(), largest);
  EXPECT_EQ(StaticTlsReserve() % 4096, 0u);
}

TEST(ThreadStack, RequestedSizeIsRaisedByTheReserve) {
  pthread_attr_t attr;
  ASSERT_EQ(pthread_attr_init(&attr), 0);
  ASSERT_EQ(pthread_attr_setstacksize(&attr, 100 << 10), 0);
  size_t got = 0;
  ASSERT_EQ(pthread_attr_getstacksize(&attr, &got), 0);
  EXPECT_EQ(got, (size_t{100} << 10) + StaticTlsReserve());
  // Below the minimum still fails, as glibc documents.
  EXPECT_NE(pthread_attr_setstacksize(&attr, 1024), 0);
  pthread_attr_destroy(&attr);
}

// civetweb's workers ask for 100 KiB; with OpenBLAS's TLS carved out they had ~34 KiB, and this
// thread faulted on its guard page (the test process dies with SIGSEGV without the fix).
TEST(ThreadStack, HundredKibThreadCanUse64Kib) {
  pthread_attr_t attr;
  ASSERT_EQ(pthread_attr_init(&attr), 0);
  ASSERT_EQ(pthread_attr_setstacksize(&attr, 100 << 10), 0);
  pthread_t t;
  size_t used = 0;
  ASSERT_EQ(pthread_create(&t, &attr, UseStack, &used), 0);
  ASSERT_EQ(pthread_join(t, nullptr), 0);
  EXPECT_EQ(used, kUsed);
  pthread_attr_destroy(&attr);
}

}  // namespace
}  // namespace dmoe
