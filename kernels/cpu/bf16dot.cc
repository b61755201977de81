#include "kernels/cpu/bf16dot.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/tiles.h"

// Compiled with -ffp-contract=off (kernels/cpu/BUILD): the emulations fuse exactly where the
// definition does (each product into its lane's sum: an explicit fma, as vdpbf16ps computes it,
// so that a product below the smallest normal float is not flushed before it is added) and
// nowhere else.

namespace dmoe::cpu {
namespace {

std::atomic<bool> g_a16{false};
std::atomic<int> g_forced{-1};

// Flush-to-zero and denormals-are-zero for the lifetime of the guard (the definition's mode; the
// arithmetic runs in noinline functions called inside it).
class FtzDaz {
 public:
  FtzDaz() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FtzDaz() { _mm_setcsr(saved_); }
  FtzDaz(const FtzDaz&) = delete;
  FtzDaz& operator=(const FtzDaz&) = delete;

 private:
  unsigned saved_;
};

inline float Reduce4(const float* l) { return (l[0] + l[2]) + (l[1] + l[3]); }

// ---- portable ----

__attribute__((noinline)) void RowsPortable(const uint16_t* xb, int64_t t, int64_t ldb,
                                            const uint16_t* w, int64_t k, float* y, int64_t ldy,
                                            int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* g = w + (o / kPackRows) * kPackRows * k + (o % kPackRows) * 8;
    for (int64_t m = 0; m < t; ++m) {
      const uint16_t* x = xb + m * ldb;
      float acc[4] = {0, 0, 0, 0};
      for (int64_t b = 0; b < k / 8; ++b) {
        const uint16_t* wb = g + b * kPackRows * 8;
        for (int p = 0; p < 4; ++p) {
          acc[p] = std::fma(Bf16ToFloat(x[8 * b + 2 * p + 1]), Bf16ToFloat(wb[2 * p + 1]), acc[p]);
          acc[p] = std::fma(Bf16ToFloat(x[8 * b + 2 * p]), Bf16ToFloat(wb[2 * p]), acc[p]);
        }
      }
      y[m * ldy + o] = Reduce4(acc);
    }
  }
}

// ---- AVX2: the same operations, 2 weight rows per register (lanes 0-3 and 4-7) ----

template <int T>
__attribute__((target("avx2,fma"))) void TileAvx2(const uint16_t* xb, int64_t ldb,
                                                  const uint16_t* g, int64_t k, float* y,
                                                  int64_t ldy) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 acc[T][4];
#pragma GCC unroll 2
  for (int m = 0; m < T; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t b = 0; b < k / 8; ++b, g += kPackRows * 8) {
    __m256 xo[T], xe[T];
#pragma GCC unroll 2
    for (int m = 0; m < T; ++m) {
      const __m256i xv = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + m * ldb + 8 * b)));
      xo[m] = _mm256_castsi256_ps(_mm256_and_si256(xv, high));  // elements 2p + 1
      xe[m] = _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16));   // elements 2p
    }
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 16 * v));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
#pragma GCC unroll 2
      for (int m = 0; m < T; ++m) {
        acc[m][v] = _mm256_fmadd_ps(xo[m], wo, acc[m][v]);
        acc[m][v] = _mm256_fmadd_ps(xe[m], we, acc[m][v]);
      }
    }
  }
  for (int m = 0; m < T; ++m) {
    for (int v = 0; v < 4; ++v) {
      alignas(32) float l[8];
      _mm256_store_ps(l, acc[m][v]);
      y[m * ldy + 2 * v] = Reduce4(l);
      y[m * ldy + 2 * v + 1] = Reduce4(l + 4);
    }
  }
}

__attribute__((noinline)) void RowsAvx2(const uint16_t* xb, int64_t t, int64_t ldb,
                                        const uint16_t* w, int64_t k, float* y, int64_t ldy,
                                        int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; o += kPackRows) {
    const uint16_t* g = w + o * k;
    int64_t m = 0;
    for (; m + 2 <= t; m += 2) TileAvx2<2>(xb + m * ldb, ldb, g, k, y + m * ldy + o, ldy);
    if (m < t) TileAvx2<1>(xb + m * ldb, ldb, g, k, y + m * ldy + o, ldy);
  }
}

