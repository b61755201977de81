// The batch-invariant GEMM (launch.h's InvariantGemm): a tiled SIMT product in which each thread
// keeps its outputs' sums in registers, one chain of fused multiply-adds per fixed chunk of k,
// the chunks added in order. Tiles and splits only decide which thread computes a chain, never
// how: any tile shape gives the same bits, so the shape is picked by m (a short tile for decode's
// few rows), and a product with few tiles runs its chunks in blocks of their own.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

namespace dmoe::cuda::launch {
namespace {

// k per shared-memory stage: deep, so that a decode-sized product (few blocks, each streaming
// its weight rows) waits on few barriers and keeps many loads in flight; 33 KB of shared memory
// for the 64 x 64 tile. The stage depth never changes a chain's order.
constexpr int kBK = 64;
static_assert(kInvariantGemmChunk % kBK == 0, "a chunk ends at a stage's end");

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const uint16_t* p, int64_t i) {
  return __uint_as_float(static_cast<uint32_t>(p[i]) << 16);
}

// Block: (BM / TM) x (BN / TN) threads, a BM x BN tile of c; thread (ty, tx) owns rows
// ty * TM + i and columns tx + j * (BN / TN) of it. gridDim.y = m tiles x `splits`: with
// splits == 1 a block runs every chunk of k, adding each chunk's chain into its total at the
// chunk's end; with splits == chunks block (tile, chunk) of problem z runs one chunk and writes
// its chain to scratch[z][chunk][row][col] (rows of max_m), which AddChunksKernel adds in order.
template <typename T, int BM, int BN, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    InvariantGemmKernel(InvariantGemm g, int splits, float* scratch) {
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
  const int64_t max_m = g.groups != nullptr ? g.max_m : g.m;
  const int64_t chunk = static_cast<int64_t>(blockIdx.y) % splits;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) / splits * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  if (m0 >= m) return;  // the whole block: a group shorter than max_m
  const int64_t k_begin = splits == 1 ? 0 : chunk * kInvariantGemmChunk;
  const int64_t k_end = splits == 1 ? g.k : min(g.k, k_begin + kInvariantGemmChunk);
  const bool bt = g.groups != nullptr || g.b_trans;
  // [k][row] and [k][col], one float of padding against bank conflicts on the k-major stores.
  __shared__ float as[kBK][BM + 1];
  __shared__ float bs[kBK][BN + 1];
  const int tx = static_cast<int>(threadIdx.x) % kThreadsX;
  const int ty = static_cast<int>(threadIdx.x) / kThreadsX;
  float acc[TM][TN], total[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = total[i][j] = 0.0f;
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    if (k0 > k_begin && k0 % kInvariantGemmChunk == 0) {  // a chunk ended (kBK divides a chunk)
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          total[i][j] = k0 == kInvariantGemmChunk ? acc[i][j] : __fadd_rn(total[i][j], acc[i][j]);
          acc[i][j] = 0.0f;
        }
      }
    }
    const int kb = static_cast<int>(k_end - k0 < kBK ? k_end - k0 : kBK);
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
      if (splits > 1) {  // this chunk's chain alone
        scratch[((z * splits + chunk) * max_m + row) * g.n + col] = acc[i][j];
        continue;
      }
      // The last chunk's chain (the first one's alone is the total; k == 0 leaves +0).
      const float t = k_end <= kInvariantGemmChunk ? acc[i][j] : __fadd_rn(total[i][j], acc[i][j]);
      float* out = c + row * ldc + col;
      float v = __fmul_rn(g.alpha, t);
      if (g.beta != 0.0f) v = __fmaf_rn(g.beta, *out, v);
      *out = v;
    }
  }
}

// c[row, col] = alpha * (chunk 0 + chunk 1 + ...) (+ beta * c) of problem blockIdx.z, from the
// split kernel's scratch.
__global__ void AddChunksKernel(InvariantGemm g, int64_t chunks, const float* scratch) {
  const int64_t z = blockIdx.z;
  const int64_t max_m = g.groups != nullptr ? g.max_m : g.m;
  const int64_t m = g.groups != nullptr ? g.groups[z].m : g.m;
  float* c = g.groups != nullptr ? g.groups[z].c : g.c;
  const int64_t ldc = g.groups != nullptr ? g.n : g.ldc;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= m * g.n) return;
  const int64_t row = i / g.n, col = i % g.n;
  const float* part = scratch + z * chunks * max_m * g.n + i;
  float t = part[0];
  for (int64_t q = 1; q < chunks; ++q) t = __fadd_rn(t, part[q * max_m * g.n]);
  float* out = c + row * ldc + col;
  float v = __fmul_rn(g.alpha, t);
  if (g.beta != 0.0f) v = __fmaf_rn(g.beta, *out, v);
  *out = v;
}

