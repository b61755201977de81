#include "kernels/cpu/invariant_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cmath>
#include <cstring>

#include "common/dtype.h"
#include "kernels/cpu/small_gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/tiles.h"

// This file must be compiled with -ffp-contract=off (kernels/cpu/BUILD): every fused
// multiply-add is written out, and nothing else may be fused behind our back.

namespace dmoe::cpu {
namespace {

// 0 portable, 1 AVX2+FMA, 2 AVX-512 (F+BW); g_forced caps it (tests), -1: the CPU's.
int CpuGemmLevel() {
  static const int level = [] {
    if (!CpuHasAvx2Fma()) return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? 2 : 1;
  }();
  return level;
}

std::atomic<int> g_forced{-1};

int GemmLevel() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced < 0 ? CpuGemmLevel() : std::min(forced, CpuGemmLevel());
}

bool Avx2() { return GemmLevel() >= 1; }

// The canonical reduction of 8 lanes.
inline float Lanes8(const float* l) {
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}

// ---- portable: the same orders with std::fma ----

// Weight element types of DotRows: fp32, or bf16 bits widened exactly to fp32 (so a bf16 matrix
// gives the same bits as its fp32 upcast).
struct F32W {
  using T = float;
  static float At(const float* p) { return *p; }
};
struct Bf16W {
  using T = uint16_t;
  static float At(const uint16_t* p) { return Bf16ToFloat(*p); }
};

template <typename W>
void DotRowsPortable(const float* x, int64_t m, int64_t ldx, const typename W::T* w, int64_t n0,
                     int64_t n1, int64_t ldw, int64_t k, float* y, int64_t ldy) {
  const int64_t k8 = k & ~int64_t{7};
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    for (int64_t o = n0; o < n1; ++o) {
      const typename W::T* wo = w + o * ldw;
      float lane[8] = {};
      for (int64_t j = 0; j < k8; j += 8) {
        for (int l = 0; l < 8; ++l) lane[l] = std::fma(xi[j + l], W::At(wo + j + l), lane[l]);
      }
      float s = Lanes8(lane);
      for (int64_t j = k8; j < k; ++j) s = std::fma(xi[j], W::At(wo + j), s);
      y[i * ldy + o] = s;
    }
  }
}

// A weight element widened exactly to fp32 (AxpyRows' fp32 and bf16 weights).
inline float WeightAt(const float* p) { return *p; }
inline float WeightAt(const uint16_t* p) { return Bf16ToFloat(*p); }

template <typename WT>
void AxpyRowsPortable(const float* x, int64_t m, int64_t ldx, const WT* w, int64_t k, int64_t ldw,
                      int64_t n0, int64_t n1, float* y, int64_t ldy, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    float* yi = y + i * ldy;
    if (!accumulate) std::fill(yi + n0, yi + n1, 0.0f);
    for (int64_t kk = 0; kk < k; ++kk) {
      const float a = x[i * ldx + kk];
      const WT* wk = w + kk * ldw;
      for (int64_t o = n0; o < n1; ++o) yi[o] = std::fma(a, WeightAt(wk + o), yi[o]);
    }
  }
}

// ---- AVX2 ----

__attribute__((target("avx2,fma"))) inline float HSum(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return Lanes8(l);
}

// HSum of 4 chains at once, in Lanes8's order: the halves added (l[i] + l[i + 4]), then
// neighbours, then pairs, by horizontal adds across the 4 (~10 instructions instead of ~60).
__attribute__((target("avx2,fma"))) inline __m128 HSum4(const __m256* v) {
  __m128 p[4];
  for (int i = 0; i < 4; ++i) {
    p[i] = _mm_add_ps(_mm256_castps256_ps128(v[i]), _mm256_extractf128_ps(v[i], 1));
  }
  return _mm_hadd_ps(_mm_hadd_ps(p[0], p[1]), _mm_hadd_ps(p[2], p[3]));
}

