// The batch-invariant GEMM (launch.h's InvariantGemm): a tiled SIMT product in which each thread
// keeps its outputs' sums in registers and runs each one as a single chain of fused multiply-adds
// over k in order. Tiles only decide which thread computes an output, never how: any tile shape
// gives the same bits, so the shape is picked by m (a short tile for decode's few rows).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

namespace dmoe::cuda::launch {
namespace {

// k per shared-memory stage: deep, so that a decode-sized product (few blocks, each streaming
// its weight rows) waits on few barriers and keeps many loads in flight; 33 KB of shared memory
// for the 64 x 64 tile. The stage depth never changes a chain's order.
constexpr int kBK = 64;

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const uint16_t* p, int64_t i) {
  return __uint_as_float(static_cast<uint32_t>(p[i]) << 16);
}

// Block: (BM / TM) x (BN / TN) threads, a BM x BN tile of c; thread (ty, tx) owns rows
// ty * TM + i and columns tx + j * (BN / TN) of it.
template <typename T, int BM, int BN, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN)) InvariantGemmKernel(InvariantGemm g) {
  constexpr int kThreadsX = BN / TN, kThreads = (BM / TM) * kThreadsX;
  const int64_t z = blockIdx.z;
  int64_t m = g.m, lda = g.lda, ldb = g.ldb, ldc = g.ldc;
  const T* a;
  const T* b;
  float* c;
  if (g.groups != nullptr) {
    const InvariantGemmGroup gr = g.groups[z];
    m = gr.m;
    a = static_cast<const T*>(gr.a);
    b = static_cast<const T*>(gr.b);
    c = gr.c;
    lda = ldb = g.k;
    ldc = g.n;
  } else {
    a = static_cast<const T*>(g.a) + z * g.stride_a;
    b = static_cast<const T*>(g.b) + z * g.stride_b;
    c = g.c + z * g.stride_c;
  }
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  if (m0 >= m) return;  // the whole block: a group shorter than max_m
  const bool bt = g.groups != nullptr || g.b_trans;
  // [k][row] and [k][col], one float of padding against bank conflicts on the k-major stores.
  __shared__ float as[kBK][BM + 1];
  __shared__ float bs[kBK][BN + 1];
  const int tx = static_cast<int>(threadIdx.x) % kThreadsX;
  const int ty = static_cast<int>(threadIdx.x) / kThreadsX;
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  }
  for (int64_t k0 = 0; k0 < g.k; k0 += kBK) {
    const int kb = static_cast<int>(g.k - k0 < kBK ? g.k - k0 : kBK);
    for (int i = static_cast<int>(threadIdx.x); i < BM * kBK; i += kThreads) {
      const int r = i / kBK, kk = i % kBK;  // 64 threads read 64 consecutive k of a row
      const int64_t row = m0 + r;
      as[kk][r] = row < m && kk < kb ? Load(a, row * lda + k0 + kk) : 0.0f;
    }
    for (int i = static_cast<int>(threadIdx.x); i < BN * kBK; i += kThreads) {
      const int col = bt ? i / kBK : i % BN, kk = bt ? i % kBK : i / BN;
      const int64_t n = n0 + col;
      bs[kk][col] =
          n < g.n && kk < kb ? Load(b, bt ? n * ldb + k0 + kk : (k0 + kk) * ldb + n) : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < kb; ++kk) {  // the k order of every chain: k0 + 0, 1, ..., kb - 1
      float av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = as[kk][ty * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = bs[kk][tx + j * kThreadsX];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = __fmaf_rn(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = m0 + ty * TM + i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = n0 + tx + j * kThreadsX;
      if (col >= g.n) continue;
      float* out = c + row * ldc + col;
      float v = __fmul_rn(g.alpha, acc[i][j]);
      if (g.beta != 0.0f) v = __fmaf_rn(g.beta, *out, v);
      *out = v;
    }
  }
}

template <typename T, int BM, int BN, int TM, int TN>
int Launch(const InvariantGemm& g, int64_t max_m, int64_t problems, void* stream) {
  const dim3 grid(static_cast<unsigned>((g.n + BN - 1) / BN),
                  static_cast<unsigned>((max_m + BM - 1) / BM), static_cast<unsigned>(problems));
  InvariantGemmKernel<T, BM, BN, TM, TN>
      <<<grid, (BM / TM) * (BN / TN), 0, static_cast<cudaStream_t>(stream)>>>(g);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int LaunchFor(const InvariantGemm& g, int64_t max_m, int64_t problems, void* stream) {
  // A decode step's few rows: a short, wide tile (more blocks along n); else a square one.
  if (max_m <= 16) return Launch<T, 16, 64, 1, 4>(g, max_m, problems, stream);
  return Launch<T, 64, 64, 4, 4>(g, max_m, problems, stream);
}

}  // namespace

int RunInvariantGemm(const InvariantGemm& g, void* stream) {
  (void)cudaGetLastError();  // the launch's own error, not one an earlier call left
  const int64_t max_m = g.groups != nullptr ? g.max_m : g.m;
  const int64_t problems = g.groups != nullptr ? g.n_groups : g.batch;
  if (max_m <= 0 || g.n <= 0 || problems <= 0) return 0;
  if (problems > 65535 || (max_m + 15) / 16 > 65535) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return g.bf16 ? LaunchFor<uint16_t>(g, max_m, problems, stream)
                : LaunchFor<float>(g, max_m, problems, stream);
}

}  // namespace dmoe::cuda::launch
