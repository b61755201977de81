#include "kernels/cpu/qlinear.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cmath>
#include <cstring>
#include <functional>

#include "common/dtype.h"
#include "kernels/cpu/bf16dot.h"
#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/small_gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/w8a8.h"

namespace dmoe::cpu {
namespace {

std::atomic<bool> g_portable{false};
std::atomic<bool> g_w8a8{true};

bool UseAvx2() { return CpuHasAvx2Fma() && !g_portable.load(std::memory_order_relaxed); }

__attribute__((target("avx2,fma"))) inline float HSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  lo = _mm_add_ps(lo, _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// 8 weights as floats (without their scale).
__attribute__((target("avx2,fma"))) inline __m256 LoadInt8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((target("avx2,fma"))) inline __m256 LoadFp8(const uint8_t* p) {
  // e4m3 -> fp32 bits: magnitude bits at 20..26, sign at 31, then x 2^120 re-biases the exponent
  // (subnormals land on fp32 subnormals and come out exact).
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x7f)), 20);
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x80)), 24);
  return _mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(mag, sign)),
                       _mm256_set1_ps(1.329227995784916e36f));  // 2^120
}

float ScalarWeight(const WeightRef& w, int64_t o, int64_t i) {
  const uint8_t b = w.q[o * w.in + i];
  return w.format == WeightFormat::kInt8 ? static_cast<float>(static_cast<int8_t>(b))
                                         : Fp8E4M3ToFloat(b);
}

// y[m, o] for o in [o0, o1): T rows of x and R weight rows at a time (compile-time, so the R x T
// accumulators live in registers and give the FMA units independent chains).
template <int T, int R, bool kFp8>
__attribute__((target("avx2,fma"))) void RowsAvx2(const float* x, int64_t ldx, const WeightRef& w,
                                                  float* y, int64_t ldy, int64_t o0, int64_t o1) {
  const int64_t in = w.in;
  const int64_t span = kFp8 ? kFp8Block : in;  // one scale per span
  const int64_t nb = (in + kFp8Block - 1) / kFp8Block;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    float total[R][T] = {};
    for (int64_t k0 = 0; k0 < in; k0 += span) {
      const int64_t k1 = std::min(in, k0 + span);
      __m256 acc[R][T];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int m = 0; m < T; ++m) acc[r][m] = _mm256_setzero_ps();
      int64_t i = k0;
      for (; i + 8 <= k1; i += 8) {
        __m256 wv[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          wv[r] = kFp8 ? LoadFp8(w.q + (o + r) * in + i) : LoadInt8(w.q + (o + r) * in + i);
        }
#pragma GCC unroll 8
        for (int m = 0; m < T; ++m) {
          const __m256 xv = _mm256_loadu_ps(x + m * ldx + i);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
        }
      }
      for (int r = 0; r < R; ++r) {
        float part[T];
        for (int m = 0; m < T; ++m) part[m] = HSum(acc[r][m]);
        for (int64_t j = i; j < k1; ++j) {
          const float wi = ScalarWeight(w, o + r, j);
          for (int m = 0; m < T; ++m) part[m] += wi * x[m * ldx + j];
        }
        const float sc = kFp8 ? w.scales[((o + r) / kFp8Block) * nb + k0 / kFp8Block] : 1.0f;
        for (int m = 0; m < T; ++m) total[r][m] += part[m] * sc;
      }
    }
    for (int r = 0; r < R; ++r) {
      const float sc = kFp8 ? 1.0f : w.scales[o + r];
      for (int m = 0; m < T; ++m) y[m * ldy + o + r] = total[r][m] * sc;
    }
  }
  if constexpr (R > 1) {
    if (o < o1) RowsAvx2<T, 1, kFp8>(x, ldx, w, y, ldy, o, o1);
  }
}

void RowsScalar(const float* x, int64_t t, int64_t ldx, const WeightRef& w, float* y, int64_t ldy,
                int64_t o0, int64_t o1) {
  const int64_t nb = (w.in + kFp8Block - 1) / kFp8Block;
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t m = 0; m < t; ++m) {
      double acc = 0;
      for (int64_t i = 0; i < w.in; ++i) {
        const float s = w.format == WeightFormat::kInt8
                            ? w.scales[o]
                            : w.scales[(o / kFp8Block) * nb + i / kFp8Block];
        acc += static_cast<double>(ScalarWeight(w, o, i)) * s * x[m * ldx + i];
      }
      y[m * ldy + o] = static_cast<float>(acc);
    }
  }
}

template <bool kFp8>
void Dispatch(const float* x, int64_t t, int64_t ldx, const WeightRef& w, float* y, int64_t ldy,
              int64_t o0, int64_t o1) {
  switch (t) {
#define DMOE_CASE(T) \
  case T:            \
    return RowsAvx2<T, (T <= 2 ? 4 : T <= 4 ? 2 : 1), kFp8>(x, ldx, w, y, ldy, o0, o1);
    DMOE_CASE(1)
    DMOE_CASE(2)
    DMOE_CASE(3)
    DMOE_CASE(4)
    DMOE_CASE(5)
    DMOE_CASE(6)
    DMOE_CASE(7)
    DMOE_CASE(8)
#undef DMOE_CASE
  }
}