// GCC 12 reports the intrinsics' own _mm512_undefined_* as uninitialized (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// ---- AVX512-BF16: one register holds 4 weight rows' 8 columns (lanes 4r..4r+3 = row r's pairs),
// against the same 8 columns of x in each 128-bit quarter ----

template <int T>
__attribute__((target("avx512bf16,avx512f,avx512bw,avx2"))) void TileBf16(
    const uint16_t* xb, int64_t ldb, const uint16_t* g, int64_t k, float* y, int64_t ldy) {
  __m512 acc[T][2];
#pragma GCC unroll 12
  for (int m = 0; m < T; ++m) {
    acc[m][0] = _mm512_setzero_ps();
    acc[m][1] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < k / 8; ++b, g += kPackRows * 8) {
    PrefetchTileWeights<T, 2>(g);  // this step's 128 bytes, kTilePrefetchBytes on
    const __m512i w0 = _mm512_loadu_si512(g);
    const __m512i w1 = _mm512_loadu_si512(g + 32);
#pragma GCC unroll 12
    for (int m = 0; m < T; ++m) {
      const __m512i xv = _mm512_broadcast_i32x4(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + m * ldb + 8 * b)));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)xv, (__m512bh)w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)xv, (__m512bh)w1);
    }
  }
  for (int m = 0; m < T; ++m) {
    for (int h = 0; h < 2; ++h) {
      alignas(64) float l[16];
      _mm512_store_ps(l, acc[m][h]);
      for (int q = 0; q < 4; ++q) y[m * ldy + 4 * h + q] = Reduce4(l + 4 * q);
    }
  }
}

#pragma GCC diagnostic pop

__attribute__((noinline)) void RowsBf16(const uint16_t* xb, int64_t t, int64_t ldb,
                                        const uint16_t* w, int64_t k, float* y, int64_t ldy,
                                        int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; o += kPackRows) {
    const uint16_t* g = w + o * k;
    // Up to 12 rows per tile (24 accumulators, 2 weight registers, an x one): tiles.h.
    ForEachTile<12>(t, [&](auto tile, int64_t m) {
      TileBf16<decltype(tile)::value>(xb + m * ldb, ldb, g, k, y + m * ldy + o, ldy);
    });
  }
}

void RowsAt(int level, const uint16_t* xb, int64_t t, int64_t ldb, const uint16_t* w, int64_t k,
            float* y, int64_t ldy, int64_t o0, int64_t o1) {
  FtzDaz mode;
  if (level >= 2) {
    RowsBf16(xb, t, ldb, w, k, y, ldy, o0, o1);
  } else if (level == 1) {
    RowsAvx2(xb, t, ldb, w, k, y, ldy, o0, o1);
  } else {
    RowsPortable(xb, t, ldb, w, k, y, ldy, o0, o1);
  }
}

// The CPU's vdpbf16ps against the definition (the portable code) on values that exercise rounding
// and underflow: the instruction is used only where every bit agrees. Two sets: exponents spread
// wide (tiny and huge operands, products flushed or lost in the sum), and every operand near
// 2^-64, so that products fall on both sides of the smallest normal float while the lane sums
// stay normal (a CPU that flushed such products before adding them would differ there).
bool HardwareMatchesDefinition() {
  constexpr int64_t kT = 3, kK = 64, kN = 16;
  uint32_t s = 12345;
  auto next = [&s] {
    s = s * 1664525u + 1013904223u;
    return s;
  };
  for (const bool tiny : {false, true}) {
    std::vector<uint16_t> xb(kT * kK), w(kN * kK);
    for (auto* v : {&xb, &w}) {
      for (uint16_t& h : *v) {
        const uint32_t r = next();
        // sign, a biased exponent, 7 random mantissa bits
        const uint32_t exp = tiny                 ? 62 + (r >> 12) % 4
                             : (r >> 8) % 16 == 0 ? 1 + (r >> 12) % 40
                                                  : 100 + (r >> 12) % 40;
        h = static_cast<uint16_t>(((r & 1u) << 15) | (exp << 7) | ((r >> 1) & 0x7fu));
      }
    }
    std::vector<float> a(kT * kN), b(kT * kN);
    RowsAt(2, xb.data(), kT, kK, w.data(), kK, a.data(), kN, 0, kN);
    RowsAt(0, xb.data(), kT, kK, w.data(), kK, b.data(), kN, 0, kN);
    if (std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) != 0) return false;
  }
  return true;
}

