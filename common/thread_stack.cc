#include "common/thread_stack.h"

#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace dmoe {
namespace {

// glibc's thread descriptor (struct pthread, 2304 bytes in 2.36) and static TLS surplus (1664
// bytes in 2.36) also come out of every thread's stack.
constexpr size_t kGlibcAllowance = 4096;
constexpr size_t kPage = 4096;

int AddTlsSegments(struct dl_phdr_info* info, size_t, void* data) {
  size_t& total = *static_cast<size_t*>(data);
  for (ElfW(Half) i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_TLS) total += ph.p_memsz + ph.p_align;
  }
  return 0;
}

}  // namespace

size_t StaticTlsReserve() {
  static const size_t reserve = [] {
    size_t tls = 0;
    dl_iterate_phdr(AddTlsSegments, &tls);
    return (tls + kGlibcAllowance + kPage - 1) / kPage * kPage;
  }();
  return reserve;
}

}  // namespace dmoe

// Interposes glibc's pthread_attr_setstacksize for the whole process (see thread_stack.h): the
// executable's definition comes first in symbol lookup, so libcivetweb's, gRPC's and OpenBLAS's
// calls land here. Sizes below PTHREAD_STACK_MIN go through unchanged, so they still fail.
extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t stacksize) noexcept {
  using SetStackSize = int (*)(pthread_attr_t*, size_t);
  static const SetStackSize glibc = [] {
    void* next = dlsym(RTLD_NEXT, "pthread_attr_setstacksize");
    if (next == nullptr) {
      std::fprintf(stderr, "dmoe: thread_stack: no pthread_attr_setstacksize after ours: %s\n",
                   dlerror());
      std::abort();
    }
    return reinterpret_cast<SetStackSize>(next);
  }();
  const size_t reserve = dmoe::StaticTlsReserve();
  if (stacksize < static_cast<size_t>(PTHREAD_STACK_MIN) || stacksize > SIZE_MAX - reserve) {
    return glibc(attr, stacksize);
  }
  return glibc(attr, stacksize + reserve);
}
