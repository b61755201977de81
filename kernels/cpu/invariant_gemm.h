// Batch-invariant matrix products (DESIGN §6, "a request's output never depends on its company").
//
// Every output element is computed by one fixed sequence of floating-point operations that depends
// only on its own row of x, its own weight row (or column) and K: never on M, on the tile a row
// lands in, on how the work is split over threads, or on whether the CPU has AVX2 (the portable
// path follows the same order with std::fma, bit for bit; it is only slower). The orders:
//
//   DotRows   y[m, n] = x[m, :] . w[n, :]      (w [N, K] row-major: nn.Linear, scores vs cache)
//     8 lanes: lane l accumulates fma(x[k], w[k], acc) for k = l, l + 8, ... below K8 = K & ~7;
//     then ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7)); then fma for k = K8 .. K-1 in order.
//   AxpyRows  y[m, n] (+)= sum_k x[m, k] * w[k, n]   (w [K, N] row-major: P @ V, q @ W_UK)
//     one chain per element: acc = fma(x[m, k], w[k, n], acc) for k = 0 .. K-1 in order, starting
//     from 0 or from y[m, n] (accumulate), so a K split into consecutive calls gives the same bits.
//
// Work is split over output columns only (n), never inside a reduction.
#ifndef DMOE_KERNELS_CPU_INVARIANT_GEMM_H_
#define DMOE_KERNELS_CPU_INVARIANT_GEMM_H_

#include <cstdint>

namespace dmoe::cpu {

// y[m, n] = sum_k x[m, k] * w[n, k]. Strides in floats. Uses the kernel pool when large.
void DotRows(const float* x, int64_t m, int64_t ldx, const float* w, int64_t n, int64_t ldw,
             int64_t k, float* y, int64_t ldy);

// DotRows over bf16 weights (w: bf16 bits, [N, K] row-major, ldw in elements): each weight is
// widened exactly to fp32 in registers and the chains are DotRows', so y is bit-identical to
// DotRows on the fp32 upcast of w while half the bytes are read.
void DotRowsBf16(const float* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t n, int64_t ldw,
                 int64_t k, float* y, int64_t ldy);

// Packed bf16 matrices: groups of kPackRows rows, each group stored as K/8 blocks of
// kPackRows x 8 (row r's columns j..j+7 at block offset 8r), so that a group's rows are read as one
// contiguous stream (rows of a few KiB read side by side are separate streams, and the hardware
// prefetchers lose most of the bandwidth on them). Element (o, j) is at
//   (o / 8) * 8K + (j / 8) * 64 + (o % 8) * 8 + j % 8.
// The layout changes where weights are read from, not the chains: DotRowsBf16Packed gives
// DotRowsBf16's bits (AVX-512: two rows per register, one per half).
constexpr int64_t kPackRows = 8;
// Whether [n, k] can be packed (n a multiple of kPackRows, k of 8). Packing: cpu::PackRows
// (qlinear.h).
bool Bf16Packable(int64_t n, int64_t k);
// DotRowsBf16 over a packed w (Bf16Packable(n, k) must hold).
void DotRowsBf16Packed(const float* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t n,
                       int64_t k, float* y, int64_t ldy);
// Its output rows [n0, n1) (multiples of kPackRows) on the calling thread: the same bits.
void DotRowsBf16PackedRows(const float* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t k,
                           float* y, int64_t ldy, int64_t n0, int64_t n1);

// y[m, n] = (accumulate ? y[m, n] : 0) + sum_k x[m, k] * w[k, n]. Strides in floats.
void AxpyRows(const float* x, int64_t m, int64_t ldx, const float* w, int64_t k, int64_t ldw,
              int64_t n, float* y, int64_t ldy, bool accumulate);

// AxpyRows over bf16 weights (w: bf16 bits, [K, N] row-major, ldw in elements): each weight is
// widened exactly to fp32 and the chains are AxpyRows', so y is bit-identical to AxpyRows on the
// fp32 upcast of w (MLA's W_UK held as the checkpoint's bf16).
void AxpyRowsBf16(const float* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t k, int64_t ldw,
                  int64_t n, float* y, int64_t ldy, bool accumulate);

// y[i] = fma(a, x[i], y[i]) for i < n (the fixed combine step of routed expert outputs).
void FmaRow(int64_t n, float a, const float* x, float* y);

// Tests: run the portable (no AVX2) code even where the CPU has AVX2.
void ForcePortableInvariantForTesting(bool on);
// Tests: cap the ISA these kernels use (0 portable, 1 AVX2, 2 AVX-512; -1 the CPU's); returns
// the level in effect (never above the CPU's).
int SetGemmIsaForTesting(int level);
// The level in effect (the CPU's, capped by SetGemmIsaForTesting): also used by the packed fp8
// products (qlinear.h).
int GemmIsaLevel();

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_INVARIANT_GEMM_H_