// Up to this many rows of x, the register kernel (weights converted on the fly, in groups of 8
// rows); beyond, dequantize once and sgemm.
constexpr int64_t kDirectRows = 16;
// Whether a product of t rows takes the register kernels (or the BLAS mode's sgemm).
bool DirectKernels(int64_t t) {
  return t <= kDirectRows || GetKernelMode() == KernelMode::kInvariant;
}

// Output rows per chunk: a multiple of 8 (a packed group; 8 divides the fp8 block, so a group
// never spans two scale rows).
int64_t Chunks(int64_t out, int64_t in, int64_t* per) {
  // Small matrices run on the calling thread: waking the pool would cost more than the work.
  const int64_t n = out * in < (int64_t{1} << 18)
                        ? 1
                        : std::min<int64_t>(ThePool().size() * 2, std::max<int64_t>(1, out / 64));
  *per = ((out + n - 1) / n + 7) / 8 * 8;
  return (out + *per - 1) / *per;
}

// ---- packed fp8 (8 rows interleaved per 8 columns, as packed bf16) ----
// The chain of RowsAvx2<T, R, true> for every row of x and weight row o: per 128-column block an
// 8-lane fma chain of weight * x (weights decoded by LoadFp8's formula), reduced in Lanes8 order,
// times the block's scale, added to the row's total. The packed kernels below follow it at every
// ISA level, so packed fp8 gives row-major fp8's AVX2 bits.

// LoadFp8's decoding, one weight: magnitude bits at 20..26, sign at 31, times 2^120.
float Fp8Weight(uint8_t b) {
  const uint32_t bits = (uint32_t{b} & 0x7fu) << 20 | (uint32_t{b} & 0x80u) << 24;
  float f;
  std::memcpy(&f, &bits, 4);
  return f * 1.329227995784916e36f;
}

inline const uint8_t* Fp8Group(const WeightRef& w, int64_t o) { return w.q + o * w.in; }
inline float Fp8Scale(const WeightRef& w, int64_t o, int64_t k0) {
  const int64_t nb = (w.in + kFp8Block - 1) / kFp8Block;
  return w.scales[(o / kFp8Block) * nb + k0 / kFp8Block];
}

void Fp8PackedPortable(const float* x, int64_t t, int64_t ldx, const WeightRef& w, float* y,
                       int64_t ldy, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; o += 8) {
    const uint8_t* g = Fp8Group(w, o);
    for (int64_t m = 0; m < t; ++m) {
      float total[8] = {};
      for (int64_t k0 = 0; k0 < w.in; k0 += kFp8Block) {
        const int64_t k1 = std::min(w.in, k0 + kFp8Block);
        float lane[8][8] = {};
        for (int64_t j = k0; j < k1; j += 8) {
          for (int r = 0; r < 8; ++r) {
            for (int l = 0; l < 8; ++l) {
              lane[r][l] =
                  std::fma(Fp8Weight(g[j * 8 + r * 8 + l]), x[m * ldx + j + l], lane[r][l]);
            }
          }
        }
        for (int r = 0; r < 8; ++r) {
          const float part = ((lane[r][0] + lane[r][4]) + (lane[r][1] + lane[r][5])) +
                             ((lane[r][2] + lane[r][6]) + (lane[r][3] + lane[r][7]));
          total[r] += part * Fp8Scale(w, o + r, k0);
        }
      }
      for (int r = 0; r < 8; ++r) y[m * ldy + o + r] = total[r] * 1.0f;
    }
  }
}

// One row of x against a group of 8 weight rows: 8 accumulators.
__attribute__((target("avx2,fma"))) void Fp8PackedTileAvx2(const float* xm, const WeightRef& w,
                                                           int64_t o, float* ym) {
  const uint8_t* g = Fp8Group(w, o);
  float total[8] = {};
  for (int64_t k0 = 0; k0 < w.in; k0 += kFp8Block) {
    const int64_t k1 = std::min(w.in, k0 + kFp8Block);
    __m256 acc[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t j = k0; j < k1; j += 8) {
      const __m256 xv = _mm256_loadu_ps(xm + j);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        acc[r] = _mm256_fmadd_ps(LoadFp8(g + j * 8 + r * 8), xv, acc[r]);
      }
    }
    for (int r = 0; r < 8; ++r) total[r] += HSum(acc[r]) * Fp8Scale(w, o + r, k0);
  }
  for (int r = 0; r < 8; ++r) ym[o + r] = total[r] * 1.0f;
}

// GCC 12 reports the intrinsics' own _mm512_undefined_* as uninitialized (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// 64 packed weights (8 rows x 8 columns) -> 4 registers of two rows' 8 columns each, rows
// (0, 2), (4, 6), (1, 3), (5, 7): every e4m3 byte placed as an fp16 (sign at bit 15, exponent and
// mantissa at 7..13; never inf or NaN), widened exactly (vcvtph2ps), times 2^8: the value
// LoadFp8 gives, subnormals and the NaN codes (+-480) included.
__attribute__((target("avx512f,avx512bw,avx2,fma"))) inline void DecodeFp8Block(const uint8_t* p,
                                                                                __m512 out[4]) {
  const __m512i b = _mm512_loadu_si512(p);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i keep = _mm512_set1_epi16(static_cast<int16_t>(0xBFFF));
  // unpacklo: bytes 0-7 of each 128-bit lane (row 2L) to the high halves of 16-bit lanes;
  // unpackhi: bytes 8-15 (row 2L + 1). >> 1 (arithmetic) then clearing bit 14 leaves the sign
  // at 15.
  const __m512i lo = _mm512_and_si512(_mm512_srai_epi16(_mm512_unpacklo_epi8(zero, b), 1), keep);
  const __m512i hi = _mm512_and_si512(_mm512_srai_epi16(_mm512_unpackhi_epi8(zero, b), 1), keep);
  const __m512 k = _mm512_set1_ps(256.0f);
  out[0] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(lo)), k);
  out[1] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(lo, 1)), k);
  out[2] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(hi)), k);
  out[3] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(hi, 1)), k);
}

