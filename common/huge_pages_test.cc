// AdviseHugePages / ReserveHugePages on a buffer not yet written: its aligned 2 MiB extents fault
// in as huge pages (read back from /proc/self/smaps), where the same buffer without the advice
// gets 4 KiB pages under THP "madvise" (the mode that makes the advice matter).
#include "common/huge_pages.h"

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe {
namespace {

std::string ThpMode() {  // the bracketed word of .../transparent_hugepage/enabled
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t a = all.find('['), b = all.find(']');
  return a == std::string::npos || b == std::string::npos ? "" : all.substr(a + 1, b - a - 1);
}

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

}  // namespace
}  // namespace dmoe
