// CPU kernels of the DeepSeek-V2 forward pass. Plain pointers and sizes; row-major; no allocation
// except where a scratch vector is passed in. Shapes are given as [rows, cols].
#ifndef DMOE_KERNELS_CPU_OPS_H_
#define DMOE_KERNELS_CPU_OPS_H_

#include <cstdint>
#include <vector>

namespace dmoe::cpu {

// Which kernels the products use. kInvariant (the default): every row's result is the same bits
// whatever the batch around it and the thread count (kernels/cpu/invariant_gemm.h). kBlas: the
// previous kernels (OpenBLAS sgemv at one row, the small-M kernel up to 8, sgemm beyond; MLA
// prefill in the naive form), whose rounding depends on M and threads: kept for benchmarks
// (bench/engine_bench --kernels blas) and as an opt-in where they are faster.
enum class KernelMode { kInvariant, kBlas };
void SetKernelMode(KernelMode m);
KernelMode GetKernelMode();
const char* KernelModeName(KernelMode m);

// y[T, out] = x[T, in] @ w[out, in]^T  (nn.Linear without bias).
// `ldx` / `ldy` are the row strides of x and y (0: packed).
void Linear(const float* x, int64_t t, int64_t in, const float* w, int64_t out, float* y,
            int64_t ldx = 0, int64_t ldy = 0);
// y[T, n] = w * x / sqrt(mean(x^2) + eps), row by row. x and y may alias. Strides as in Linear.
void RmsNorm(const float* x, int64_t t, int64_t n, const float* w, double eps, float* y,
             int64_t ldx = 0, int64_t ldy = 0);

// In-place softmax of each of `rows` rows of length n (stride ld). -inf entries get 0. The
// numerators are ExpScaled's (below): the same bits on every CPU.
void SoftmaxRows(float* x, int64_t rows, int64_t n, int64_t ld);

// h = silu(g) * u = g / (1 + exp(-g)) * u, elementwise over n values, exp as ops.cc defines it:
// within 2 ulp of exp on [-87, 88], 0 below, +inf above; the same bits at every ISA level.
void SiluMul(const float* g, const float* u, int64_t n, float* h);

// y[i] = exp((x[i] - shift) * scale) with SiluMul's exp (the subtraction and the product
// rounded to float first): the same bits at every ISA level. A softmax's numerators (the
// sampler's, shift the largest logit and scale 1 / temperature). x and y may alias.
void ExpScaled(const float* x, int64_t n, float shift, float scale, float* y);

// Dense SwiGLU MLP: y[T, D] = down(silu(gate(x)) * up(x)); scratch is resized as needed.
void SwiGluMlp(const float* x, int64_t t, int64_t d, const float* gate, const float* up,
               const float* down, int64_t width, float* y, std::vector<float>* scratch);

// y[i] = fma(a, x[i], y[i]).
void Axpy(int64_t n, float a, const float* x, float* y);

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_OPS_H_