// Lanes8 of each half, in its order, left in every lane of the half: lanes i + (i + 4), then
// adjacent pairs, then the two pairs (additions commute bit for bit).
__attribute__((target("avx512f,avx512bw,avx2,fma"))) inline __m512 HalvesLanes8(__m512 v) {
  const __m512 t = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));  // 128-bit lanes 1,0,3,2
  const __m512 u = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));        // 1,0,3,2 in each lane
  return _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));                  // 2,3,0,1 in each lane
}

// A whole group decoded once (for many rows of x): DecodeFp8Block's registers in order, 64 floats
// per 8 columns.
__attribute__((target("avx512f,avx512bw,avx2,fma"))) void DecodeFp8Group(const uint8_t* g,
                                                                         int64_t in, float* pre) {
  for (int64_t j = 0; j < in; j += 8) {
    __m512 wv[4];
    DecodeFp8Block(g + j * 8, wv);
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(pre + j * 8 + 16 * v, wv[v]);
  }
}

// T rows of x against a group of 8 weight rows: one register holds two rows' 8 columns against
// the same 8 columns of x in both halves, so each lane keeps its row's chain. The 8 rows share
// one scale per 128 columns (a group never crosses a 128-row block). kPre: the group comes
// decoded (DecodeFp8Group), the same values.
template <int T, bool kPre>
__attribute__((target("avx512f,avx512bw,avx2,fma"))) void Fp8PackedTileAvx512(
    const float* x, int64_t ldx, const WeightRef& w, int64_t o, const float* pre, float* y,
    int64_t ldy) {
  static constexpr int kRow[4][2] = {{0, 2}, {4, 6}, {1, 3}, {5, 7}};
  const uint8_t* g = Fp8Group(w, o);
  __m256 total[T];
#pragma GCC unroll 4
  for (int m = 0; m < T; ++m) total[m] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < w.in; k0 += kFp8Block) {
    const int64_t k1 = std::min(w.in, k0 + kFp8Block);
    __m512 acc[T][4];
#pragma GCC unroll 4
    for (int m = 0; m < T; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_setzero_ps();
    for (int64_t j = k0; j < k1; j += 8) {
      __m512 wv[4];
      if constexpr (kPre) {
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) wv[v] = _mm512_loadu_ps(pre + j * 8 + 16 * v);
      } else {
        DecodeFp8Block(g + j * 8, wv);
      }
#pragma GCC unroll 4
      for (int m = 0; m < T; ++m) {
        const __m512 xv = _mm512_castpd_ps(
            _mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(x + m * ldx + j))));
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_fmadd_ps(wv[v], xv, acc[m][v]);
      }
    }
    const __m256 sc = _mm256_set1_ps(Fp8Scale(w, o, k0));
    for (int m = 0; m < T; ++m) {
      alignas(64) float l[4][16];
      for (int v = 0; v < 4; ++v) _mm512_store_ps(l[v], HalvesLanes8(acc[m][v]));
      alignas(32) float part[8];
      for (int v = 0; v < 4; ++v) {
        part[kRow[v][0]] = l[v][0];
        part[kRow[v][1]] = l[v][8];
      }
      total[m] = _mm256_add_ps(total[m], _mm256_mul_ps(_mm256_load_ps(part), sc));
    }
  }
  for (int m = 0; m < T; ++m) _mm256_storeu_ps(y + m * ldy + o, total[m]);
}
#pragma GCC diagnostic pop

// T rows of x (any T) against group o, in tiles of 4.
template <bool kPre>
void Fp8PackedTilesAvx512(const float* x, int64_t t, int64_t ldx, const WeightRef& w, int64_t o,
                          const float* pre, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= t; m += 4) {
    Fp8PackedTileAvx512<4, kPre>(x + m * ldx, ldx, w, o, pre, y + m * ldy, ldy);
  }
  const float* xm = x + m * ldx;
  float* ym = y + m * ldy;
  if (t - m == 3) Fp8PackedTileAvx512<3, kPre>(xm, ldx, w, o, pre, ym, ldy);
  if (t - m == 2) Fp8PackedTileAvx512<2, kPre>(xm, ldx, w, o, pre, ym, ldy);
  if (t - m == 1) Fp8PackedTileAvx512<1, kPre>(xm, ldx, w, o, pre, ym, ldy);
}

