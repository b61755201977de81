// AdviseHugePages / ReserveHugePages on a buffer not yet written: its aligned 2 MiB extents fault
// in as huge pages (read back from /proc/self/smaps), where the same buffer without the advice
// gets 4 KiB pages under THP "madvise" (the mode that makes the advice matter). The GLIBC_TUNABLES
// decision, and a real program re-executed with it: its plain malloc'd memory in 2 MiB pages.
#include "common/huge_pages.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe {
namespace {

uint64_t VmStat(const std::string& key) {
  std::ifstream f("/proc/vmstat");
  std::string k;
  uint64_t v = 0;
  while (f >> k >> v) {
    if (k == key) return v;
  }
  return 0;
}

// AnonHugePages (bytes) of the mappings of /proc/self/smaps that overlap [p, p + n).
uint64_t HugeBytesIn(const void* p, size_t n) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p), hi = lo + n;
  std::ifstream f("/proc/self/smaps");
  std::string line;
  bool in = false;
  uint64_t total = 0;
  while (std::getline(f, line)) {
    uintptr_t a = 0, b = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &a, &b) == 2 && line.find(':') > line.find(' ')) {
      in = a < hi && b > lo;
    } else if (in && line.rfind("AnonHugePages:", 0) == 0) {
      total += std::stoull(line.substr(14)) << 10;
    }
  }
  return total;
}

constexpr size_t kBytes = size_t{16} << 20;

TEST(HugePages, AdvisedBeforeWritingFaultsIn2MiBPages) {
  const std::string mode = ThpMode();
  if (mode == "never" || mode.empty()) GTEST_SKIP() << "transparent huge pages are off: " << mode;
  const uint64_t fallback = VmStat("thp_fault_fallback");
  std::vector<uint8_t> v;
  ReserveHugePages(&v, kBytes);
  v.resize(kBytes, 1);
  const uint64_t huge = HugeBytesIn(v.data(), v.size());
  if (huge == 0 && VmStat("thp_fault_fallback") > fallback) {
    GTEST_SKIP() << "the kernel found no free 2 MiB page (thp_fault_fallback rose)";
  }
  // The 2 MiB extents wholly inside the buffer: at least 14 of a 16 MiB buffer's.
  EXPECT_GE(huge, kBytes - (size_t{4} << 20)) << "huge bytes " << huge;
}

TEST(HugePages, WithoutTheAdviceMadviseModeGives4KiBPages) {
  if (ThpMode() != "madvise") GTEST_SKIP() << "THP mode is " << ThpMode() << ", not madvise";
  std::vector<uint8_t> v(kBytes, 1);
  EXPECT_EQ(0u, HugeBytesIn(v.data(), v.size()));
}

TEST(HugePages, MallocTunablesAreAddedOnlyWhereTheyHelpAndNotChosenAlready) {
  EXPECT_EQ("glibc.malloc.hugetlb=1", HugePageMallocTunables(nullptr, nullptr, "madvise"));
  EXPECT_EQ("glibc.malloc.hugetlb=1", HugePageMallocTunables("", "1", "madvise"));
  EXPECT_EQ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
            HugePageMallocTunables("glibc.malloc.arena_max=2", nullptr, "madvise"));
  EXPECT_EQ("", HugePageMallocTunables("glibc.malloc.hugetlb=0", nullptr, "madvise"));
  EXPECT_EQ("", HugePageMallocTunables(nullptr, "0", "madvise"));
  EXPECT_EQ("", HugePageMallocTunables(nullptr, nullptr, "always"));  // glibc ignores it there
  EXPECT_EQ("", HugePageMallocTunables(nullptr, nullptr, "never"));
  EXPECT_EQ("", HugePageMallocTunables(nullptr, nullptr, ""));
}

// Runs the probe with `env` prepended; returns its one line.
std::string RunProbe(const std::string& env) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const std::string bin =
      std::string(srcdir ? srcdir : ".") + "/dmoe/common/huge_page_malloc_probe";
  std::FILE* p = popen(("env -u GLIBC_TUNABLES " + env + " " + bin).c_str(), "r");
  if (p == nullptr) return "";
  char line[512] = {0};
  const bool got = std::fgets(line, sizeof(line), p) != nullptr;
  pclose(p);
  return got ? line : "";
}

uint64_t Field(const std::string& line, const std::string& key) {
  const size_t at = line.find(key + "=");
  return at == std::string::npos ? 0
                                 : std::strtoull(line.c_str() + at + key.size() + 1, nullptr, 10);
}

TEST(HugePages, ProgramsReexecuteThemselvesWithHugePageMalloc) {
  if (ThpMode() != "madvise") GTEST_SKIP() << "THP mode is " << ThpMode() << ", not madvise";
  const uint64_t fallback = VmStat("thp_fault_fallback");
  const std::string on = RunProbe("");
  EXPECT_NE(on.find("tunables=glibc.malloc.hugetlb=1 "), std::string::npos) << on;
  EXPECT_NE(on.find("marker=- comm=huge_page_mallo "), std::string::npos) << on;  // 15 chars
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)  // their own allocators
  if (VmStat("thp_fault_fallback") == fallback) {  // else the kernel had no free 2 MiB page
    // 64 MiB written through plain malloc: all but its unaligned ends in 2 MiB pages.
    EXPECT_GE(Field(on, "huge_kib"), 60u << 10) << on;
  }
#endif
  const std::string off = RunProbe("DMOE_HUGE_PAGES=0");
  EXPECT_NE(off.find("tunables=- marker=- "), std::string::npos) << off;
  EXPECT_EQ(0u, Field(off, "huge_kib")) << off;
  const std::string chosen = RunProbe("GLIBC_TUNABLES=glibc.malloc.hugetlb=0");
  EXPECT_NE(chosen.find("tunables=glibc.malloc.hugetlb=0 "), std::string::npos) << chosen;
}

}  // namespace
}  // namespace dmoe