int CpuLevel() {
  static const int level = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
        HardwareMatchesDefinition()) {
      return 2;
    }
    return 1;
  }();
  return level;
}

int Level() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced < 0 ? CpuLevel() : std::min(forced, CpuLevel());
}

// ---- packed fp8 (e4m3) weights under A16 ----

// The bf16 bits of an e4m3 code (its exact value; 0x7f / 0xff are +-480): normal codes move the
// exponent (bias 7 -> 127: + 120 << 7), the 7 subnormals are normalised, +-0 stay.
uint16_t Fp8ToBf16Bits(uint8_t b) {
  const uint16_t mag = b & 0x7f, sign = static_cast<uint16_t>((b & 0x80) << 8);
  if (mag >= 8) return static_cast<uint16_t>(sign | ((mag << 4) + 0x3c00));
  if (mag == 0) return sign;
  const int p = mag >= 4 ? 2 : mag >= 2 ? 1 : 0;  // m * 2^-9 = 2^(p - 9) * (m / 2^p)
  return static_cast<uint16_t>(sign | (118 + p) << 7 | (mag - (1 << p)) << (7 - p));
}

const uint16_t* Fp8Bf16Table() {
  static const std::vector<uint16_t> lut = [] {
    std::vector<uint16_t> v(256);
    for (int c = 0; c < 256; ++c)
      v[static_cast<size_t>(c)] = Fp8ToBf16Bits(static_cast<uint8_t>(c));
    return v;
  }();
  return lut.data();
}

void DecodeFp8Avx512(const uint8_t* q, int64_t n, uint16_t* out);

// The group decoded (exactly) to a packed bf16 group, then each block through the level's A16
// products, times its scale: below AVX512-BF16, and there for many rows (decoded once, not per
// tile of 4). Inside the caller's FtzDaz.
__attribute__((noinline)) void Fp8RowsDecoded(int level, const uint16_t* xb, int64_t t, int64_t ldb,
                                              const uint8_t* q, int64_t k, const float* srow,
                                              int64_t block, float* y, int64_t ldy, int64_t o) {
  thread_local std::vector<uint16_t> g16;
  thread_local std::vector<float> part, total;
  g16.resize(static_cast<size_t>(8 * k));
  part.resize(static_cast<size_t>(8 * t));
  total.assign(part.size(), 0.0f);
  if (level >= 2) {
    DecodeFp8Avx512(q, 8 * k, g16.data());
  } else {
    const uint16_t* lut = Fp8Bf16Table();
    for (int64_t i = 0; i < 8 * k; ++i) g16[static_cast<size_t>(i)] = lut[q[i]];
  }
  for (int64_t k0 = 0; k0 < k; k0 += block) {
    const int64_t kb = std::min(block, k - k0);
    if (level >= 2) {
      RowsBf16(xb + k0, t, ldb, g16.data() + k0 * 8, kb, part.data(), 8, 0, 8);
    } else if (level == 1) {
      RowsAvx2(xb + k0, t, ldb, g16.data() + k0 * 8, kb, part.data(), 8, 0, 8);
    } else {
      RowsPortable(xb + k0, t, ldb, g16.data() + k0 * 8, kb, part.data(), 8, 0, 8);
    }
    const float scale = srow[k0 / block];
    for (int64_t i = 0; i < 8 * t; ++i) {
      const float p = part[static_cast<size_t>(i)] * scale;
      total[static_cast<size_t>(i)] = total[static_cast<size_t>(i)] + p;
    }
  }
  for (int64_t m = 0; m < t; ++m) {
    for (int r = 0; r < 8; ++r) y[m * ldy + o + r] = total[static_cast<size_t>(m * 8 + r)];
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// 32 codes -> 32 bf16 (the bits of Fp8ToBf16Bits), in registers. `subnormals`: the bits of codes
// 0..31 (Fp8Bf16Table's start); only those below 8 are taken from it.
__attribute__((target("avx512bf16,avx512f,avx512bw,avx2"))) inline __m512i DecodeFp8x32(
    const uint8_t* q, __m512i subnormals) {
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  const __m512i mag = _mm512_and_si512(w, _mm512_set1_epi16(0x7f));
  const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(0x3c00));
  const __mmask32 sub = _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8));
  const __m512i v = _mm512_mask_mov_epi16(normal, sub, _mm512_permutexvar_epi16(mag, subnormals));
  return _mm512_or_si512(v, _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x80)), 8));
}