// Rows of x in blocks (~256 KiB, kept in L2 while every weight group of [o0, o1) passes by), each
// block in tiles of up to 4 rows (AVX-512; a group is decoded once per block when the block has
// more than one tile) or 1 (AVX2) per group.
void Fp8PackedRows(int level, const float* x, int64_t t, int64_t ldx, const WeightRef& w, float* y,
                   int64_t ldy, int64_t o0, int64_t o1) {
  if (level == 0) {
    Fp8PackedPortable(x, t, ldx, w, y, ldy, o0, o1);
    return;
  }
  thread_local std::vector<float> pre;
  const int64_t block = std::max<int64_t>(4, (int64_t{256} << 10) / (4 * w.in) / 4 * 4);
  for (int64_t m0 = 0; m0 < t; m0 += block) {
    const int64_t m1 = std::min(t, m0 + block);
    for (int64_t o = o0; o < o1; o += 8) {
      if (level == 1) {
        for (int64_t m = m0; m < m1; ++m) Fp8PackedTileAvx2(x + m * ldx, w, o, y + m * ldy);
      } else if (m1 - m0 > 4) {
        pre.resize(static_cast<size_t>(8 * w.in));
        DecodeFp8Group(Fp8Group(w, o), w.in, pre.data());
        Fp8PackedTilesAvx512<true>(x + m0 * ldx, m1 - m0, ldx, w, o, pre.data(), y + m0 * ldy, ldy);
      } else {
        Fp8PackedTilesAvx512<false>(x + m0 * ldx, m1 - m0, ldx, w, o, nullptr, y + m0 * ldy, ldy);
      }
    }
  }
}

// ---- fp8 under A16 (--bf16-activations): bf16dot.h's Fp8DotRowsPackedA16 over 128-column
// blocks (an e4m3 value is exact in bf16), the rows of x rounded to bf16 once ----

void LinearFp8A16(const float* x, int64_t t, int64_t ldx, const WeightRef& w, float* y,
                  int64_t ldy) {
  thread_local std::vector<uint16_t> rounded;
  rounded.resize(static_cast<size_t>(t * w.in));
  for (int64_t m = 0; m < t; ++m) {
    FloatToBf16N(x + m * ldx, static_cast<size_t>(w.in), rounded.data() + m * w.in);
  }
  const uint16_t* xb =
      rounded.data();  // (a thread_local named in the lambda would be the worker's)
  int64_t per = 0;
  const int64_t chunks = Chunks(w.out, w.in, &per);
  ThePool().RunEach(static_cast<int>(chunks), [&](int c) {
    const int64_t o0 = c * per, o1 = std::min(w.out, o0 + per);
    Fp8DotRowsPackedA16(xb, t, w.in, w.q, w.in, w.scales, kFp8Block, y, ldy, o0, o1);
  });
}

void LinearFp8Packed(const float* x, int64_t t, int64_t ldx, const WeightRef& w, float* y,
                     int64_t ldy) {
  const int level = g_portable.load(std::memory_order_relaxed) ? 0 : GemmIsaLevel();
  int64_t per = 0;
  const int64_t chunks = Chunks(w.out, w.in, &per);
  ThePool().RunEach(static_cast<int>(chunks), [&](int c) {
    const int64_t o0 = c * per, o1 = std::min(w.out, o0 + per);
    Fp8PackedRows(level, x, t, ldx, w, y, ldy, o0, o1);
  });
}

}  // namespace

void ForcePortableKernelsForTesting(bool on) { g_portable = on; }
void SetInt8Activations(bool w8a8) { g_w8a8 = w8a8; }
bool Int8ActivationsW8A8() { return g_w8a8.load(std::memory_order_relaxed); }

