#include "kernels/cpu/w8a8.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cmath>
#include <cstring>

#include "kernels/cpu/tiles.h"

namespace dmoe::cpu {
namespace {

int CpuLevel() {
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw")) {
      return 2;
    }
    return __builtin_cpu_supports("avx2") ? 1 : 0;
  }();
  return level;
}

std::atomic<int> g_level{-1};

int Level() {
  const int forced = g_level.load(std::memory_order_relaxed);
  return forced < 0 ? CpuLevel() : std::min(forced, CpuLevel());
}

inline float Output(int32_t dot, float sx, float sw) { return static_cast<float>(dot) * (sx * sw); }

void RowsPortable(const int8_t* qx, int64_t t, int64_t ldq, const float* sx, const int8_t* w,
                  int64_t in, const float* sw, float* y, int64_t ldy, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const int8_t* wo = w + o * in;
    for (int64_t m = 0; m < t; ++m) {
      int32_t acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += int32_t{qx[m * ldq + i]} * int32_t{wo[i]};
      y[m * ldy + o] = Output(acc, sx[m], sw[o]);
    }
  }
}

__attribute__((target("avx2"))) inline int32_t HSum32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// AVX2: 16 int8 at a time widened to int16, pairs multiplied and summed into int32 (vpmaddwd).
template <int T, int R>
__attribute__((target("avx2"))) void TileAvx2(const int8_t* qx, int64_t ldq, const float* sx,
                                              const int8_t* w, int64_t in, const float* sw,
                                              float* y, int64_t ldy, int64_t o) {
  __m256i acc[T][R];
#pragma GCC unroll 8
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_si256();
  const int64_t k16 = in & ~int64_t{15};
  for (int64_t j = 0; j < k16; j += 16) {
    __m256i xv[T];
#pragma GCC unroll 8
    for (int m = 0; m < T; ++m)
      xv[m] =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qx + m * ldq + j)));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (o + r + R) * in + j), _MM_HINT_T0);
      const __m256i wv = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (o + r) * in + j)));
#pragma GCC unroll 8
      for (int m = 0; m < T; ++m)
        acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(xv[m], wv));
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < T; ++m) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t s = HSum32(acc[m][r]);
      for (int64_t j = k16; j < in; ++j)
        s += int32_t{qx[m * ldq + j]} * int32_t{w[(o + r) * in + j]};
      y[m * ldy + o + r] = Output(s, sx[m], sw[o + r]);
    }
  }
}

// AVX512-VNNI (256-bit EVEX): vpdpbusd multiplies unsigned by signed bytes, 4 per int32 lane, so
// the activations go in as qx + 128 (a flip of the top bit) and 128 * sum(w[o, :]) comes off.
template <int T, int R>
__attribute__((target("avx512vnni,avx512vl,avx512bw,avx2"))) void TileVnni(
    const int8_t* qx, int64_t ldq, const float* sx, const int8_t* w, int64_t in, const float* sw,
    const int32_t* sums, float* y, int64_t ldy, int64_t o) {
  __m256i acc[T][R];
#pragma GCC unroll 8
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_si256();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t j = 0; j < in; j += 32) {
    // The tail: masked loads (nothing read past a row), zero activations beyond it.
    const __mmask32 mask = in - j >= 32 ? ~__mmask32{0} : (__mmask32{1} << (in - j)) - 1;
    __m256i xv[T];
#pragma GCC unroll 8
    for (int m = 0; m < T; ++m) {
      xv[m] = _mm256_maskz_mov_epi8(
          mask, _mm256_xor_si256(_mm256_maskz_loadu_epi8(mask, qx + m * ldq + j), flip));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (o + r + R) * in + j), _MM_HINT_T0);
      const __m256i wv = _mm256_maskz_loadu_epi8(mask, w + (o + r) * in + j);
#pragma GCC unroll 8
      for (int m = 0; m < T; ++m) acc[m][r] = _mm256_dpbusd_epi32(acc[m][r], xv[m], wv);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < T; ++m) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int32_t s = HSum32(acc[m][r]) - 128 * sums[o + r];
      y[m * ldy + o + r] = Output(s, sx[m], sw[o + r]);
    }
  }
}