__attribute__((target("avx2,fma"))) inline __m256 Load8(const float* p) {
  return _mm256_loadu_ps(p);
}
__attribute__((target("avx2,fma"))) inline __m256 Load8(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// T rows of x against R rows of w; each of the T x R outputs is one 8-lane chain.
template <int T, int R, typename W>
__attribute__((target("avx2,fma"))) void DotTile(const float* x, int64_t ldx,
                                                 const typename W::T* w, int64_t ldw, int64_t k,
                                                 float* y, int64_t ldy) {
  __m256 acc[T][R];
#pragma GCC unroll 4
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t k8 = k & ~int64_t{7};
  for (int64_t j = 0; j < k8; j += 8) {
    __m256 xv[T];
#pragma GCC unroll 4
    for (int m = 0; m < T; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + j);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      // The same columns of the next R rows, one row pass ahead: a row of a few KiB is too short
      // for the hardware prefetcher to ramp up on before it ends (prefetches never fault).
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * ldw + j), _MM_HINT_T0);
      const __m256 wv = Load8(w + r * ldw + j);
#pragma GCC unroll 4
      for (int m = 0; m < T; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
    }
  }
  for (int m = 0; m < T; ++m) {
    alignas(16) float sums[R];
    if constexpr (R == 4) {
      _mm_store_ps(sums, HSum4(acc[m]));
    } else {
      for (int r = 0; r < R; ++r) sums[r] = HSum(acc[m][r]);
    }
    for (int r = 0; r < R; ++r) {
      float s = sums[r];
      for (int64_t j = k8; j < k; ++j)
        s = __builtin_fmaf(x[m * ldx + j], W::At(w + r * ldw + j), s);
      y[m * ldy + r] = s;
    }
  }
}

template <int R, typename W>
__attribute__((target("avx2,fma"))) void DotRowsOfW(const float* x, int64_t m, int64_t ldx,
                                                    const typename W::T* w, int64_t ldw, int64_t k,
                                                    float* y, int64_t ldy) {
  int64_t i = 0;
  for (; i + 3 <= m; i += 3) DotTile<3, R, W>(x + i * ldx, ldx, w, ldw, k, y + i * ldy, ldy);
  if (m - i == 2) DotTile<2, R, W>(x + i * ldx, ldx, w, ldw, k, y + i * ldy, ldy);
  if (m - i == 1) DotTile<1, R, W>(x + i * ldx, ldx, w, ldw, k, y + i * ldy, ldy);
}

template <typename W>
void DotRowsAvx2(const float* x, int64_t m, int64_t ldx, const typename W::T* w, int64_t n0,
                 int64_t n1, int64_t ldw, int64_t k, float* y, int64_t ldy) {
  int64_t o = n0;
  for (; o + 4 <= n1; o += 4) DotRowsOfW<4, W>(x, m, ldx, w + o * ldw, ldw, k, y + o, ldy);
  for (; o < n1; ++o) DotRowsOfW<1, W>(x, m, ldx, w + o * ldw, ldw, k, y + o, ldy);
}

// T rows of y, V vectors of 8 columns: acc[m][v] = fma(x[m, kk], w[kk, cols], acc) over kk.
template <int T, int V, typename WT>
__attribute__((target("avx2,fma"))) void AxpyTile(const float* x, int64_t ldx, const WT* w,
                                                  int64_t k, int64_t ldw, float* y, int64_t ldy,
                                                  bool accumulate) {
  __m256 acc[T][V];
#pragma GCC unroll 4
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      acc[m][v] = accumulate ? _mm256_loadu_ps(y + m * ldy + 8 * v) : _mm256_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m256 wv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) wv[v] = Load8(w + kk * ldw + 8 * v);
#pragma GCC unroll 4
    for (int m = 0; m < T; ++m) {
      const __m256 a = _mm256_broadcast_ss(x + m * ldx + kk);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[m][v] = _mm256_fmadd_ps(a, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < T; ++m)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(y + m * ldy + 8 * v, acc[m][v]);
}

template <int V, typename WT>
__attribute__((target("avx2,fma"))) void AxpyRowsOfCols(const float* x, int64_t m, int64_t ldx,
                                                        const WT* w, int64_t k, int64_t ldw,
                                                        float* y, int64_t ldy, bool accumulate) {
  int64_t i = 0;
  for (; i + 3 <= m; i += 3)
    AxpyTile<3, V>(x + i * ldx, ldx, w, k, ldw, y + i * ldy, ldy, accumulate);
  if (m - i == 2) AxpyTile<2, V>(x + i * ldx, ldx, w, k, ldw, y + i * ldy, ldy, accumulate);
  if (m - i == 1) AxpyTile<1, V>(x + i * ldx, ldx, w, k, ldw, y + i * ldy, ldy, accumulate);
}