namespace {

// The row sums of w's int8 values (the kernel's correction for x + 128): the ones stored with it,
// else computed into *here.
const int32_t* RowSums(const WeightRef& w, std::vector<int32_t>* here) {
  if (w.sums != nullptr) return w.sums;
  here->resize(static_cast<size_t>(w.out));
  if (w.packed) {
    std::vector<int8_t> row(static_cast<size_t>(w.in));
    for (int64_t o = 0; o < w.out; ++o) {
      UnpackRow(w.format, w.q, w.in, o, row.data());
      Int8RowSums(row.data(), 1, w.in, here->data() + o);
    }
  } else {
    Int8RowSums(reinterpret_cast<const int8_t*>(w.q), w.out, w.in, here->data());
  }
  return here->data();
}

// One W8A8 product of LinearW8A8: the weights, their row sums, where the outputs go.
struct W8A8Product {
  const WeightRef* w;
  const int32_t* sums;
  float* y;
  int64_t ldy;
};

// Output rows [o0, o1) of product p for the t quantized rows q [t, ldq] (scales s).
void W8A8Rows(const int8_t* q, const float* s, int64_t t, int64_t ldq, const W8A8Product& p,
              int64_t o0, int64_t o1) {
  const WeightRef& w = *p.w;
  const int8_t* wq = reinterpret_cast<const int8_t*>(w.q);
  if (w.packed) {  // blocks of x rows (~64 KiB) pass by each weight group in L1
    const int64_t block = std::max<int64_t>(4, (int64_t{1} << 16) / ldq / 4 * 4);
    for (int64_t m0 = 0; m0 < t; m0 += block) {
      Int8DotRowsPacked(q + m0 * ldq, std::min(block, t - m0), ldq, s + m0, wq, w.in, w.scales,
                        p.sums, p.y + m0 * p.ldy, p.ldy, o0, o1);
    }
    return;
  }
  for (int64_t m0 = 0; m0 < t; m0 += 4) {
    Int8DotRows(q + m0 * ldq, std::min<int64_t>(4, t - m0), ldq, s + m0, wq, w.in, w.scales, p.sums,
                p.y + m0 * p.ldy, p.ldy, o0, o1);
  }
}

// W8A8: the rows of x quantized once, then groups of 4 rows through the int8 kernel over chunks
// of output rows; the chunks of every product (each with the same in) in one pass over the pool.
void LinearW8A8(const float* x, int64_t t, int64_t ldx, const W8A8Product* products, int count) {
  assert(count >= 1 && count <= 2);
  const int64_t in = products[0].w->in;
  thread_local std::vector<int8_t> qx;
  thread_local std::vector<float> sx;
  thread_local std::vector<int32_t> sums_here[2];
  // The pass's state in one struct: its lambda captures one pointer, so std::function holds it
  // without allocating. (thread_locals named inside the lambda would be the worker's.)
  struct Pass {
    const int8_t* q;
    const float* s;
    int64_t t, ldq;
    W8A8Product ps[2];
    int64_t per[2], first[3];
  } pass{nullptr, nullptr, t, (in + 63) / 64 * 64, {}, {0, 0}, {0, 0, 0}};
  if (sx.capacity() < static_cast<size_t>(kThreadScratchRows)) {
    qx.reserve(static_cast<size_t>(kThreadScratchRows * pass.ldq));
    sx.reserve(static_cast<size_t>(kThreadScratchRows));
  }
  qx.resize(static_cast<size_t>(t * pass.ldq));
  sx.resize(static_cast<size_t>(t));
  QuantizeRowsInt8(x, t, in, ldx, qx.data(), pass.ldq, sx.data());
  pass.q = qx.data();
  pass.s = sx.data();
  int64_t weights = 0;
  for (int i = 0; i < count; ++i) {
    pass.ps[i] = products[i];
    pass.ps[i].sums = RowSums(*pass.ps[i].w, &sums_here[i]);
    pass.first[i + 1] = pass.first[i] + Chunks(pass.ps[i].w->out, in, &pass.per[i]);
    weights += pass.ps[i].w->out * in;
  }
  const auto chunk = [p = &pass](int c) {
    const int i = c < p->first[1] ? 0 : 1;
    const int64_t o0 = (c - p->first[i]) * p->per[i];
    const int64_t o1 = std::min(p->ps[i].w->out, o0 + p->per[i]);
    W8A8Rows(p->q, p->s, p->t, p->ldq, p->ps[i], o0, o1);
  };
  const int n = static_cast<int>(pass.first[count]);
  if (weights < (int64_t{1} << 18)) {  // small products together: on this thread, as Chunks says
    for (int c = 0; c < n; ++c) chunk(c);
    return;
  }
  ThePool().Run(n, chunk);
}

bool TakesW8A8(const WeightRef& w, int64_t t) {
  return w.format == WeightFormat::kInt8 && Int8ActivationsW8A8() && DirectKernels(t);
}

}  // namespace

const char* WeightFormatName(WeightFormat f) {
  switch (f) {
    case WeightFormat::kF32:
      return "f32";
    case WeightFormat::kInt8:
      return "int8";
    case WeightFormat::kFp8:
      return "fp8";
    case WeightFormat::kBf16:
      return "bf16";
  }
  return "?";
}

namespace {

// Row o of w, its bytes at q (row-major, or unpacked from a packed matrix).
__attribute__((target("avx2,fma"))) void DequantizeRowAvx2(const WeightRef& w, int64_t o,
                                                           const uint8_t* q, float* d) {
  const int64_t nb = (w.in + kFp8Block - 1) / kFp8Block;
  int64_t i = 0;
  for (; i + 8 <= w.in; i += 8) {
    const float s = w.format == WeightFormat::kInt8
                        ? w.scales[o]
                        : w.scales[(o / kFp8Block) * nb + i / kFp8Block];
    const __m256 v = w.format == WeightFormat::kInt8 ? LoadInt8(q + i) : LoadFp8(q + i);
    _mm256_storeu_ps(d + i, _mm256_mul_ps(v, _mm256_set1_ps(s)));
  }
  for (; i < w.in; ++i) {
    const float s = w.format == WeightFormat::kInt8
                        ? w.scales[o]
                        : w.scales[(o / kFp8Block) * nb + i / kFp8Block];
    d[i] = (w.format == WeightFormat::kInt8 ? static_cast<float>(static_cast<int8_t>(q[i]))
                                            : Fp8E4M3ToFloat(q[i])) *
           s;
  }
}

}  // namespace