template <int T>
void RowsSimd(bool vnni, const int8_t* qx, int64_t ldq, const float* sx, const int8_t* w,
              int64_t in, const float* sw, const int32_t* sums, float* y, int64_t ldy, int64_t o0,
              int64_t o1) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    if (vnni) {
      TileVnni<T, 4>(qx, ldq, sx, w, in, sw, sums, y, ldy, o);
    } else {
      TileAvx2<T, 4>(qx, ldq, sx, w, in, sw, y, ldy, o);
    }
  }
  for (; o < o1; ++o) {
    if (vnni) {
      TileVnni<T, 1>(qx, ldq, sx, w, in, sw, sums, y, ldy, o);
    } else {
      TileAvx2<T, 1>(qx, ldq, sx, w, in, sw, y, ldy, o);
    }
  }
}

// ---- packed int8 (w8a8.h): groups of 8 rows, 32 columns per row per block ----

constexpr int64_t kGroup = 8, kCols = 32;

inline int64_t PackedAt(int64_t o, int64_t j, int64_t k) {
  return (o / kGroup) * kGroup * k + (j / kCols) * kGroup * kCols + (o % kGroup) * kCols +
         j % kCols;
}

void PackedPortable(const int8_t* qx, int64_t t, int64_t ldq, const float* sx, const int8_t* w,
                    int64_t in, const float* sw, float* y, int64_t ldy, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t m = 0; m < t; ++m) {
      int32_t acc = 0;
      for (int64_t i = 0; i < in; ++i)
        acc += int32_t{qx[m * ldq + i]} * int32_t{w[PackedAt(o, i, in)]};
      y[m * ldy + o] = Output(acc, sx[m], sw[o]);
    }
  }
}

// AVX2: T (<= 2) rows of x against one group of 8 rows, 32 columns per step.
template <int T>
__attribute__((target("avx2"))) void PackedTileAvx2(const int8_t* qx, int64_t ldq, const float* sx,
                                                    const int8_t* w, int64_t in, const float* sw,
                                                    float* y, int64_t ldy) {
  __m256i acc[T][kGroup];
#pragma GCC unroll 8
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < kGroup; ++r) acc[m][r] = _mm256_setzero_si256();
  for (int64_t j = 0; j < in; j += kCols, w += kGroup * kCols) {
    __m256i xlo[T], xhi[T];
#pragma GCC unroll 8
    for (int m = 0; m < T; ++m) {
      const int8_t* xm = qx + m * ldq + j;
      xlo[m] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xm)));
      xhi[m] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xm + 16)));
    }
#pragma GCC unroll 8
    for (int r = 0; r < kGroup; ++r) {
      const int8_t* wr = w + r * kCols;
      const __m256i lo =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr)));
      const __m256i hi =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 16)));
#pragma GCC unroll 8
      for (int m = 0; m < T; ++m) {
        acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(xlo[m], lo));
        acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(xhi[m], hi));
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < kGroup; ++r) y[m * ldy + r] = Output(HSum32(acc[m][r]), sx[m], sw[r]);
}

// GCC 12 reports the intrinsics' own _mm512_undefined_* as uninitialized (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The 8 rows' results of a group from its accumulators (row 2v in the low half of acc[v], row
// 2v + 1 in the high half): each row's 8 lanes summed (integers: exact in any order) by a tree of
// horizontal adds that gives all 8 sums in one register, less 128 * the row sums, then Output's
// float operations 8 at a time (float(dot) * (sx * sw), the same roundings). A group of 8 rows
// ends with ~20 instructions instead of 8 scalar reductions (~80): on rows of 384 or 512 columns
// (q_b, o, every expert's down) those had held back the loads of the next group.
static_assert(kGroup == 8, "StoreGroupVnni reduces 4 registers of 2 rows");
__attribute__((target("avx512f,avx2"))) inline void StoreGroupVnni(const __m512i* acc,
                                                                   const int32_t* sums, float sx,
                                                                   const float* sw, float* y) {
  const __m256i t0 =
      _mm256_hadd_epi32(_mm512_castsi512_si256(acc[0]), _mm512_extracti64x4_epi64(acc[0], 1));
  const __m256i t1 =
      _mm256_hadd_epi32(_mm512_castsi512_si256(acc[1]), _mm512_extracti64x4_epi64(acc[1], 1));
  const __m256i t2 =
      _mm256_hadd_epi32(_mm512_castsi512_si256(acc[2]), _mm512_extracti64x4_epi64(acc[2], 1));
  const __m256i t3 =
      _mm256_hadd_epi32(_mm512_castsi512_si256(acc[3]), _mm512_extracti64x4_epi64(acc[3], 1));
  const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
  const __m128i s0 = _mm_add_epi32(_mm256_castsi256_si128(u0), _mm256_extracti128_si256(u0, 1));
  const __m128i s1 = _mm_add_epi32(_mm256_castsi256_si128(u1), _mm256_extracti128_si256(u1, 1));
  const __m256i dot = _mm256_sub_epi32(
      _mm256_set_m128i(s1, s0),
      _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums)), 7));
  const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(sx), _mm256_loadu_ps(sw));
  _mm256_storeu_ps(y, _mm256_mul_ps(_mm256_cvtepi32_ps(dot), scale));
}