template <typename WT>
__attribute__((target("avx2,fma"))) void AxpyRowsAvx2(const float* x, int64_t m, int64_t ldx,
                                                      const WT* w, int64_t k, int64_t ldw,
                                                      int64_t n0, int64_t n1, float* y, int64_t ldy,
                                                      bool accumulate) {
  int64_t o = n0;
  for (; o + 32 <= n1; o += 32) AxpyRowsOfCols<4>(x, m, ldx, w + o, k, ldw, y + o, ldy, accumulate);
  for (; o + 8 <= n1; o += 8) AxpyRowsOfCols<1>(x, m, ldx, w + o, k, ldw, y + o, ldy, accumulate);
  if (o < n1) {  // < 8 columns: the same chains, one scalar fma at a time
    for (int64_t i = 0; i < m; ++i) {
      float* yi = y + i * ldy;
      for (int64_t c = o; c < n1; ++c) {
        float acc = accumulate ? yi[c] : 0.0f;
        for (int64_t kk = 0; kk < k; ++kk)
          acc = __builtin_fmaf(x[i * ldx + kk], WeightAt(w + kk * ldw + c), acc);
        yi[c] = acc;
      }
    }
  }
}

// AVX-512: T rows of y, V vectors of 16 columns, the same per-element chains (AVX2's 3 x 4
// tile needs 17 registers of 16 and spills; this one keeps 4 x 64 outputs in 16 of 32).
// GCC 12 reports the intrinsics' own _mm512_undefined_* as uninitialized (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
__attribute__((target("avx512f,fma"))) inline __m512 Load16(const float* p) {
  return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f,fma"))) inline __m512 Load16(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

template <int T, int V, typename WT>
__attribute__((target("avx512f,fma"))) void AxpyTile512(const float* x, int64_t ldx, const WT* w,
                                                        int64_t k, int64_t ldw, float* y,
                                                        int64_t ldy, bool accumulate) {
  __m512 acc[T][V];
#pragma GCC unroll 4
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v)
      acc[m][v] = accumulate ? _mm512_loadu_ps(y + m * ldy + 16 * v) : _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 wv[V];
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) wv[v] = Load16(w + kk * ldw + 16 * v);
#pragma GCC unroll 4
    for (int m = 0; m < T; ++m) {
      const __m512 a = _mm512_set1_ps(x[m * ldx + kk]);
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[m][v] = _mm512_fmadd_ps(a, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < T; ++m)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(y + m * ldy + 16 * v, acc[m][v]);
}

template <int V, typename WT>
__attribute__((target("avx512f,fma"))) void AxpyRowsOfCols512(const float* x, int64_t m,
                                                              int64_t ldx, const WT* w, int64_t k,
                                                              int64_t ldw, float* y, int64_t ldy,
                                                              bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4)
    AxpyTile512<4, V>(x + i * ldx, ldx, w, k, ldw, y + i * ldy, ldy, accumulate);
  if (m - i == 3) AxpyTile512<3, V>(x + i * ldx, ldx, w, k, ldw, y + i * ldy, ldy, accumulate);
  if (m - i == 2) AxpyTile512<2, V>(x + i * ldx, ldx, w, k, ldw, y + i * ldy, ldy, accumulate);
  if (m - i == 1) AxpyTile512<1, V>(x + i * ldx, ldx, w, k, ldw, y + i * ldy, ldy, accumulate);
}

// Columns in blocks of 64, then 16; what is left (< 16 columns) through the AVX2 path.
template <typename WT>
__attribute__((target("avx512f,fma"))) void AxpyRowsAvx512(const float* x, int64_t m, int64_t ldx,
                                                           const WT* w, int64_t k, int64_t ldw,
                                                           int64_t n0, int64_t n1, float* y,
                                                           int64_t ldy, bool accumulate) {
  int64_t o = n0;
  // One row (a batch-1 decode's absorbed query): 256 columns at a time, so each weight row is read
  // as one contiguous piece instead of four 64-column ones a row apart. (Columns never share a
  // chain: the tiling does not change a bit.)
  for (; m == 1 && o + 256 <= n1; o += 256)
    AxpyTile512<1, 16>(x, ldx, w + o, k, ldw, y + o, ldy, accumulate);
  for (; o + 64 <= n1; o += 64)
    AxpyRowsOfCols512<4>(x, m, ldx, w + o, k, ldw, y + o, ldy, accumulate);
  for (; o + 16 <= n1; o += 16)
    AxpyRowsOfCols512<1>(x, m, ldx, w + o, k, ldw, y + o, ldy, accumulate);
  if (o < n1) AxpyRowsAvx2(x, m, ldx, w, k, ldw, o, n1, y, ldy, accumulate);
}