void Dequantize(const WeightRef& w, int64_t o0, int64_t o1, float* dst) {
  const int64_t nb = (w.in + kFp8Block - 1) / kFp8Block;
  const bool avx2 = UseAvx2();
  for (int64_t o = o0; o < o1; ++o) {
    float* d = dst + (o - o0) * w.in;
    if (w.format == WeightFormat::kF32) {
      std::copy(w.f32 + o * w.in, w.f32 + (o + 1) * w.in, d);
    } else if (w.format == WeightFormat::kBf16 && w.packed) {
      thread_local std::vector<uint16_t> row;
      row.resize(static_cast<size_t>(w.in));
      UnpackRow(w.format, w.bf16, w.in, o, row.data());
      Bf16ToFloatN(row.data(), static_cast<size_t>(w.in), d);
    } else if (w.format == WeightFormat::kBf16) {
      Bf16ToFloatN(w.bf16 + o * w.in, static_cast<size_t>(w.in), d);
    } else if (w.format == WeightFormat::kInt8 && w.packed) {
      thread_local std::vector<int8_t> row;
      row.resize(static_cast<size_t>(w.in));
      UnpackRow(w.format, w.q, w.in, o, row.data());
      for (int64_t i = 0; i < w.in; ++i) d[i] = static_cast<float>(row[i]) * w.scales[o];
    } else if (w.format == WeightFormat::kFp8 && w.packed) {
      thread_local std::vector<uint8_t> row;
      row.resize(static_cast<size_t>(w.in));
      UnpackRow(w.format, w.q, w.in, o, row.data());
      if (avx2) {  // the row-major path's decoding (LoadFp8), 8 at a time
        DequantizeRowAvx2(w, o, row.data(), d);
        continue;
      }
      for (int64_t i = 0; i < w.in; ++i) {
        d[i] = Fp8E4M3ToFloat(row[static_cast<size_t>(i)]) *
               w.scales[(o / kFp8Block) * nb + i / kFp8Block];
      }
    } else if (avx2) {
      DequantizeRowAvx2(w, o, w.q + o * w.in, d);
    } else if (w.format == WeightFormat::kInt8) {
      const int8_t* q = reinterpret_cast<const int8_t*>(w.q) + o * w.in;
      for (int64_t i = 0; i < w.in; ++i) d[i] = static_cast<float>(q[i]) * w.scales[o];
    } else {
      for (int64_t i = 0; i < w.in; ++i) {
        d[i] = Fp8E4M3ToFloat(w.q[o * w.in + i]) * w.scales[(o / kFp8Block) * nb + i / kFp8Block];
      }
    }
  }
}

bool Packable(WeightFormat f, int64_t out, int64_t in) {
  if (f == WeightFormat::kBf16) return Bf16Packable(out, in);
  if (f == WeightFormat::kInt8) return Int8Packable(out, in);
  if (f == WeightFormat::kFp8) return out > 0 && in > 0 && out % 8 == 0 && in % 8 == 0;
  return false;
}

namespace {
// Element size and columns per block of a packed format.
void PackShape(WeightFormat f, int64_t* elem, int64_t* cols) {
  *elem = f == WeightFormat::kBf16 ? 2 : 1;
  *cols = f == WeightFormat::kInt8 ? 32 : 8;
}
}  // namespace

void PackRows(WeightFormat f, const void* src, int64_t out, int64_t in, void* dst) {
  int64_t elem = 0, cols = 0;
  PackShape(f, &elem, &cols);
  const int64_t row = in * elem, block = cols * elem, group = 8 * row;
  const auto* s = static_cast<const uint8_t*>(src);
  auto* d = static_cast<uint8_t*>(dst);
  std::vector<uint8_t> scratch(static_cast<size_t>(group));
  for (int64_t g = 0; g < out / 8; ++g) {
    const uint8_t* from = s + g * group;
    if (s == d) {  // in place: the group's rows to scratch first
      std::memcpy(scratch.data(), from, static_cast<size_t>(group));
      from = scratch.data();
    }
    uint8_t* to = d + g * group;
    for (int64_t r = 0; r < 8; ++r) {
      for (int64_t j = 0; j < row; j += block) {
        std::memcpy(to + j * 8 + r * block, from + r * row + j, static_cast<size_t>(block));
      }
    }
  }
}

void UnpackRow(WeightFormat f, const void* w, int64_t in, int64_t o, void* dst) {
  int64_t elem = 0, cols = 0;
  PackShape(f, &elem, &cols);
  const int64_t row = in * elem, block = cols * elem;
  const uint8_t* g = static_cast<const uint8_t*>(w) + (o / 8) * 8 * row;
  for (int64_t j = 0; j < row; j += block) {
    std::memcpy(static_cast<uint8_t*>(dst) + j, g + j * 8 + (o % 8) * block,
                static_cast<size_t>(block));
  }
}

