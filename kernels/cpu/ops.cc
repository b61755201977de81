#include "kernels/cpu/ops.h"

#include <cblas.h>
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/small_gemm.h"

namespace dmoe::cpu {
namespace {
std::atomic<KernelMode> g_mode{KernelMode::kInvariant};
}  // namespace

void SetKernelMode(KernelMode m) { g_mode = m; }
KernelMode GetKernelMode() { return g_mode.load(std::memory_order_relaxed); }
const char* KernelModeName(KernelMode m) {
  return m == KernelMode::kInvariant ? "invariant" : "blas";
}

void Linear(const float* x, int64_t t, int64_t in, const float* w, int64_t out, float* y,
            int64_t ldx, int64_t ldy) {
  if (ldx == 0) ldx = in;
  if (ldy == 0) ldy = out;
  if (GetKernelMode() == KernelMode::kInvariant) {
    DotRows(x, t, ldx, w, out, in, in, y, ldy);
    return;
  }
  if (t == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(out), static_cast<int>(in), 1.0f, w,
                static_cast<int>(in), x, 1, 0.0f, y, 1);
    return;
  }
  if (t <= kSmallMMax && ldx == in && ldy == out) {
    SmallMLinear(x, t, in, w, out, y, /*accumulate=*/false);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(t), static_cast<int>(out),
              static_cast<int>(in), 1.0f, x, static_cast<int>(ldx), w, static_cast<int>(in), 0.0f,
              y, static_cast<int>(ldy));
}

void RmsNorm(const float* x, int64_t t, int64_t n, const float* w, double eps, float* y,
             int64_t ldx, int64_t ldy) {
  if (ldx == 0) ldx = n;
  if (ldy == 0) ldy = n;
  for (int64_t r = 0; r < t; ++r) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

void SoftmaxRows(float* x, int64_t rows, int64_t n, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) mx = row[i] > mx ? row[i] : mx;
    // exp(x - mx) by ExpScaled (0 for -inf; the same bits on every CPU, where glibc's expf
    // picks its code by the CPU), then the sum in double in order
    ExpScaled(row, n, mx, 1.0f, row);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += row[i];
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) row[i] *= inv;
  }
}

namespace {

// exp(x) for SiluMul in vector form, the same operations at every ISA level (so the same bits on
// every machine): k = nearest integer to x * log2(e); r = x - k ln2 in two fma steps (ln2 split
// in a short upper part and the rest, Cody and Waite's reduction); exp(r) = 1 + r + r^2 p(r) with
// p of degree 5 (the Cephes expf coefficients; ~1 ulp on |r| <= ln2 / 2), times 2^k from the
// exponent bits. Outside [-87, 88] the result is 0 or +inf (silu's quotient there is -0 or g);
// NaN stays NaN. glibc's expf (scalar, ~3.5 ns) had taken ~2 % of a batch-1 decode step.
constexpr float kExpLo = -87.0f, kExpHi = 88.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

float ExpPortable(float x) {
  if (std::isnan(x)) return x;
  if (x < kExpLo) return 0.0f;
  if (x > kExpHi) return std::numeric_limits<float>::infinity();
  const float k = std::nearbyint(x * kLog2e);
  float r = std::fma(k, -kLn2Hi, x);
  r = std::fma(k, -kLn2Lo, r);
  float p = kP[0];
  for (int i = 1; i < 6; ++i) p = std::fma(p, r, kP[i]);
  const float y = std::fma(p, r * r, r) + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y * scale;
}

__attribute__((target("avx2,fma"), always_inline)) inline __m256 Exp8(__m256 x) {
  const __m256 c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(-kLn2Hi), c);
  r = _mm256_fmadd_ps(k, _mm256_set1_ps(-kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP[i]));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  __m256 out = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  // below / above the range: 0 / +inf; NaN: x itself
  out = _mm256_blendv_ps(out, _mm256_setzero_ps(),
                         _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ));
  out = _mm256_blendv_ps(out, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                         _mm256_cmp_ps(x, _mm256_set1_ps(kExpHi), _CMP_GT_OQ));
  return _mm256_blendv_ps(out, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// The values [0, returned) of SiluMul, 8 at a time.
__attribute__((target("avx2,fma"))) int64_t SiluMulAvx2(const float* g, const float* u, int64_t n,
                                                        float* h) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = Exp8(_mm256_xor_ps(gv, neg));
    _mm256_storeu_ps(
        h + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
  return i;
}

// The values [0, returned) of ExpScaled, 8 at a time.
__attribute__((target("avx2,fma"))) int64_t ExpScaledAvx2(const float* x, int64_t n, float shift,
                                                          float scale, float* y) {
  int64_t i = 0;
  const __m256 s = _mm256_set1_ps(shift), c = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), s), c);
    _mm256_storeu_ps(y + i, Exp8(a));
  }
  return i;
}

}  // namespace

void SiluMul(const float* g, const float* u, int64_t n, float* h) {
  int64_t i = GemmIsaLevel() >= 1 ? SiluMulAvx2(g, u, n, h) : 0;
  for (; i < n; ++i) h[i] = g[i] / (1.0f + ExpPortable(-g[i])) * u[i];
}

void ExpScaled(const float* x, int64_t n, float shift, float scale, float* y) {
  int64_t i = GemmIsaLevel() >= 1 ? ExpScaledAvx2(x, n, shift, scale, y) : 0;
  for (; i < n; ++i) {
    const float a = (x[i] - shift) * scale;
    y[i] = ExpPortable(a);
  }
}

void SwiGluMlp(const float* x, int64_t t, int64_t d, const float* gate, const float* up,
               const float* down, int64_t width, float* y, std::vector<float>* scratch) {
  scratch->resize(static_cast<size_t>(2 * t * width));
  float* g = scratch->data();
  float* u = g + t * width;
  Linear(x, t, d, gate, width, g);
  Linear(x, t, d, up, width, u);
  SiluMul(g, u, t * width, g);
  Linear(g, t, width, down, d, y);
}

void Axpy(int64_t n, float a, const float* x, float* y) { FmaRow(n, a, x, y); }

}  // namespace dmoe::cpu