// n codes (a multiple of 32) -> bf16 bits.
__attribute__((target("avx512bf16,avx512f,avx512bw,avx2"))) void DecodeFp8Avx512(const uint8_t* q,
                                                                                 int64_t n,
                                                                                 uint16_t* out) {
  const __m512i subnormals = _mm512_loadu_si512(Fp8Bf16Table());
  for (int64_t i = 0; i < n; i += 32) _mm512_storeu_si512(out + i, DecodeFp8x32(q + i, subnormals));
}

// TileBf16 over a packed fp8 group decoded in registers, reduced and scaled per block of columns:
// per block the bits of TileBf16 with k = the block's columns, then total + part * scale.
template <int T>
__attribute__((target("avx512bf16,avx512f,avx512bw,avx2"))) void TileFp8(
    const uint16_t* xb, int64_t ldb, const uint8_t* g, int64_t k, const float* srow, int64_t block,
    const uint16_t* table, float* y, int64_t ldy) {
  const __m512i subnormals = _mm512_loadu_si512(table);
  float total[T][8] = {};
  for (int64_t k0 = 0; k0 < k; k0 += block) {
    const int64_t b1 = std::min(k, k0 + block) / 8;
    __m512 acc[T][2];
#pragma GCC unroll 4
    for (int m = 0; m < T; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t b = k0 / 8; b < b1; ++b) {
      const __m512i w0 = DecodeFp8x32(g + 64 * b, subnormals);
      const __m512i w1 = DecodeFp8x32(g + 64 * b + 32, subnormals);
#pragma GCC unroll 4
      for (int m = 0; m < T; ++m) {
        const __m512i xv = _mm512_broadcast_i32x4(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + m * ldb + 8 * b)));
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)xv, (__m512bh)w0);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)xv, (__m512bh)w1);
      }
    }
    const float scale = srow[k0 / block];
    for (int m = 0; m < T; ++m) {
      for (int h = 0; h < 2; ++h) {
        alignas(64) float l[16];
        _mm512_store_ps(l, acc[m][h]);
        for (int q = 0; q < 4; ++q) {
          const float p = Reduce4(l + 4 * q) * scale;
          total[m][4 * h + q] = total[m][4 * h + q] + p;
        }
      }
    }
  }
  for (int m = 0; m < T; ++m) {
    for (int r = 0; r < 8; ++r) y[m * ldy + r] = total[m][r];
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

__attribute__((noinline)) void Fp8RowsBf16(const uint16_t* xb, int64_t t, int64_t ldb,
                                           const uint8_t* g, int64_t k, const float* srow,
                                           int64_t block, float* y, int64_t ldy) {
  const uint16_t* tb = Fp8Bf16Table();  // its first 32 codes: TileFp8's lookup table
  int64_t m = 0;
  for (; m + 4 <= t; m += 4) TileFp8<4>(xb + m * ldb, ldb, g, k, srow, block, tb, y + m * ldy, ldy);
  if (t - m == 3) TileFp8<3>(xb + m * ldb, ldb, g, k, srow, block, tb, y + m * ldy, ldy);
  if (t - m == 2) TileFp8<2>(xb + m * ldb, ldb, g, k, srow, block, tb, y + m * ldy, ldy);
  if (t - m == 1) TileFp8<1>(xb + m * ldb, ldb, g, k, srow, block, tb, y + m * ldy, ldy);
}

}  // namespace