void LinearW(const float* x, int64_t t, const WeightRef& w, float* y, int64_t ldx, int64_t ldy) {
  if (w.format == WeightFormat::kF32) {
    Linear(x, t, w.in, w.f32, w.out, y, ldx, ldy);
    return;
  }
  if (ldx == 0) ldx = w.in;
  if (ldy == 0) ldy = w.out;
  if (TakesW8A8(w, t)) {
    const W8A8Product p{&w, nullptr, y, ldy};
    LinearW8A8(x, t, ldx, &p, 1);
    return;
  }
  if (w.format == WeightFormat::kBf16 && DirectKernels(t)) {
    if (w.packed && Bf16ActivationsA16()) {
      LinearBf16A16(x, t, ldx, w.bf16, w.out, w.in, y, ldy);
    } else if (w.packed) {
      DotRowsBf16Packed(x, t, ldx, w.bf16, w.out, w.in, y, ldy);
    } else {
      DotRowsBf16(x, t, ldx, w.bf16, w.out, w.in, w.in, y, ldy);
    }
    return;
  }
  if (w.format == WeightFormat::kFp8 && w.packed && DirectKernels(t)) {
    if (Bf16ActivationsA16()) {
      LinearFp8A16(x, t, ldx, w, y, ldy);
    } else {
      LinearFp8Packed(x, t, ldx, w, y, ldy);
    }
    return;
  }
  int64_t per = 0;
  const int64_t chunks = Chunks(w.out, w.in, &per);
  // The invariant mode always takes the register kernel (its rows never interact); the BLAS
  // mode dequantizes for sgemm beyond kDirectRows rows.
  // (Packed int8 under W8A16, a comparison mode: dequantized below; its kernel reads row-major.)
  if (DirectKernels(t) && !w.packed) {
    // Groups of up to 8 rows through the register kernel; a chunk of weight rows stays in cache
    // from one group to the next.
    const bool avx2 = UseAvx2();
    const bool fp8 = w.format == WeightFormat::kFp8;
    ThePool().RunEach(static_cast<int>(chunks), [&](int c) {
      const int64_t o0 = c * per, o1 = std::min(w.out, o0 + per);
      for (int64_t m0 = 0; m0 < t; m0 += 8) {
        const int64_t mt = std::min<int64_t>(8, t - m0);
        const float* xm = x + m0 * ldx;
        float* ym = y + m0 * ldy;
        if (!avx2) {
          RowsScalar(xm, mt, ldx, w, ym, ldy, o0, o1);
        } else if (fp8) {
          Dispatch<true>(xm, mt, ldx, w, ym, ldy, o0, o1);
        } else {
          Dispatch<false>(xm, mt, ldx, w, ym, ldy, o0, o1);
        }
      }
    });
    return;
  }
  // Many rows: compute-bound, so dequantize once and use the fp32 GEMM.
  thread_local std::vector<float> full;
  full.resize(static_cast<size_t>(w.out * w.in));
  float* dst = full.data();  // (a thread_local named inside the lambda would be the worker's)
  ThePool().RunEach(static_cast<int>(chunks), [&](int c) {
    const int64_t o0 = c * per, o1 = std::min(w.out, o0 + per);
    Dequantize(w, o0, o1, dst + o0 * w.in);
  });
  Linear(x, t, w.in, dst, w.out, y, ldx, ldy);
}

void LinearW2(const float* x, int64_t t, const WeightRef& w1, float* y1, const WeightRef& w2,
              float* y2) {
  if (TakesW8A8(w1, t) && TakesW8A8(w2, t) && w1.in == w2.in) {
    const W8A8Product ps[2] = {{&w1, nullptr, y1, w1.out}, {&w2, nullptr, y2, w2.out}};
    LinearW8A8(x, t, w1.in, ps, 2);
    return;
  }
  LinearW(x, t, w1, y1);
  LinearW(x, t, w2, y2);
}

void SwiGluMlpW(const float* x, int64_t t, const WeightRef& gate, const WeightRef& up,
                const WeightRef& down, float* y, std::vector<float>* scratch) {
  const int64_t width = gate.out;
  scratch->resize(static_cast<size_t>(2 * t * width));
  float* g = scratch->data();
  float* u = g + t * width;
  LinearW2(x, t, gate, g, up, u);
  SiluMul(g, u, t * width, g);
  LinearW(g, t, down, y);
}

bool SwiGluPieces::Prepare(const float* x, int64_t t, const WeightRef& gate, const WeightRef& up,
                           const WeightRef& down, float* y) {
  chunks_[0] = chunks_[1] = chunks_[2] = 0;
  const auto bf16 = [t](const WeightRef& w) {  // LinearW's packed-bf16 branch
    return w.format == WeightFormat::kBf16 && w.packed && DirectKernels(t);
  };
  if (TakesW8A8(gate, t) && TakesW8A8(up, t) && TakesW8A8(down, t)) {
    kind_ = Kind::kW8A8;
  } else if (bf16(gate) && bf16(up) && bf16(down)) {
    kind_ = Bf16ActivationsA16() ? Kind::kBf16A16 : Kind::kBf16;
  } else {
    return false;
  }
  if (gate.in != up.in || gate.out != up.out || down.in != gate.out) return false;
  w_[0] = gate;
  w_[1] = up;
  w_[2] = down;
  for (int i = 0; i < 3; ++i) chunks_[i] = Chunks(w_[i].out, w_[i].in, &per_[i]);
  x_ = x;
  t_ = t;
  y_ = y;
  gu_.resize(static_cast<size_t>(2 * t * gate.out));
  if (kind_ == Kind::kBf16A16) {
    xb_.resize(static_cast<size_t>(t * gate.in));
    hb_.resize(static_cast<size_t>(t * down.in));
    FloatToBf16N(x, xb_.size(), xb_.data());
  } else if (kind_ == Kind::kW8A8) {
    for (int i = 0; i < 3; ++i) sums_[i] = RowSums(w_[i], &sums_here_[i]);
    ldq_in_ = (gate.in + 63) / 64 * 64;
    ldq_mid_ = (down.in + 63) / 64 * 64;
    qx_.resize(static_cast<size_t>(t * ldq_in_));
    sx_.resize(static_cast<size_t>(t));
    qh_.resize(static_cast<size_t>(t * ldq_mid_));
    sh_.resize(static_cast<size_t>(t));
    QuantizeRowsInt8(x, t, gate.in, gate.in, qx_.data(), ldq_in_, sx_.data());
  }
  return true;
}