#pragma GCC diagnostic pop

__attribute__((target("avx2,fma"))) void FmaRowAvx2(int64_t n, float a, const float* x, float* y) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) y[i] = __builtin_fmaf(a, x[i], y[i]);
}

// Chunks of output columns, a multiple of `align`: one chunk when the work is small (waking the
// pool costs more), else about two per core.
int64_t Split(int64_t n, int64_t work, int64_t align, int64_t* per) {
  const int64_t chunks =
      work < (int64_t{1} << 17)
          ? 1
          : std::min<int64_t>(ThePool().size() * 2, std::max<int64_t>(1, n / (2 * align)));
  *per = ((n + chunks - 1) / chunks + align - 1) / align * align;
  return (n + *per - 1) / *per;
}

// ---- packed bf16 (kPackRows rows interleaved per 8 columns; invariant_gemm.h) ----

inline int64_t PackedAt(int64_t o, int64_t j, int64_t k) {
  return (o / kPackRows) * kPackRows * k + (j / 8) * kPackRows * 8 + (o % kPackRows) * 8 + j % 8;
}

void DotPackedPortable(const float* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t n0,
                       int64_t n1, int64_t k, float* y, int64_t ldy) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    for (int64_t o = n0; o < n1; ++o) {
      float lane[8] = {};
      for (int64_t j = 0; j < k; j += 8) {
        const uint16_t* b = w + PackedAt(o, j, k);
        for (int l = 0; l < 8; ++l) lane[l] = std::fma(xi[j + l], Bf16ToFloat(b[l]), lane[l]);
      }
      y[i * ldy + o] = Lanes8(lane);
    }
  }
}

// T rows of x against one group of 8 weight rows, read as one stream: 8 chains of 8 lanes.
template <int T>
__attribute__((target("avx2,fma"))) void PackedTileAvx2(const float* x, int64_t ldx,
                                                        const uint16_t* w, int64_t k, float* y,
                                                        int64_t ldy) {
  __m256 acc[T][kPackRows];
#pragma GCC unroll 4
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < kPackRows; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < k; j += 8, w += kPackRows * 8) {
    __m256 xv[T];
#pragma GCC unroll 4
    for (int m = 0; m < T; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + j);
#pragma GCC unroll 8
    for (int r = 0; r < kPackRows; ++r) {
      const __m256 wv = Load8(w + 8 * r);
#pragma GCC unroll 4
      for (int m = 0; m < T; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
    }
  }
  for (int m = 0; m < T; ++m)
    for (int r = 0; r < kPackRows; ++r) y[m * ldy + r] = HSum(acc[m][r]);
}

