#include "common/dtype.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>

namespace dmoe {

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kF8E4M3:
      return "F8_E4M3";
  }
  return "?";
}

bool ParseDTypeName(absl::string_view name, DType* out) {
  if (name == "F32") {
    *out = DType::kF32;
  } else if (name == "BF16") {
    *out = DType::kBF16;
  } else if (name == "F16") {
    *out = DType::kF16;
  } else if (name == "F8_E4M3") {
    *out = DType::kF8E4M3;
  } else {
    return false;
  }
  return true;
}

float Fp8E4M3ToFloat(uint8_t v) {
  const int exp = (v >> 3) & 0xf;
  const int mant = v & 7;
  float mag;
  if (exp == 15 && mant == 7) {
    mag = NAN;
  } else if (exp == 0) {
    mag = std::ldexp(static_cast<float>(mant), -9);
  } else {
    mag = std::ldexp(static_cast<float>(8 + mant), exp - 10);
  }
  return (v & 0x80) ? -mag : mag;
}

uint8_t FloatToFp8E4M3(float f) {
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  if (std::isnan(f)) return sign | 0x7f;
  const float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;  // saturate (448 is the largest finite value)
  if (a < 0.015625f) {                  // below 2^-6: subnormal steps of 2^-9
    return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));  // 8 -> 0x08 = 2^-6
  }
  int e;
  std::frexp(a, &e);  // a = fr * 2^e, fr in [0.5, 1)
  int e2 = e - 1;     // a = 1.m * 2^e2, e2 in [-6, 8]
  int m = static_cast<int>(std::nearbyint((std::ldexp(a, -e2) - 1.0f) * 8.0f));
  if (m == 8) {
    m = 0;
    ++e2;
  }
  return sign | static_cast<uint8_t>(((e2 + 7) << 3) | m);
}

float F16ToFloat(uint16_t v) {
  const uint32_t sign = (v >> 15) & 1u;
  const uint32_t exp = (v >> 10) & 0x1fu;
  const uint32_t mant = v & 0x3ffu;
  float mag;
  if (exp == 0) {
    mag = std::ldexp(static_cast<float>(mant), -24);  // subnormal (or zero)
  } else if (exp == 31) {
    mag = mant == 0 ? INFINITY : NAN;
  } else {
    mag = std::ldexp(static_cast<float>(mant | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -mag : mag;
}

uint16_t FloatToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (absx >= 0x477ff000u) return sign | 0x7c00u;  // overflow to inf (round to nearest)
  float a;
  std::memcpy(&a, &absx, 4);
  if (absx < 0x38800000u) {  // below the smallest normal half: subnormal, round to nearest even
    const float scaled = a * 16777216.0f;  // 2^24
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  const uint32_t exp = (absx >> 23) - 127 + 15;
  uint32_t mant = absx & 0x7fffffu;
  uint32_t h = (exp << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carries into the exponent correctly
  return sign | static_cast<uint16_t>(h);
}

namespace {

__attribute__((target("avx2"))) void FloatToBf16Avx2(const float* src, size_t n, uint16_t* dst) {
  const __m256i lsb_mask = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(0x7fff);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf = _mm256_set1_epi32(0x7f800000);
  const __m256i quiet = _mm256_set1_epi32(0x00400000);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, abs_mask), inf);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), lsb_mask);
    __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(bias, lsb));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(b, quiet), is_nan);
    r = _mm256_srli_epi32(r, 16);
    // Pack the low 16 bits of eight 32-bit lanes.
    const __m128i lo = _mm256_castsi256_si128(r);
    const __m128i hi = _mm256_extracti128_si256(r, 1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_packus_epi32(lo, hi));
  }
  for (; i < n; ++i) dst[i] = FloatToBf16(src[i]);
}

__attribute__((target("avx2"))) void Bf16ToFloatAvx2(const uint16_t* src, size_t n, float* dst) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), w);
  }
  for (; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wmaybe-uninitialized
// reports as a use of an uninitialized value (a known false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The AVX2 rounding, 16 lanes wide (the same integer arithmetic, so the same results as the
// scalar form for every input, NaN and subnormals included — unlike vcvtneps2bf16, which
// flushes subnormals). The wire codec is memory-bound; this cuts a 1.3 M-value conversion from
// ~140 to ~100 us here.
__attribute__((target("avx512f"))) void FloatToBf16Avx512(const float* src, size_t n,
                                                          uint16_t* dst) {
  const __m512i lsb_mask = _mm512_set1_epi32(1);
  const __m512i bias = _mm512_set1_epi32(0x7fff);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i inf = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x00400000);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i b = _mm512_loadu_si512(src + i);
    const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(b, abs_mask), inf);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), lsb_mask);
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(bias, lsb));
    r = _mm512_mask_mov_epi32(r, is_nan, _mm512_or_si512(b, quiet));
    r = _mm512_srli_epi32(r, 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < n; ++i) dst[i] = FloatToBf16(src[i]);
}