template <typename T, int BM, int BN, int TM, int TN>
int Launch(const InvariantGemm& g, int64_t max_m, int64_t problems, int splits, float* scratch,
           void* stream) {
  const dim3 grid(static_cast<unsigned>((g.n + BN - 1) / BN),
                  static_cast<unsigned>((max_m + BM - 1) / BM * splits),
                  static_cast<unsigned>(problems));
  InvariantGemmKernel<T, BM, BN, TM, TN>
      <<<grid, (BM / TM) * (BN / TN), 0, static_cast<cudaStream_t>(stream)>>>(g, splits, scratch);
  return static_cast<int>(cudaGetLastError());
}

// A decode step's few rows: a short, wide tile (more blocks along n); else a square one.
bool ShortTile(int64_t max_m) { return max_m <= 16; }

template <typename T>
int LaunchFor(const InvariantGemm& g, int64_t max_m, int64_t problems, int splits, float* scratch,
              void* stream) {
  if (ShortTile(max_m)) return Launch<T, 16, 64, 1, 4>(g, max_m, problems, splits, scratch, stream);
  return Launch<T, 64, 64, 4, 4>(g, max_m, problems, splits, scratch, stream);
}

// Chunks of k run in blocks of their own when one product has fewer tiles than this (two waves
// of a 132-SM GPU) and more than one chunk.
constexpr int64_t kFewTiles = 264;

int64_t Chunks(int64_t k) { return (k + kInvariantGemmChunk - 1) / kInvariantGemmChunk; }

// A single product or groups (the routed experts at decode), decode-sized only (m <= 64: the
// scratch stays problems x chunks x 64 x n floats), within the grid's 65535 rows of blocks.
int64_t Splits(const InvariantGemm& g) {
  const bool grouped = g.groups != nullptr;
  const int64_t m = grouped ? g.max_m : g.m, problems = grouped ? g.n_groups : 1;
  if ((!grouped && g.batch != 1) || m <= 0 || m > 64 || g.n <= 0) return 1;
  const int64_t m_tiles = ShortTile(m) ? 1 : (m + 63) / 64;
  const int64_t tiles = (g.n + 63) / 64 * m_tiles * problems, chunks = Chunks(g.k);
  return tiles < kFewTiles && chunks > 1 && m_tiles * chunks <= 65535 ? chunks : 1;
}

}  // namespace

int64_t InvariantGemmScratchFloats(const InvariantGemm& g) {
  const int64_t splits = Splits(g);
  if (splits == 1) return 0;
  return g.groups != nullptr ? g.n_groups * splits * g.max_m * g.n : splits * g.m * g.n;
}

int RunInvariantGemm(const InvariantGemm& g, float* scratch, void* stream) {
  (void)cudaGetLastError();  // the launch's own error, not one an earlier call left
  const int64_t max_m = g.groups != nullptr ? g.max_m : g.m;
  const int64_t problems = g.groups != nullptr ? g.n_groups : g.batch;
  if (max_m <= 0 || g.n <= 0 || problems <= 0) return 0;
  const int64_t splits = Splits(g);
  const int64_t m_tiles = ShortTile(max_m) ? (max_m + 15) / 16 : (max_m + 63) / 64;
  if (problems > 65535 || m_tiles * splits > 65535 || (splits > 1 && !scratch)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const int s = static_cast<int>(splits);
  const int err = g.bf16 ? LaunchFor<uint16_t>(g, max_m, problems, s, scratch, stream)
                         : LaunchFor<float>(g, max_m, problems, s, scratch, stream);
  if (err != 0 || splits == 1) return err;
  const dim3 grid(static_cast<unsigned>((max_m * g.n + 255) / 256), 1,
                  static_cast<unsigned>(problems));
  AddChunksKernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(g, splits, scratch);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace dmoe::cuda::launch
