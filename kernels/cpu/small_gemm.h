// y[M, N] = x[M, K] @ w[N, K]^T for small M (the tokens one expert sees in a decode batch).
// OpenBLAS packs the whole weight matrix on every sgemm call, which at M of 2-16 costs about as
// much as reading it; this kernel streams each weight row once and keeps it in L1 while all M
// token rows use it. AVX2+FMA when the CPU has them (checked at run time), scalar otherwise.
#ifndef DMOE_KERNELS_CPU_SMALL_GEMM_H_
#define DMOE_KERNELS_CPU_SMALL_GEMM_H_

#include <cstdint>

namespace dmoe::cpu {

// Largest M for which Linear() uses SmallMLinear instead of sgemm.
inline constexpr int64_t kSmallMMax = 8;

// Packed row-major x, w, y; beta 0 (y is overwritten) or 1 (y += x @ w^T).
void SmallMLinear(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
                  bool accumulate);

bool CpuHasAvx2Fma();

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_SMALL_GEMM_H_