// AVX512-VNNI: one 512-bit register holds two rows' 32 columns (one per half) against the same
// 32 columns of x (offset by 128) in both halves.
template <int T>
__attribute__((target("avx512vnni,avx512f,avx512bw,avx2"))) void PackedTileVnni(
    const int8_t* qx, int64_t ldq, const float* sx, const int8_t* w, int64_t in, const float* sw,
    const int32_t* sums, float* y, int64_t ldy) {
  constexpr int kV = kGroup / 2;
  __m512i acc[T][kV];
#pragma GCC unroll 8
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < kV; ++v) acc[m][v] = _mm512_setzero_si512();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t j = 0; j < in; j += kCols, w += kGroup * kCols) {
    // This step's 256 bytes, kTilePrefetchBytes on, at every tile size: a batch-1 decode step
    // of `small` in int8 (Zen 4, 2 vCPUs, ~85 GB/s read) ran 359 -> 436 tok/s with single-row
    // tiles prefetching too (58.7 -> 70.8 % of the bandwidth limit; 4-16 KiB ahead alike), and
    // 225-236 -> 277-288 tok/s (54-57 -> 61 %, another day) with them prefetching non-temporal
    // (tiles.h). The bf16 kernels' single-row tiles were slower with it, so only these prefetch.
    PrefetchTileWeights<T, 4, true>(w);
    __m512i xv[T];
#pragma GCC unroll 8
    for (int m = 0; m < T; ++m) {
      const __m256i x8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * ldq + j));
      xv[m] = _mm512_broadcast_i64x4(_mm256_xor_si256(x8, flip));
    }
#pragma GCC unroll 8
    for (int v = 0; v < kV; ++v) {
      const __m512i wv = _mm512_loadu_si512(w + 64 * v);
#pragma GCC unroll 8
      for (int m = 0; m < T; ++m) acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], xv[m], wv);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < T; ++m) StoreGroupVnni(acc[m], sums, sx[m], sw, y + m * ldy);
}

#pragma GCC diagnostic pop

// Every row of x against each group in turn (the group stays in L1 while the x rows pass by).
void PackedRowsVnni(const int8_t* qx, int64_t t, int64_t ldq, const float* sx, const int8_t* w,
                    int64_t in, const float* sw, const int32_t* sums, float* y, int64_t ldy,
                    int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; o += kGroup) {
    const int8_t* g = w + o * in;
    // Up to 4 rows per tile (16 accumulators, 4 x registers; GCC 12 spills accumulators of a
    // 6-row tile around vpdpbusd): tiles.h.
    ForEachTile<4>(t, [&](auto tile, int64_t m) {
      PackedTileVnni<decltype(tile)::value>(qx + m * ldq, ldq, sx + m, g, in, sw + o, sums + o,
                                            y + m * ldy + o, ldy);
    });
  }
}

}  // namespace

int SetInt8IsaForTesting(int level) {
  g_level = level;
  return Level();
}
int Int8IsaLevel() { return CpuLevel(); }

