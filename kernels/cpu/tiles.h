// Row tiles of the packed register kernels (bf16 A32 / A16, int8 W8A8): how the x rows of a
// product are cut into tiles that each read a weight group once, and the software prefetch that
// keeps a multi-row tile fed.
//
// A tile's rows each follow their own chains (one accumulator per row and weight-row pair), so
// the cut never changes a row's bits: any tile sizes give the same results (batch invariance).
#ifndef DMOE_KERNELS_CPU_TILES_H_
#define DMOE_KERNELS_CPU_TILES_H_

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

namespace dmoe::cpu {

// How far ahead (bytes of the weight stream) a tile of 2 or more rows prefetches into L2.
// Measured on a Zen 4 (2 vCPUs; the 64 bf16 experts of 7 layers of the `small` preset, 6 rows
// each, fp32 activations): the hardware prefetcher alone fed the FMA units at about half their
// rate (90 GFLOP/s from memory; 200 over two experts' weights that stay in cache); prefetching
// 4-16 KiB ahead into L2 (_MM_HINT_T1) gave 170, into L1 (T0) 120-130. Single-row tiles (batch-1
// decode) read at the memory's rate without it and were ~6 % slower with it: they prefetch
// nothing.
inline constexpr int64_t kTilePrefetchBytes = 8192;

// Prefetches kLines cache lines at p + kTilePrefetchBytes: into L2 when a tile has T > 1 rows;
// with kSingleRows (the int8 kernels: see w8a8.cc) a single-row tile prefetches too, as
// non-temporal (_MM_HINT_NTA). A single row reads each weight line once, and 512-bit int8 dot
// products consume lines faster than the hardware prefetcher brings them. Measured on a Zen 4
// (2 vCPUs, one row of int8 W8A8, weights streamed from memory, alternating runs): lm_head
// 32000 x 1024 read 40-45 GB/s with T1 and 51-52 with NTA; a plain read of 4 MiB blocks by both
// cores 53-70 GB/s, a vpdpbusd stream 46-59 with T1, 54-70 with NTA, 47-65 without a prefetch.
template <int T, int kLines, bool kSingleRows = false>
__attribute__((always_inline)) inline void PrefetchTileWeights(const void* p) {
  const char* c = static_cast<const char*>(p) + kTilePrefetchBytes;
  if constexpr (T > 1) {
#pragma GCC unroll 8
    for (int i = 0; i < kLines; ++i) _mm_prefetch(c + 64 * i, _MM_HINT_T1);
  } else if constexpr (kSingleRows) {
#pragma GCC unroll 8
    for (int i = 0; i < kLines; ++i) _mm_prefetch(c + 64 * i, _MM_HINT_NTA);
  }
}

namespace tiles_internal {
template <int N, typename F>
inline void WithTileSize(int64_t n, const F& f) {
  if constexpr (N > 1) {
    if (n == N) {
      f(std::integral_constant<int, N>());
      return;
    }
    WithTileSize<N - 1>(n, f);
  } else {
    f(std::integral_constant<int, 1>());
  }
}
}  // namespace tiles_internal

// Cuts `rows` rows into as few tiles of at most kMax rows as cover them, as even as can be (7 rows
// under kMax = 6: 4 + 3, not 6 + 1: one pass over the weights each, the FMA units busy in both),
// and calls f(std::integral_constant<int, T>, first row) for each in order.
template <int kMax, typename F>
inline void ForEachTile(int64_t rows, const F& f) {
  const int64_t tiles = (rows + kMax - 1) / kMax;
  int64_t first = 0;
  for (int64_t j = 0; j < tiles; ++j) {
    const int64_t n = rows / tiles + (j < rows % tiles ? 1 : 0);
    tiles_internal::WithTileSize<kMax>(n, [&](auto t) { f(t, first); });
    first += n;
  }
}

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_TILES_H_