// GCC 12 reports the intrinsics' own _mm512_undefined_* as uninitialized (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The 8 rows of a group from its 4 accumulators (row 2v in lanes 0-7 of acc[v], row 2v + 1 in
// lanes 8-15), each Lanes8's sums in Lanes8's order but 8 rows at a time: lanes i and i + 4
// (quarters swapped), then neighbours, then pairs; each row's total lands in the first lane of
// its half, and three permutes gather the 8 totals. ~30 instructions per group instead of a store
// and 8 scalar reductions (~130), which had held back the next group's loads at batch 1.
static_assert(kPackRows == 8, "StoreGroupLanes8 gathers 4 registers of 2 rows");
__attribute__((target("avx512f,avx2"))) inline void StoreGroupLanes8(const __m512* acc, float* y) {
  __m512 r[kPackRows / 2];
#pragma GCC unroll 4
  for (int v = 0; v < kPackRows / 2; ++v) {
    const __m512 a = _mm512_add_ps(acc[v], _mm512_shuffle_f32x4(acc[v], acc[v], 0xb1));
    const __m512 b = _mm512_add_ps(a, _mm512_permute_ps(a, 0xb1));
    r[v] = _mm512_add_ps(b, _mm512_permute_ps(b, 0x4e));
  }
  const __m512i firsts = _mm512_setr_epi32(0, 8, 16, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i halves = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512 lo = _mm512_permutex2var_ps(r[0], firsts, r[1]);
  const __m512 hi = _mm512_permutex2var_ps(r[2], firsts, r[3]);
  _mm256_storeu_ps(y, _mm512_castps512_ps256(_mm512_permutex2var_ps(lo, halves, hi)));
}

// AVX-512: one register holds two weight rows' 8 columns (lanes 0-7 and 8-15) against the same
// 8 columns of x in both halves, so each lane still follows its row's chain.
template <int T>
__attribute__((target("avx512f,avx512bw,avx2,fma"))) void PackedTileAvx512(
    const float* x, int64_t ldx, const uint16_t* w, int64_t k, float* y, int64_t ldy) {
  constexpr int kV = kPackRows / 2;
  __m512 acc[T][kV];
#pragma GCC unroll 8
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < kV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += 8, w += kPackRows * 8) {
    PrefetchTileWeights<T, 2>(w);  // this step's 128 bytes, kTilePrefetchBytes on
    __m512 xv[T];
#pragma GCC unroll 8
    for (int m = 0; m < T; ++m) {
      xv[m] = _mm512_castpd_ps(
          _mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(x + m * ldx + j))));
    }
#pragma GCC unroll 8
    for (int v = 0; v < kV; ++v) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * v));
      const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
#pragma GCC unroll 8
      for (int m = 0; m < T; ++m) acc[m][v] = _mm512_fmadd_ps(xv[m], wv, acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < T; ++m) StoreGroupLanes8(acc[m], y + m * ldy);
}

#pragma GCC diagnostic pop

// x rows [i0, i1) against the groups of [n0, n1): AVX2 one x row per tile (8 accumulators of
// its 16 registers), AVX-512 up to six (24 accumulators of 32, 6 x registers and a weight one):
// an expert's ~6 rows of a batched decode step in one pass over its weights (tiles.h).
void PackedRows(int level, const float* x, int64_t i0, int64_t i1, int64_t ldx, const uint16_t* w,
                int64_t n0, int64_t n1, int64_t k, float* y, int64_t ldy) {
  for (int64_t o = n0; o < n1; o += kPackRows) {
    const uint16_t* wg = w + o * k;
    int64_t i = i0;
    if (level < 2) {
      for (; i < i1; ++i) PackedTileAvx2<1>(x + i * ldx, ldx, wg, k, y + i * ldy + o, ldy);
      continue;
    }
    ForEachTile<6>(i1 - i, [&](auto t, int64_t first) {
      const int64_t r = i + first;
      PackedTileAvx512<decltype(t)::value>(x + r * ldx, ldx, wg, k, y + r * ldy + o, ldy);
    });
  }
}

// Blocks of x rows small enough (~256 KiB) to stay in L2 while every weight group of the chunk
// passes by; the weight chunk is read once per block. (Row tiles never change a row's chains.)
void DotPackedSimd(int level, const float* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t n0,
                   int64_t n1, int64_t k, float* y, int64_t ldy) {
  const int64_t block = std::max<int64_t>(4, (int64_t{1} << 16) / k / 4 * 4);
  for (int64_t i0 = 0; i0 < m; i0 += block) {
    PackedRows(level, x, i0, std::min(m, i0 + block), ldx, w, n0, n1, k, y, ldy);
  }
}

}  // namespace

void ForcePortableInvariantForTesting(bool on) { g_forced = on ? 0 : -1; }

int SetGemmIsaForTesting(int level) {
  g_forced = level;
  return GemmLevel();
}

int GemmIsaLevel() { return GemmLevel(); }

