#include "common/huge_pages.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
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

}  // namespace dmoe
