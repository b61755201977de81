// Test helper for huge_pages_test: calls ReexecForHugePageMalloc as the weight-loading programs
// do, then writes one 64 MiB malloc'd buffer (no madvise of its own) and prints
//   pid=<pid> tunables=<GLIBC_TUNABLES or -> marker=<the re-exec marker or -> comm=<its name>
//   huge_kib=<AnonHugePages over the buffer>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "common/huge_pages.h"

int main(int argc, char** argv) {
  (void)argc;
  dmoe::ReexecForHugePageMalloc(argv);
  std::vector<uint8_t> buf(size_t{64} << 20, 1);
  const uintptr_t lo = reinterpret_cast<uintptr_t>(buf.data()), hi = lo + buf.size();
  std::ifstream f("/proc/self/smaps");
  std::string line;
  bool in = false;
  unsigned long long kib = 0;
  while (std::getline(f, line)) {
    unsigned long a = 0, b = 0;
    char sep = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx%c", &a, &b, &sep) == 3 && sep == ' ') {
      in = a < hi && b > lo;
    } else if (in && line.rfind("AnonHugePages:", 0) == 0) {
      kib += std::strtoull(line.c_str() + 14, nullptr, 10);
    }
  }
  const char* t = std::getenv("GLIBC_TUNABLES");
  const char* marker = std::getenv("DMOE_REEXECUTED_FOR_HUGE_PAGES");
  std::string comm;
  std::getline(std::ifstream("/proc/self/comm"), comm);
  std::printf("pid=%d tunables=%s marker=%s comm=%s huge_kib=%llu\n", static_cast<int>(getpid()),
              t ? t : "-", marker ? marker : "-", comm.c_str(), kib);
  return buf[12345] == 1 ? 0 : 1;
}
