#include "kernels/cpu/small_gemm.h"

#include <immintrin.h>

namespace dmoe::cpu {
namespace {

constexpr int64_t kRows = 4;  // weight rows per block: 4 x K floats stay in L1

void SmallMLinearScalar(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
                        bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t o = 0; o < n; ++o) {
      float s = 0.0f;
      for (int64_t j = 0; j < k; ++j) s += x[i * k + j] * w[o * k + j];
      y[i * n + o] = accumulate ? y[i * n + o] + s : s;
    }
  }
}

__attribute__((target("avx2,fma"))) inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// One token row against the 4 weight rows starting at w0 (k apart): y[0..3] (+)= x . w_r.
__attribute__((target("avx2,fma"), always_inline)) inline void OneRowFourOutputs(
    const float* xi, int64_t k, const float* w0, float* yi, bool accumulate) {
  const int64_t k8 = k & ~int64_t{7};
  const float* w1 = w0 + k;
  const float* w2 = w1 + k;
  const float* w3 = w2 + k;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t j = 0; j < k8; j += 8) {
    const __m256 xv = _mm256_loadu_ps(xi + j);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j), xv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + j), xv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + j), xv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + j), xv, a3);
  }
  float s[kRows] = {HorizontalSum(a0), HorizontalSum(a1), HorizontalSum(a2), HorizontalSum(a3)};
  for (int64_t j = k8; j < k; ++j) {
    s[0] += xi[j] * w0[j];
    s[1] += xi[j] * w1[j];
    s[2] += xi[j] * w2[j];
    s[3] += xi[j] * w3[j];
  }
  for (int64_t r = 0; r < kRows; ++r) yi[r] = accumulate ? yi[r] + s[r] : s[r];
}

__attribute__((target("avx2,fma"))) void SmallMLinearAvx2(const float* x, int64_t m, int64_t k,
                                                          const float* w, int64_t n, float* y,
                                                          bool accumulate) {
  const int64_t k8 = k & ~int64_t{7};
  int64_t o = 0;
  for (; o + kRows <= n; o += kRows) {
    const float* w0 = w + o * k;
    const float* w1 = w0 + k;
    const float* w2 = w1 + k;
    const float* w3 = w2 + k;
    int64_t i = 0;
    // Two token rows at a time: 8 accumulators, each weight vector loaded once for both.
    for (; i + 2 <= m; i += 2) {
      const float* xa = x + i * k;
      const float* xb = xa + k;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
      __m256 b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
      for (int64_t j = 0; j < k8; j += 8) {
        const __m256 xva = _mm256_loadu_ps(xa + j);
        const __m256 xvb = _mm256_loadu_ps(xb + j);
        const __m256 v0 = _mm256_loadu_ps(w0 + j);
        const __m256 v1 = _mm256_loadu_ps(w1 + j);
        const __m256 v2 = _mm256_loadu_ps(w2 + j);
        const __m256 v3 = _mm256_loadu_ps(w3 + j);
        a0 = _mm256_fmadd_ps(v0, xva, a0);
        a1 = _mm256_fmadd_ps(v1, xva, a1);
        a2 = _mm256_fmadd_ps(v2, xva, a2);
        a3 = _mm256_fmadd_ps(v3, xva, a3);
        b0 = _mm256_fmadd_ps(v0, xvb, b0);
        b1 = _mm256_fmadd_ps(v1, xvb, b1);
        b2 = _mm256_fmadd_ps(v2, xvb, b2);
        b3 = _mm256_fmadd_ps(v3, xvb, b3);
      }
      float sa[kRows] = {HorizontalSum(a0), HorizontalSum(a1), HorizontalSum(a2),
                         HorizontalSum(a3)};
      float sb[kRows] = {HorizontalSum(b0), HorizontalSum(b1), HorizontalSum(b2),
                         HorizontalSum(b3)};
      for (int64_t j = k8; j < k; ++j) {
        sa[0] += xa[j] * w0[j];
        sa[1] += xa[j] * w1[j];
        sa[2] += xa[j] * w2[j];
        sa[3] += xa[j] * w3[j];
        sb[0] += xb[j] * w0[j];
        sb[1] += xb[j] * w1[j];
        sb[2] += xb[j] * w2[j];
        sb[3] += xb[j] * w3[j];
      }
      float* ya = y + i * n + o;
      float* yb = ya + n;
      for (int64_t r = 0; r < kRows; ++r) {
        ya[r] = accumulate ? ya[r] + sa[r] : sa[r];
        yb[r] = accumulate ? yb[r] + sb[r] : sb[r];
      }
    }
    for (; i < m; ++i) OneRowFourOutputs(x + i * k, k, w0, y + i * n + o, accumulate);
  }
  if (o < n) {
    // Remaining rows: scalar on the [o, n) slice.
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t r = o; r < n; ++r) {
        float s = 0.0f;
        for (int64_t j = 0; j < k; ++j) s += x[i * k + j] * w[r * k + j];
        y[i * n + r] = accumulate ? y[i * n + r] + s : s;
      }
    }
  }
}

}  // namespace

bool CpuHasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

void SmallMLinear(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
                  bool accumulate) {
  if (CpuHasAvx2Fma()) {
    SmallMLinearAvx2(x, m, k, w, n, y, accumulate);
  } else {
    SmallMLinearScalar(x, m, k, w, n, y, accumulate);
  }
}

}  // namespace dmoe::cpu