void SetBf16Activations(bool a16) { g_a16 = a16; }
bool Bf16ActivationsA16() { return g_a16.load(std::memory_order_relaxed); }

int SetBf16DotIsaForTesting(int level) {
  g_forced = level;
  return Level();
}
int Bf16DotIsaLevel() { return CpuLevel(); }

void Bf16DotRowsPacked(const uint16_t* xb, int64_t t, int64_t ldb, const uint16_t* w, int64_t k,
                       float* y, int64_t ldy, int64_t o0, int64_t o1) {
  assert(k % 8 == 0 && o0 % kPackRows == 0 && (o1 - o0) % kPackRows == 0);
  if (t <= 0 || o1 <= o0) return;
  RowsAt(Level(), xb, t, ldb, w, k, y, ldy, o0, o1);
}

void Fp8DotRowsPackedA16(const uint16_t* xb, int64_t t, int64_t ldb, const uint8_t* q, int64_t k,
                         const float* scales, int64_t block, float* y, int64_t ldy, int64_t o0,
                         int64_t o1) {
  assert(k % 8 == 0 && block % 8 == 0 && o0 % kPackRows == 0 && (o1 - o0) % kPackRows == 0);
  if (t <= 0 || o1 <= o0) return;
  const int level = Level();
  const int64_t nb = (k + block - 1) / block;
  FtzDaz mode;
  for (int64_t o = o0; o < o1; o += kPackRows) {
    const float* srow = scales + (o / block) * nb;  // a group's rows share their scale row
    if (level >= 2 && t < 16) {
      Fp8RowsBf16(xb, t, ldb, q + o * k, k, srow, block, y + o, ldy);
    } else {
      Fp8RowsDecoded(level, xb, t, ldb, q + o * k, k, srow, block, y, ldy, o);
    }
  }
}

void LinearBf16A16Rows(const uint16_t* xb, int64_t t, int64_t k, const uint16_t* w, float* y,
                       int64_t ldy, int64_t o0, int64_t o1) {
  // Blocks of x rows (~128 KiB) stay in L2 while the chunk's weight groups pass by.
  const int64_t block = std::max<int64_t>(4, (int64_t{1} << 16) / k / 4 * 4);
  for (int64_t m0 = 0; m0 < t; m0 += block) {
    Bf16DotRowsPacked(xb + m0 * k, std::min(block, t - m0), k, w, k, y + m0 * ldy, ldy, o0, o1);
  }
}

void LinearBf16A16(const float* x, int64_t t, int64_t ldx, const uint16_t* w, int64_t n, int64_t k,
                   float* y, int64_t ldy) {
  if (t <= 0 || n <= 0) return;
  thread_local std::vector<uint16_t> rounded;
  rounded.resize(static_cast<size_t>(t * k));
  for (int64_t m = 0; m < t; ++m) {
    FloatToBf16N(x + m * ldx, static_cast<size_t>(k), rounded.data() + m * k);
  }
  const uint16_t* xb =
      rounded.data();  // (a thread_local named in the lambda would be the worker's)
  const int64_t work = t * n * k;
  const int64_t chunks =
      work < (int64_t{1} << 17)
          ? 1
          : std::min<int64_t>(ThePool().size() * 2, std::max<int64_t>(1, n / (2 * kPackRows)));
  const int64_t per = ((n + chunks - 1) / chunks + kPackRows - 1) / kPackRows * kPackRows;
  auto run = [&](int c) {
    const int64_t o0 = c * per, o1 = std::min(n, o0 + per);
    LinearBf16A16Rows(xb, t, k, w, y, ldy, o0, o1);
  };
  const int64_t used = (n + per - 1) / per;
  if (used == 1) {
    run(0);
  } else {
    ThePool().RunEach(static_cast<int>(used), run);
  }
}

}  // namespace dmoe::cpu
