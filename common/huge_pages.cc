#include "common/huge_pages.h"

#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>

namespace dmoe {

namespace {

// MADV_HUGEPAGE (then MADV_COLLAPSE when `collapse`) over [p, p + bytes) widened to whole 2 MiB
// extents; nothing when DMOE_HUGE_PAGES=0 or under 256 KiB.
void AdviseExtents(const void* p, size_t bytes, bool collapse) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  static const bool enabled = [] {
    const char* e = std::getenv("DMOE_HUGE_PAGES");
    return e == nullptr || std::string(e) != "0";
  }();
  if (!enabled || p == nullptr || bytes < (size_t{256} << 10)) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(kHuge - 1);
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + bytes + kHuge - 1) & ~(kHuge - 1);
  void* start = reinterpret_cast<void*>(a);
  (void)madvise(start, b - a, MADV_HUGEPAGE);
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
  if (collapse) (void)madvise(start, b - a, MADV_COLLAPSE);
}

}  // namespace

void UseHugePages(const void* p, size_t bytes) { AdviseExtents(p, bytes, true); }
void AdviseHugePages(const void* p, size_t bytes) { AdviseExtents(p, bytes, false); }

std::string HugePageMallocTunables(const char* tunables, const char* dmoe_huge_pages,
                                   const std::string& thp_mode) {
  if (dmoe_huge_pages != nullptr && std::string(dmoe_huge_pages) == "0") return "";
  // glibc acts on the tunable in `madvise` mode only (`always` gives huge pages anyway).
  if (thp_mode != "madvise") return "";
  const std::string now = tunables == nullptr ? "" : tunables;
  if (now.find("glibc.malloc.hugetlb=") != std::string::npos) return "";
  return now.empty() ? "glibc.malloc.hugetlb=1" : now + ":glibc.malloc.hugetlb=1";
}

std::string ThpMode() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  const std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t a = all.find('['), b = all.find(']');
  return a == std::string::npos || b == std::string::npos || b < a ? ""
                                                                   : all.substr(a + 1, b - a - 1);
}

void ReexecForHugePageMalloc(char** argv) {
  constexpr char kMarker[] = "DMOE_REEXECUTED_FOR_HUGE_PAGES";
  if (argv == nullptr || argv[0] == nullptr) return;
  if (std::getenv(kMarker) != nullptr) {  // this is the re-executed process: once is enough
    unsetenv(kMarker);
    // The kernel named the process after the path exec'd (/proc/self/exe: "exe"); ps, pgrep and
    // core file names go by this name.
    const char* slash = std::strrchr(argv[0], '/');
    prctl(PR_SET_NAME, slash == nullptr ? argv[0] : slash + 1, 0, 0, 0);
    return;
  }
  // Not in secure mode (setuid / file capabilities: glibc drops the tunable there), and not when
  // the dynamic loader itself is the program (ld.so ./dmoe-expert: /proc/self/exe is ld.so).
  if (getauxval(AT_SECURE) != 0 || getauxval(AT_BASE) == 0) return;
  const char* before = std::getenv("GLIBC_TUNABLES");
  const std::string v = HugePageMallocTunables(before, std::getenv("DMOE_HUGE_PAGES"), ThpMode());
  if (v.empty()) return;
  const std::string saved = before == nullptr ? "" : before;
  if (setenv("GLIBC_TUNABLES", v.c_str(), 1) != 0 || setenv(kMarker, "1", 1) != 0) return;
  execv("/proc/self/exe", argv);
  // exec failed: go on as we are, with the environment as it was.
  unsetenv(kMarker);
  if (before == nullptr) {
    unsetenv("GLIBC_TUNABLES");
  } else {
    setenv("GLIBC_TUNABLES", saved.c_str(), 1);
  }
}

}  // namespace dmoe
