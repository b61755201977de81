#include "kernels/cpu/ops.h"

#include <cblas.h>

#include <atomic>
#include <cmath>
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
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float e = std::isinf(row[i]) && row[i] < 0 ? 0.0f : std::exp(row[i] - mx);
      row[i] = e;
      sum += e;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) row[i] *= inv;
  }
}

void SiluMul(const float* g, const float* u, int64_t n, float* h) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
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