namespace {

// One row, the definition's operations in vector form: max of |x| (exact in any order), x * inv
// rounded to nearest even (vroundps, as nearbyint in the default rounding mode), clamped.
__attribute__((target("avx2"))) void QuantizeRowAvx2(const float* x, int64_t k, int8_t* q,
                                                     float* s) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8)
    mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  alignas(32) float l[8];
  _mm256_store_ps(l, mx);
  float amax = 0;
  for (float v : l) amax = std::max(amax, v);
  for (; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax > 0 ? 127.0f / amax : 0.0f;
  *s = amax / 127.0f;
  const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.0f),
               lo = _mm256_set1_ps(-127.0f);
  i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_max_ps(lo, _mm256_min_ps(hi, v));
    const __m256i n = _mm256_cvtps_epi32(v);  // exact: v is an integer in [-127, 127]
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(n), _mm256_extracti128_si256(n, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(w16, w16));
  }
  for (; i < k; ++i) {
    const float v = std::nearbyint(x[i] * inv);
    q[i] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, v)));
  }
}

}  // namespace

void QuantizeRowsInt8(const float* x, int64_t t, int64_t k, int64_t ldx, int8_t* q, int64_t ldq,
                      float* s) {
  if (Level() >= 1) {
    for (int64_t m = 0; m < t; ++m) QuantizeRowAvx2(x + m * ldx, k, q + m * ldq, s + m);
    return;
  }
  for (int64_t m = 0; m < t; ++m) {
    const float* xm = x + m * ldx;
    float amax = 0;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(xm[i]));
    const float inv = amax > 0 ? 127.0f / amax : 0.0f;
    s[m] = amax / 127.0f;
    for (int64_t i = 0; i < k; ++i) {
      const float v = std::nearbyint(xm[i] * inv);
      q[m * ldq + i] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, v)));
    }
  }
}

void Int8RowSums(const int8_t* w, int64_t out, int64_t in, int32_t* sums) {
  for (int64_t o = 0; o < out; ++o) {
    int32_t s = 0;
    for (int64_t i = 0; i < in; ++i) s += w[o * in + i];
    sums[o] = s;
  }
}

void Int8DotRows(const int8_t* qx, int64_t t, int64_t ldq, const float* sx, const int8_t* w,
                 int64_t in, const float* sw, const int32_t* sums, float* y, int64_t ldy,
                 int64_t o0, int64_t o1) {
  const int level = Level();
  if (level == 0) {
    RowsPortable(qx, t, ldq, sx, w, in, sw, y, ldy, o0, o1);
    return;
  }
  const bool vnni = level == 2;
  switch (t) {
    case 1:
      return RowsSimd<1>(vnni, qx, ldq, sx, w, in, sw, sums, y, ldy, o0, o1);
    case 2:
      return RowsSimd<2>(vnni, qx, ldq, sx, w, in, sw, sums, y, ldy, o0, o1);
    case 3:
      return RowsSimd<3>(vnni, qx, ldq, sx, w, in, sw, sums, y, ldy, o0, o1);
    default:
      return RowsSimd<4>(vnni, qx, ldq, sx, w, in, sw, sums, y, ldy, o0, o1);
  }
}

}  // namespace dmoe::cpu

namespace dmoe::cpu {

bool Int8Packable(int64_t out, int64_t in) {
  return out > 0 && in > 0 && out % kGroup == 0 && in % kCols == 0;
}

void Int8DotRowsPacked(const int8_t* qx, int64_t t, int64_t ldq, const float* sx, const int8_t* w,
                       int64_t in, const float* sw, const int32_t* sums, float* y, int64_t ldy,
                       int64_t o0, int64_t o1) {
  assert(Int8Packable(o1 - o0, in) && o0 % kGroup == 0);
  const int level = Level();
  if (level == 0) {
    PackedPortable(qx, t, ldq, sx, w, in, sw, y, ldy, o0, o1);
    return;
  }
  if (level == 1) {  // one x row per tile: 8 accumulators of the 16 ymm registers
    for (int64_t m = 0; m < t; ++m) {
      for (int64_t o = o0; o < o1; o += kGroup) {
        PackedTileAvx2<1>(qx + m * ldq, ldq, sx + m, w + o * in, in, sw + o, y + m * ldy + o, ldy);
      }
    }
    return;
  }
  PackedRowsVnni(qx, t, ldq, sx, w, in, sw, sums, y, ldy, o0, o1);
}

}  // namespace dmoe::cpu