// With AVX512_BF16: vcvtne2ps2bf16 rounds 32 values to nearest-even in one instruction, and
// gives the same bits as the scalar form for every input except subnormals, which it flushes to
// zero: a block of 32 with a subnormal in it (rare in hidden states) takes the integer path.
// 1.3 M values: ~170 -> ~100 us here (the AVX-512F path is bound by its ~10 operations per 16
// values while the data is in cache).
__attribute__((target("avx512f,avx512bf16"))) void FloatToBf16Avx512Bf16(const float* src, size_t n,
                                                                         uint16_t* dst) {
  const __m512i exp_mask = _mm512_set1_epi32(0x7f800000);
  const __m512i mant_mask = _mm512_set1_epi32(0x007fffff);
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 a = _mm512_loadu_ps(src + i);
    const __m512 b = _mm512_loadu_ps(src + i + 16);
    const __m512i ai = _mm512_castps_si512(a), bi = _mm512_castps_si512(b);
    // Lanes with a zero exponent and a nonzero mantissa.
    const __mmask16 sub_a =
        _mm512_mask_test_epi32_mask(_mm512_testn_epi32_mask(ai, exp_mask), ai, mant_mask);
    const __mmask16 sub_b =
        _mm512_mask_test_epi32_mask(_mm512_testn_epi32_mask(bi, exp_mask), bi, mant_mask);
    if (__builtin_expect((sub_a | sub_b) != 0, 0)) {
      FloatToBf16Avx512(src + i, 32, dst + i);
      continue;
    }
    _mm512_storeu_si512(dst + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
  }
  FloatToBf16Avx512(src + i, n - i, dst + i);
}

__attribute__((target("avx512f"))) void Bf16ToFloatAvx512(const uint16_t* src, size_t n,
                                                          float* dst) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  for (; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// 3 = AVX512_BF16 (float -> bf16 only), 2 = AVX-512F, 1 = AVX2, 0 = portable; the best this
// CPU has unless a test chose lower.
std::atomic<int> bf16_simd{-1};

int BestBf16Simd() {
  static const int best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16")
                              ? 3
                          : __builtin_cpu_supports("avx512f") ? 2
                          : __builtin_cpu_supports("avx2")    ? 1
                                                              : 0;
  return best;
}

int Bf16Simd() {
  const int forced = bf16_simd.load(std::memory_order_relaxed);
  return forced >= 0 ? forced : BestBf16Simd();
}

}  // namespace

int SetBf16SimdForTesting(int level) {
  const int used = level < 0 ? BestBf16Simd() : std::min(level, BestBf16Simd());
  bf16_simd.store(level < 0 ? -1 : used, std::memory_order_relaxed);
  return used;
}

void FloatToBf16N(const float* src, size_t n, uint16_t* dst) {
  switch (Bf16Simd()) {
    case 3:
      FloatToBf16Avx512Bf16(src, n, dst);
      return;
    case 2:
      FloatToBf16Avx512(src, n, dst);
      return;
    case 1:
      FloatToBf16Avx2(src, n, dst);
      return;
    default:
      for (size_t i = 0; i < n; ++i) dst[i] = FloatToBf16(src[i]);
  }
}

void Bf16ToFloatN(const uint16_t* src, size_t n, float* dst) {
  switch (Bf16Simd()) {
    case 3:  // nothing to gain from AVX512_BF16 here: bf16 -> float is a shift
    case 2:
      Bf16ToFloatAvx512(src, n, dst);
      return;
    case 1:
      Bf16ToFloatAvx2(src, n, dst);
      return;
    default:
      for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
  }
}

void ConvertToFloat(DType t, const void* src, size_t n, float* dst) {
  const auto* bytes = static_cast<const unsigned char*>(src);
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, bytes + 2 * i, 2);
        dst[i] = Bf16ToFloat(v);
      }
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, bytes + 2 * i, 2);
        dst[i] = F16ToFloat(v);
      }
      return;
    case DType::kF8E4M3:
      for (size_t i = 0; i < n; ++i) dst[i] = Fp8E4M3ToFloat(bytes[i]);
      return;
  }
}

}  // namespace dmoe
