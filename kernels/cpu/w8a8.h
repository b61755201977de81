// W8A8 products for int8 weights: each activation row is quantized to int8 with its own scale
// (s = max|x| / 127), products are summed in int32 (exact), and
//   y[m, o] = float(sum_i qx[m, i] * qw[o, i]) * (sx[m] * sw[o]).
// Integer sums make every row's result independent of the batch, the tile, the thread split and
// the instruction set (AVX512-VNNI, AVX2, portable give the same bits), while the VNNI unit does
// 32 multiply-adds per instruction (4x fp32 FMA).
#ifndef DMOE_KERNELS_CPU_W8A8_H_
#define DMOE_KERNELS_CPU_W8A8_H_

#include <cstdint>

namespace dmoe::cpu {

// q[m, :] = clamp(rne(x[m, :] * (127 / max|x[m, :]|)), -127, 127), s[m] = max|x[m, :]| / 127
// (0 for a zero row). x [t, k] with row stride ldx; q [t, ldq].
void QuantizeRowsInt8(const float* x, int64_t t, int64_t k, int64_t ldx, int8_t* q, int64_t ldq,
                      float* s);

// sum_i w[o, i] for each row o of an int8 matrix [out, in] (the VNNI kernel's correction for its
// unsigned activations).
void Int8RowSums(const int8_t* w, int64_t out, int64_t in, int32_t* sums);

// y[m, o] for m < t (t <= 4), o in [o0, o1): qx [t, ldq] int8, sx [t]; w [out, in] int8 with
// scales sw [out] and row sums.
void Int8DotRows(const int8_t* qx, int64_t t, int64_t ldq, const float* sx, const int8_t* w,
                 int64_t in, const float* sw, const int32_t* sums, float* y, int64_t ldy,
                 int64_t o0, int64_t o1);

// Packed int8 matrices: groups of 8 rows, each stored as in/32 blocks of 8 x 32 bytes (row r's
// columns j..j+31 at block offset 32r), read as one stream; element (o, j) is at
//   (o / 8) * 8 * in + (j / 32) * 256 + (o % 8) * 32 + j % 32.
// Integer sums: the same results as Int8DotRows on the row-major matrix, at every ISA level.
bool Int8Packable(int64_t out, int64_t in);  // out a multiple of 8, in of 32
// Packing: cpu::PackRows (qlinear.h).
// Int8DotRows over a packed w, for any number of rows t; o0 and o1 multiples of 8.
void Int8DotRowsPacked(const int8_t* qx, int64_t t, int64_t ldq, const float* sx, const int8_t* w,
                       int64_t in, const float* sw, const int32_t* sums, float* y, int64_t ldy,
                       int64_t o0, int64_t o1);

// The instruction set the int8 kernels use: 2 AVX512-VNNI, 1 AVX2, 0 portable; -1: the best the
// CPU has. Returns the level now in use (capped by the CPU). For tests and benchmarks.
int SetInt8IsaForTesting(int level);
// The best level this CPU has.
int Int8IsaLevel();

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_W8A8_H_
