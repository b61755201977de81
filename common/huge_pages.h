// Transparent huge pages (2 MiB) for buffers that decode streams through every step: the weights
// and the latent KV cache.
#ifndef DMOE_COMMON_HUGE_PAGES_H_
#define DMOE_COMMON_HUGE_PAGES_H_

#include <cstddef>
#include <string>
#include <vector>

namespace dmoe {

// Backs [p, p + bytes), widened to whole 2 MiB extents (heap neighbours included: the weights are
// allocated one after another while loading), with transparent huge pages: madvise MADV_HUGEPAGE,
// then MADV_COLLAPSE (Linux >= 6.1) so that pages already written are collapsed now rather than
// whenever khugepaged gets to them. Decode reads every weight once per step and 4 KiB pages cost
// it about a quarter of the read bandwidth (a TLB miss and a prefetcher restart every 4 KiB).
// Buffers under 256 KiB are left alone; DMOE_HUGE_PAGES=0 turns it off; errors are ignored
// (an older kernel or THP "never" only loses the speed).
void UseHugePages(const void* p, size_t bytes);
// MADV_HUGEPAGE alone over the same widened range, for one large buffer not yet written: its
// whole 2 MiB extents then fault in as 2 MiB pages, with no collapse (a copy of every 4 KiB page:
// ~2.4 s per GB on a 2-core machine) afterwards. Same switch and size floor. Not for many small
// buffers malloc places one after another (the weights): advised one by one before they were
// written, `small`'s int8 weights ended in 94 of 951 MiB of 2 MiB pages, where UseHugePages
// after the load gets nearly all.
void AdviseHugePages(const void* p, size_t bytes);
// Capacity for n elements in *v, advised for huge pages before anything is written to it.
template <class T>
void ReserveHugePages(std::vector<T>* v, size_t n) {
  v->reserve(n);
  AdviseHugePages(v->data(), n * sizeof(T));
}

// glibc's malloc backs its heap and its mmap'd chunks with transparent huge pages when
// GLIBC_TUNABLES holds glibc.malloc.hugetlb=1 (glibc >= 2.35, THP mode `madvise`; read once, at
// process start): the weights then fault in as 2 MiB pages while they load, where otherwise
// UseHugePages' collapse copies every 4 KiB page after it (`small` on 2 cores: int8 load 3.8 ->
// 1.2 s, bf16 3.4 -> 1.5 s, the same pages in the end). The GLIBC_TUNABLES value to run with,
// or "" when nothing is to change: DMOE_HUGE_PAGES=0, a THP mode other than `madvise`, or a
// hugetlb setting already there (the operator's choice stands). `tunables` / `dmoe_huge_pages`
// may be null (unset).
std::string HugePageMallocTunables(const char* tunables, const char* dmoe_huge_pages,
                                   const std::string& thp_mode);
// The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled ("" if unreadable).
std::string ThpMode();
// Called first in main() of the processes that load weights: re-executes the program once (same
// PID, arguments, environment and open files; /proc/self/exe, so a replaced binary on disk does
// not matter) with HugePageMallocTunables' GLIBC_TUNABLES when there is one, and names the new
// image after argv[0] again. Returns (the program goes on as it is) when there is none, in
// secure mode (setuid, file capabilities), when the program was started through ld.so, or when
// exec fails. Its children inherit the tunable. Under valgrind set DMOE_HUGE_PAGES=0 (the
// re-executed program would run outside it).
void ReexecForHugePageMalloc(char** argv);

}  // namespace dmoe

#endif  // DMOE_COMMON_HUGE_PAGES_H_
