// A16 products for bf16 weights: the activations are rounded to bf16 (round to nearest even) and
// multiplied with the packed bf16 weights (kPackRows groups, invariant_gemm.h) in the order of
// AVX512-BF16's vdpbf16ps, which does 32 multiply-adds per instruction (twice fp32 FMA's rate).
//
// The definition (every ISA level computes exactly this, all of it with flush-to-zero and
// denormals-are-zero, as vdpbf16ps does): for output y[m, o], four lanes p = 0..3, each
//   acc_p = 0; for each block b of 8 columns, in order:
//     acc_p = fma(xb[8b + 2p + 1], w[o, 8b + 2p + 1], acc_p)  (the product exact, even below the
//     acc_p = fma(xb[8b + 2p],     w[o, 8b + 2p],     acc_p)   smallest normal; one rounding)
//   y[m, o] = (acc_0 + acc_2) + (acc_1 + acc_3)
// A row's result depends on its own row, its weight row and K only: batch-invariant, and the same
// on every CPU (AVX512-BF16, or the AVX2 / portable emulation where it is missing or where the
// CPU's instruction is found to differ from the definition at startup).
#ifndef DMOE_KERNELS_CPU_BF16DOT_H_
#define DMOE_KERNELS_CPU_BF16DOT_H_

#include <cstdint>

namespace dmoe::cpu {

// Whether linear layers over packed bf16 weights use A16 (true) or widen the weights to fp32
// and keep fp32 activations (false, the default: the fp32 upcast's bits). Packed fp8 weights too
// (qlinear.cc: each 128-column block decoded exactly to bf16, A16, times its scale). Process-wide.
void SetBf16Activations(bool a16);
bool Bf16ActivationsA16();

// y[m, o] for m < t, o in [o0, o1) (multiples of 8): xb [t, ldb] bf16 bits, w packed [out, k]
// (k a multiple of 8).
void Bf16DotRowsPacked(const uint16_t* xb, int64_t t, int64_t ldb, const uint16_t* w, int64_t k,
                       float* y, int64_t ldy, int64_t o0, int64_t o1);

// Packed fp8 (e4m3, qlinear.h's packed layout: groups of 8 rows, 8 x 8 byte blocks) under A16:
// y[m, o] for o in [o0, o1) (multiples of 8) = 0, then for each block b of `block` columns in
// order: y = y + A16(x[m, b], w[o, b]) * scales[(o / block) * nb + b] (the product rounded, then
// the sum), where w's codes are their exact bf16 values and A16 is Bf16DotRowsPacked over the
// block; all of it with flush-to-zero and denormals-are-zero. nb = ceil(k / block); block a
// multiple of 8 (and of 8 rows: a group's rows share a scale row).
void Fp8DotRowsPackedA16(const uint16_t* xb, int64_t t, int64_t ldb, const uint8_t* q, int64_t k,
                         const float* scales, int64_t block, float* y, int64_t ldy, int64_t o0,
                         int64_t o1);

// y[t, n] = A16 product of x [t, k] (row stride ldx) with packed w [n, k], over the kernel pool.
void LinearBf16A16(const float* x, int64_t t, int64_t ldx, const uint16_t* w, int64_t n, int64_t k,
                   float* y, int64_t ldy);
// Its output rows [o0, o1) (multiples of 8) on the calling thread, for x already rounded to bf16
// (xb [t, k]): the same bits.
void LinearBf16A16Rows(const uint16_t* xb, int64_t t, int64_t k, const uint16_t* w, float* y,
                       int64_t ldy, int64_t o0, int64_t o1);

// The level in use: 2 AVX512-BF16, 1 AVX2 emulation, 0 portable. SetBf16DotIsaForTesting caps it
// (-1: the best this CPU has that matches the definition) and returns the level now in use.
int SetBf16DotIsaForTesting(int level);
int Bf16DotIsaLevel();

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_BF16DOT_H_