namespace {

template <typename W>
void DotRowsT(const float* x, int64_t m, int64_t ldx, const typename W::T* w, int64_t n,
              int64_t ldw, int64_t k, float* y, int64_t ldy) {
  if (m <= 0 || n <= 0) return;
  const bool avx2 = Avx2();
  int64_t per = 0;
  // Work in weight bytes read: a bf16 matrix is split like an fp32 one of the same shape.
  const int64_t chunks = Split(n, m * n * k, 4, &per);
  auto run = [&](int c) {
    const int64_t n0 = c * per, n1 = std::min(n, n0 + per);
    if (avx2) {
      DotRowsAvx2<W>(x, m, ldx, w, n0, n1, ldw, k, y, ldy);
    } else {
      DotRowsPortable<W>(x, m, ldx, w, n0, n1, ldw, k, y, ldy);
    }
  };
  if (chunks == 1) {
    run(0);
  } else {
    ThePool().RunEach(static_cast<int>(chunks), run);
  }
}

}  // namespace

void DotRows(const float* x, int64_t m, int64_t ldx, const float* w, int64_t n, int64_t ldw,
             int64_t k, float* y, int64_t ldy) {
  DotRowsT<F32W>(x, m, ldx, w, n, ldw, k, y, ldy);
}

void DotRowsBf16(const float* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t n, int64_t ldw,
                 int64_t k, float* y, int64_t ldy) {
  DotRowsT<Bf16W>(x, m, ldx, w, n, ldw, k, y, ldy);
}

bool Bf16Packable(int64_t n, int64_t k) {
  return n > 0 && k > 0 && n % kPackRows == 0 && k % 8 == 0;
}

void DotRowsBf16PackedRows(const float* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t k,
                           float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (m <= 0 || n1 <= n0) return;
  const int level = GemmLevel();
  if (level >= 1) {
    DotPackedSimd(level, x, m, ldx, w, n0, n1, k, y, ldy);
  } else {
    DotPackedPortable(x, m, ldx, w, n0, n1, k, y, ldy);
  }
}

void DotRowsBf16Packed(const float* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t n,
                       int64_t k, float* y, int64_t ldy) {
  if (m <= 0 || n <= 0) return;
  assert(Bf16Packable(n, k));
  int64_t per = 0;
  const int64_t chunks = Split(n, m * n * k, kPackRows, &per);
  auto run = [&](int c) {
    const int64_t n0 = c * per, n1 = std::min(n, n0 + per);
    DotRowsBf16PackedRows(x, m, ldx, w, k, y, ldy, n0, n1);
  };
  if (chunks == 1) {
    run(0);
  } else {
    ThePool().RunEach(static_cast<int>(chunks), run);
  }
}

namespace {

template <typename WT>
void AxpyRowsT(const float* x, int64_t m, int64_t ldx, const WT* w, int64_t k, int64_t ldw,
               int64_t n, float* y, int64_t ldy, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  const int level = GemmLevel();
  int64_t per = 0;
  const int64_t chunks = Split(n, m * n * k, 32, &per);
  auto run = [&](int c) {
    const int64_t n0 = c * per, n1 = std::min(n, n0 + per);
    if (level >= 2) {
      AxpyRowsAvx512(x, m, ldx, w, k, ldw, n0, n1, y, ldy, accumulate);
    } else if (level == 1) {
      AxpyRowsAvx2(x, m, ldx, w, k, ldw, n0, n1, y, ldy, accumulate);
    } else {
      AxpyRowsPortable(x, m, ldx, w, k, ldw, n0, n1, y, ldy, accumulate);
    }
  };
  if (chunks == 1) {
    run(0);
  } else {
    ThePool().RunEach(static_cast<int>(chunks), run);
  }
}

}  // namespace

void AxpyRows(const float* x, int64_t m, int64_t ldx, const float* w, int64_t k, int64_t ldw,
              int64_t n, float* y, int64_t ldy, bool accumulate) {
  AxpyRowsT(x, m, ldx, w, k, ldw, n, y, ldy, accumulate);
}

void AxpyRowsBf16(const float* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t k, int64_t ldw,
                  int64_t n, float* y, int64_t ldy, bool accumulate) {
  AxpyRowsT(x, m, ldx, w, k, ldw, n, y, ldy, accumulate);
}

void FmaRow(int64_t n, float a, const float* x, float* y) {
  if (Avx2()) {
    FmaRowAvx2(n, a, x, y);
    return;
  }
  for (int64_t i = 0; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

}  // namespace dmoe::cpu