// Chunk `chunk` of product p's output rows, through LinearW's kernel for it.
void SwiGluPieces::Rows(int p, int64_t chunk) {
  const WeightRef& w = w_[p];
  float* const out[3] = {gu_.data(), gu_.data() + t_ * w_[0].out, y_};
  const int64_t o0 = chunk * per_[p], o1 = std::min(w.out, o0 + per_[p]);
  switch (kind_) {
    case Kind::kW8A8: {
      const W8A8Product product{&w, sums_[p], out[p], w.out};
      if (p == 2) {
        W8A8Rows(qh_.data(), sh_.data(), t_, ldq_mid_, product, o0, o1);
      } else {
        W8A8Rows(qx_.data(), sx_.data(), t_, ldq_in_, product, o0, o1);
      }
      return;
    }
    case Kind::kBf16:
      DotRowsBf16PackedRows(p == 2 ? gu_.data() : x_, t_, w.in, w.bf16, w.in, out[p], w.out, o0,
                            o1);
      return;
    case Kind::kBf16A16:
      LinearBf16A16Rows(p == 2 ? hb_.data() : xb_.data(), t_, w.in, w.bf16, out[p], w.out, o0, o1);
      return;
  }
}

void SwiGluPieces::Front(int i) {
  if (i < chunks_[0]) {
    Rows(0, i);
  } else {
    Rows(1, i - chunks_[0]);
  }
}

void SwiGluPieces::Middle() {
  const int64_t width = w_[0].out;
  float* g = gu_.data();
  SiluMul(g, g + t_ * width, t_ * width, g);
  if (kind_ == Kind::kW8A8) {
    QuantizeRowsInt8(g, t_, width, width, qh_.data(), ldq_mid_, sh_.data());
  } else if (kind_ == Kind::kBf16A16) {
    FloatToBf16N(g, static_cast<size_t>(t_ * width), hb_.data());
  }
}

void SwiGluPieces::Back(int i) { Rows(2, i); }

namespace {

// One row of QuantizeInt8PerChannel, the same operations 8 at a time: max |w| (exact in any
// order; a NaN weight is skipped, as std::max skips it), w / s rounded to nearest even (vroundps,
// as nearbyint), clamped to [-127, 127] (a NaN quotient to 127, as std::min gives).
__attribute__((target("avx2"))) void QuantizeWeightRowAvx2(const float* w, int64_t in, uint8_t* q,
                                                           float* scale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8)  // maxps returns its second operand when one is NaN
    mx = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(w + i), abs_mask), mx);
  alignas(32) float l[8];
  _mm256_store_ps(l, mx);
  float amax = 0;
  for (float v : l) amax = std::max(amax, v);
  for (; i < in; ++i) amax = std::max(amax, std::fabs(w[i]));
  const float s = amax > 0 ? amax / 127.0f : 1.0f;
  *scale = s;
  const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  for (i = 0; i + 8 <= in; i += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(w + i), vs),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_max_ps(_mm256_min_ps(v, hi), lo);
    const __m256i n = _mm256_cvtps_epi32(v);  // exact: an integer in [-127, 127]
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(n), _mm256_extracti128_si256(n, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(w16, w16));
  }
  for (; i < in; ++i) {
    const float v = std::nearbyint(w[i] / s);
    q[i] = static_cast<uint8_t>(static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, v))));
  }
}

}  // namespace

void QuantizeInt8PerChannel(const float* w, int64_t out, int64_t in, std::vector<uint8_t>* q,
                            std::vector<float>* scales) {
  q->resize(static_cast<size_t>(out * in));
  scales->resize(static_cast<size_t>(out));
  const bool avx2 = UseAvx2();
  for (int64_t o = 0; o < out; ++o) {
    if (avx2) {
      QuantizeWeightRowAvx2(w + o * in, in, q->data() + o * in, scales->data() + o);
      continue;
    }
    float amax = 0;
    for (int64_t i = 0; i < in; ++i) amax = std::max(amax, std::fabs(w[o * in + i]));
    const float s = amax > 0 ? amax / 127.0f : 1.0f;
    (*scales)[static_cast<size_t>(o)] = s;
    for (int64_t i = 0; i < in; ++i) {
      const float v = std::nearbyint(w[o * in + i] / s);
      (*q)[static_cast<size_t>(o * in + i)] =
          static_cast<uint8_t>(static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, v))));
    }
  }
}

void QuantizeFp8Blocks(const float* w, int64_t out, int64_t in, std::vector<uint8_t>* q,
                       std::vector<float>* scale_inv) {
  const int64_t bo = (out + kFp8Block - 1) / kFp8Block, bi = (in + kFp8Block - 1) / kFp8Block;
  q->resize(static_cast<size_t>(out * in));
  scale_inv->resize(static_cast<size_t>(bo * bi));
  for (int64_t a = 0; a < bo; ++a) {
    for (int64_t b = 0; b < bi; ++b) {
      const int64_t o1 = std::min(out, (a + 1) * kFp8Block), i1 = std::min(in, (b + 1) * kFp8Block);
      float amax = 0;
      for (int64_t o = a * kFp8Block; o < o1; ++o) {
        for (int64_t i = b * kFp8Block; i < i1; ++i)
          amax = std::max(amax, std::fabs(w[o * in + i]));
      }
      const float s = amax > 0 ? amax / 448.0f : 1.0f;
      (*scale_inv)[static_cast<size_t>(a * bi + b)] = s;
      for (int64_t o = a * kFp8Block; o < o1; ++o) {
        for (int64_t i = b * kFp8Block; i < i1; ++i) {
          (*q)[static_cast<size_t>(o * in + i)] = FloatToFp8E4M3(w[o * in + i] / s);
        }
      }
    }
  }
}

}  // namespace dmoe::cpu
