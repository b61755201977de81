// MLA decode, weight-absorbed, over a paged latent cache (fp32, bf16 or 8-bit rows, dequantized
// as they are read). Three steps per call:
//   1. q_lat[s, h] = W_UK[h]^T q_nope[s, h]       (HeadGemm: a tiled GEMM per head)
//   2. per (sequence, group of heads, split of the context): scores, an online softmax and
//      sum_u p_u c_u over the split's rows, reading each cached row ONCE for the whole group
//      (the latent row is shared by every head: that is MLA's point); then the splits are
//      combined (flash-decoding);
//   3. o[s, h] = W_UV[h] o_lat[s, h]               (HeadGemm)
// All sums in fp32 with a fixed order that depends on the sequence's own context length only
// (splits are cut by it, never by the batch): a sequence's output is the same bits whatever else
// is in the batch.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

namespace dmoe::cuda::launch {
namespace {

// fp8 e4m3 (OCP: bias 7, no infinities, 0x7f / 0xff NaN) -> float, exactly, from its bits.
__device__ inline float Fp8E4M3(uint8_t b) {
  const uint32_t e = (b >> 3) & 15, m = b & 7, sign = static_cast<uint32_t>(b & 0x80) << 24;
  if (e == 15 && m == 7) return __int_as_float(0x7fc00000);
  if (e == 0) return __uint_as_float(__float_as_uint(static_cast<float>(m) * 0x1p-9f) | sign);
  return __uint_as_float(sign | (e + 120) << 23 | m << 20);  // (1 + m / 8) * 2^(e - 7)
}

// C[s, h, n] = sum_k A[s, h, k] B[h, k, n] for s < m, n < nn, k < kk, every head h < heads:
// A at a + s * as + h * ah + k, B at b + h * bh + k * bk + n * bn, C at c + s * cs + h * ch + n.
// Tiles of 32 rows x 64 columns, 32 k at a time through shared memory; each output's sum runs
// over k in order (the same bits for any m).
constexpr int kGemmM = 32, kGemmN = 64, kGemmK = 32;
struct HeadGemmArgs {
  int64_t m, nn, kk;
  const float* a;
  int64_t as, ah;
  const float* b;
  int64_t bh, bk, bn;
  float* c;
  int64_t cs, ch;
};
__global__ void __launch_bounds__(256) HeadGemmKernel(HeadGemmArgs g) {
  __shared__ float as[kGemmK][kGemmM + 1];
  __shared__ float bs[kGemmK][kGemmN + 1];
  const int64_t h = blockIdx.z, m0 = blockIdx.y * kGemmM, n0 = blockIdx.x * kGemmN;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const float* a = g.a + h * g.ah;
  const float* b = g.b + h * g.bh;
  float acc[2][4] = {};
  for (int64_t k0 = 0; k0 < g.kk; k0 += kGemmK) {
    for (int e = tid; e < kGemmM * kGemmK; e += 256) {  // k fastest: A rows are contiguous in k
      const int mm = e / kGemmK, k = e % kGemmK;
      const int64_t gm = m0 + mm, gk = k0 + k;
      as[k][mm] = (gm < g.m && gk < g.kk) ? a[gm * g.as + gk] : 0.0f;
    }
    for (int e = tid; e < kGemmN * kGemmK; e += 256) {  // the contiguous index fastest
      const bool n_fast = g.bn == 1;
      const int nn = n_fast ? e % kGemmN : e / kGemmK, k = n_fast ? e / kGemmN : e % kGemmK;
      const int64_t gn = n0 + nn, gk = k0 + k;
      bs[k][nn] = (gn < g.nn && gk < g.kk) ? b[gk * g.bk + gn * g.bn] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kGemmK; ++k) {
      const float a0 = as[k][ty * 2], a1 = as[k][ty * 2 + 1];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float bv = bs[k][tx + 16 * c];
        acc[0][c] = fmaf(a0, bv, acc[0][c]);
        acc[1][c] = fmaf(a1, bv, acc[1][c]);
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i) {
    const int64_t gm = m0 + ty * 2 + i;
    if (gm >= g.m) continue;
    for (int c = 0; c < 4; ++c) {
      const int64_t gn = n0 + tx + 16 * c;
      if (gn < g.nn) g.c[gm * g.cs + h * g.ch + gn] = acc[i][c];
    }
  }
}

void HeadGemm(const HeadGemmArgs& g, int64_t heads, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>((g.nn + kGemmN - 1) / kGemmN),
                  static_cast<unsigned>((g.m + kGemmM - 1) / kGemmM), static_cast<unsigned>(heads));
  HeadGemmKernel<<<grid, 256, 0, st>>>(g);
}

// The split attention. A block: one sequence, kGroup heads (fewer in the last group), one split
// of the context; 8 warps. Per tile of kTile rows: the rows dequantized into shared memory once;
// each warp scores its heads (lane = row), updates their running max and sum; then every thread
// adds p * c into its columns of every head's accumulator.
constexpr int kTile = 32, kMaxSplits = 16, kMinSplitRows = 128, kAttendThreads = 256;

// Rows per split of a sequence with n rows: at least kMinSplitRows, at most kMaxSplits splits,
// a multiple of kTile. A function of n alone (batch invariance).
__device__ __host__ inline int64_t SplitRows(int64_t n) {
  const int64_t per = (n + kMaxSplits - 1) / kMaxSplits;
  const int64_t rows = ((per + kTile - 1) / kTile) * kTile;
  return rows > kMinSplitRows ? rows : kMinSplitRows;
}

// Shared-memory row stride (floats) of a tile of rows r + dr wide: a multiple of 4 (float4
// reads) that is 4 mod 32 floats apart from row to row (no bank conflicts among 8 rows).
__device__ __host__ inline int64_t TileStride(int64_t width) {
  const int64_t w4 = (width + 3) / 4 * 4;
  return w4 + ((4 - w4 % 32) + 32) % 32;
}

template <int KV>
__device__ float CachedValue(const Mla& p, const uint8_t* row, int64_t j) {
  if (j < p.rank) {
    if (KV == 0) return reinterpret_cast<const float*>(row)[j];
    if (KV == 3) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[j]);
    const float scale = reinterpret_cast<const float*>(row + p.rank)[j >> 7];
    const uint8_t c = row[j];
    return (KV == 1 ? static_cast<float>(static_cast<int8_t>(c)) : Fp8E4M3(c)) * scale;
  }
  j -= p.rank;
  if (KV == 0) return reinterpret_cast<const float*>(row)[p.rank + j];
  if (KV == 3) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[p.rank + j]);
  const int64_t ns = (p.rank + 127) / 128;
  return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row + p.rank + 4 * ns)[j]);
}

// Asynchronous copies global -> shared (sm_80+): many in flight without registers.
__device__ inline void CpAsync(void* smem, const void* g, bool vec16) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if (vec16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(g) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(g) : "memory");
  }
}
__device__ inline void CpAsyncWaitAll() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// Shared memory of a block: row pointers, the fp32 tile, the group's queries, the tile's
// probabilities, the rescale factors, and (8-bit and bf16 rows) the raw rows as copied.
struct AttendLayout {
  int64_t width, w4, stride, pitch, bytes;
  __host__ __device__ AttendLayout(const Mla& p, int group) {
    width = p.rank + p.rope;
    w4 = (width + 3) / 4 * 4;
    stride = TileStride(width);
    pitch = (p.row_bytes + 15) / 16 * 16;
    const int64_t floats = kTile * stride + group * stride + group * kTile + group;
    bytes = kTile * 8 + floats * 4 + (p.kv_dtype == 0 ? 0 : kTile * pitch);
  }
};

struct AttendArgs {
  Mla p;
  const float* q;      // [b, H, dn + dr]: the rope part
  const float* q_lat;  // [b, H, r]
  const uint8_t* pool;
  const int32_t* table;
  const int32_t* ctx;
  int64_t max_ctx;
  float* part;  // [b, H, kMaxSplits, r] unnormalized sums
  float* ml;    // [b, H, kMaxSplits, 2] running max and sum
  bool vec16;   // pool, rows and blocks 16-byte aligned: 16-byte copies
};

template <int KV, int kGroup, int kCols>
__global__ void __launch_bounds__(kAttendThreads) AttendSplitKernel(AttendArgs a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const Mla& p = a.p;
  const int64_t s = blockIdx.z, split = blockIdx.y, h0 = blockIdx.x * static_cast<int64_t>(kGroup);
  const int64_t n = min(static_cast<int64_t>(a.ctx[s]), a.max_ctx);
  const int64_t per = SplitRows(n), u0 = split * per, u1 = min(n, u0 + per);
  if (u0 >= u1) return;
  const AttendLayout l(p, kGroup);
  const int width = static_cast<int>(l.width), w4 = static_cast<int>(l.w4);
  const int stride = static_cast<int>(l.stride);
  const int groups = static_cast<int>(min(static_cast<int64_t>(kGroup), p.heads - h0));
  const uint8_t** rowptr = reinterpret_cast<const uint8_t**>(smem_raw);
  float* tile = reinterpret_cast<float*>(smem_raw + kTile * 8);  // [kTile][stride]
  float* qs = tile + kTile * stride;    // [kGroup][stride]: q_lat then the rope part, zero padded
  float* ps = qs + kGroup * stride;     // [kGroup][kTile]: scores, then probabilities
  float* alpha = ps + kGroup * kTile;   // [kGroup]
  uint8_t* raw = reinterpret_cast<uint8_t*>(alpha + kGroup);  // [kTile][pitch] (KV != 0)
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int e = tid; e < kGroup * w4; e += kAttendThreads) {
    const int g = e / w4, j = e % w4;
    const int64_t h = h0 + g;
    float v = 0.0f;
    if (g < groups && j < p.rank) {
      v = a.q_lat[(s * p.heads + h) * p.rank + j];
    } else if (g < groups && j < width) {
      v = a.q[(s * p.heads + h) * (p.nope + p.rope) + p.nope + (j - p.rank)];
    }
    qs[g * stride + j] = v;
  }
  // Zero tile: its padding stays zero, and a short tile's unused rows hold finite values.
  for (int e = tid; e < kTile * stride; e += kAttendThreads) tile[e] = 0.0f;
  float acc[kGroup][kCols];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[g][c] = 0.0f;
  }
  float run_max[kGroup / 8], run_sum[kGroup / 8];  // of the heads warp, warp + 8, ...
#pragma unroll
  for (int i = 0; i < kGroup / 8; ++i) {
    run_max[i] = -INFINITY;
    run_sum[i] = 0.0f;
  }
  const int gran = a.vec16 ? 16 : 4, chunks = static_cast<int>(p.row_bytes) / gran;
  uint8_t* dst = KV == 0 ? reinterpret_cast<uint8_t*>(tile) : raw;
  const int64_t dst_pitch = KV == 0 ? stride * 4 : l.pitch;
  for (int64_t t0 = u0; t0 < u1; t0 += kTile) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTile), u1 - t0));
    __syncthreads();  // the previous tile fully used
    if (tid < rows) {
      const int64_t u = t0 + tid;
      const int64_t blk = a.table[s * p.table_stride + u / p.block_tokens];
      rowptr[tid] = a.pool + blk * p.block_bytes + (u % p.block_tokens) * p.row_bytes;
    }
    __syncthreads();
    for (int e = tid; e < rows * chunks; e += kAttendThreads) {
      const int t = e / chunks, c = e % chunks;
      CpAsync(dst + t * dst_pitch + c * gran, rowptr[t] + c * gran, a.vec16);
    }
    CpAsyncWaitAll();
    __syncthreads();
    if (KV != 0) {  // dequantize the raw rows into the fp32 tile
      for (int t = 0; t < rows; ++t) {
        for (int j = tid; j < width; j += kAttendThreads) {
          tile[t * stride + j] = CachedValue<KV>(p, raw + t * l.pitch, j);
        }
      }
      __syncthreads();
    }
    // Scores, register-blocked: a thread takes 2 rows x 4 heads (8 dot products) over one of
    // kSlices interleaved slices of the rows' float4s (6 16-byte reads for 32 FMAs; a quarter
    // warp reads 128 contiguous bytes, or 2 x 64 bytes 16 banks apart); the slices sit in adjacent
    // lanes and are summed by a butterfly of shuffles (a fixed order).
    {
      constexpr int kQuads = kGroup / 4, kSlices = kAttendThreads / (kQuads * (kTile / 2));
      static_assert(kSlices * kQuads * (kTile / 2) == kAttendThreads, "a dot block a thread");
      const int slice = lane % kSlices, blk = tid / kSlices, hq = blk % kQuads, rp = blk / kQuads;
      const float4* x0v = reinterpret_cast<const float4*>(tile + (2 * rp) * stride);
      const float4* x1v = reinterpret_cast<const float4*>(tile + (2 * rp + 1) * stride);
      const float* qb = qs + (4 * hq) * stride;
      float d[2][4] = {};
      for (int j = slice; j < w4 / 4; j += kSlices) {
        const float4 x0 = x0v[j], x1 = x1v[j];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float4 y = reinterpret_cast<const float4*>(qb + k * stride)[j];
          d[0][k] = fmaf(x0.x, y.x, d[0][k]);
          d[0][k] = fmaf(x0.y, y.y, d[0][k]);
          d[0][k] = fmaf(x0.z, y.z, d[0][k]);
          d[0][k] = fmaf(x0.w, y.w, d[0][k]);
          d[1][k] = fmaf(x1.x, y.x, d[1][k]);
          d[1][k] = fmaf(x1.y, y.y, d[1][k]);
          d[1][k] = fmaf(x1.z, y.z, d[1][k]);
          d[1][k] = fmaf(x1.w, y.w, d[1][k]);
        }
      }
#pragma unroll
      for (int o = 1; o < kSlices; o <<= 1) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int k = 0; k < 4; ++k) d[r][k] += __shfl_xor_sync(0xffffffffu, d[r][k], o);
        }
      }
      if (slice == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int k = 0; k < 4; ++k) ps[(4 * hq + k) * kTile + 2 * rp + r] = d[r][k];
        }
      }
    }
    __syncthreads();
    // Softmax update: warp w takes heads w, w + 8, ...; lane t row t.
#pragma unroll
    for (int i = 0; i < kGroup / 8; ++i) {
      const int g = warp + 8 * i;
      const float dot = ps[g * kTile + lane];
      const float sc = lane < rows ? dot * p.softmax_scale : -INFINITY;
      float mx = sc;
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float new_max = fmaxf(run_max[i], mx);  // finite: the tile has a row
      const float pr = lane < rows ? expf(sc - new_max) : 0.0f;
      float sum = pr;
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      const float al = expf(run_max[i] - new_max);  // 0 on the first tile
      run_sum[i] = run_sum[i] * al + sum;
      run_max[i] = new_max;
      ps[g * kTile + lane] = pr;
      if (lane == 0) alpha[g] = al;
    }
    __syncthreads();
    // acc[g][c] = acc[g][c] * alpha[g] + sum_t p[g][t] c_t[j], j = tid + 256 c.
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float al = alpha[g];
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[g][c] *= al;
    }
    for (int t4 = 0; t4 < kTile; t4 += 4) {
      float x[4][kCols];
#pragma unroll
      for (int tt = 0; tt < 4; ++tt) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const int64_t j = tid + kAttendThreads * c;
          x[tt][c] = j < p.rank ? tile[(t4 + tt) * stride + j] : 0.0f;
        }
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const float4 pv = *reinterpret_cast<const float4*>(ps + g * kTile + t4);
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          float v = acc[g][c];
          v = fmaf(pv.x, x[0][c], v);
          v = fmaf(pv.y, x[1][c], v);
          v = fmaf(pv.z, x[2][c], v);
          v = fmaf(pv.w, x[3][c], v);
          acc[g][c] = v;
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {  // kGroup, not groups: acc stays in registers
    if (g >= groups) break;
    float* out = a.part + ((s * p.heads + h0 + g) * kMaxSplits + split) * p.rank;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t j = tid + kAttendThreads * c;
      if (j < p.rank) out[j] = acc[g][c];
    }
  }
#pragma unroll
  for (int i = 0; i < kGroup / 8; ++i) {
    const int g = warp + 8 * i;
    if (lane == 0 && g < groups) {
      float* ml = a.ml + ((s * p.heads + h0 + g) * kMaxSplits + split) * 2;
      ml[0] = run_max[i];
      ml[1] = run_sum[i];
    }
  }
}

// o_lat[s, h] = sum_k e^(m_k - M) part_k / sum_k e^(m_k - M) l_k over the sequence's splits, in
// split order; zeros for an empty context. One block per (s, h).
__global__ void CombineSplitsKernel(Mla p, const int32_t* ctx, int64_t max_ctx, const float* part,
                                    const float* ml, float* o_lat) {
  const int64_t sh = blockIdx.x, s = sh / p.heads;
  const int64_t n = min(static_cast<int64_t>(ctx[s]), max_ctx);
  const int64_t per = SplitRows(n), splits = n > 0 ? (n + per - 1) / per : 0;
  const float* m = ml + sh * kMaxSplits * 2;
  float mx = -INFINITY;
  for (int64_t k = 0; k < splits; ++k) mx = fmaxf(mx, m[2 * k]);
  float total = 0.0f;
  for (int64_t k = 0; k < splits; ++k) total += expf(m[2 * k] - mx) * m[2 * k + 1];
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  for (int64_t j = threadIdx.x; j < p.rank; j += blockDim.x) {
    float v = 0.0f;
    for (int64_t k = 0; k < splits; ++k) {
      v = fmaf(expf(m[2 * k] - mx), part[(sh * kMaxSplits + k) * p.rank + j], v);
    }
    o_lat[sh * p.rank + j] = v * inv;
  }
}

template <int KV, int kGroup, int kCols>
int LaunchAttend(const AttendArgs& a, int64_t b, cudaStream_t st) {
  const size_t bytes = static_cast<size_t>(AttendLayout(a.p, kGroup).bytes);
  auto kernel = AttendSplitKernel<KV, kGroup, kCols>;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(bytes));
  if (e != cudaSuccess) return static_cast<int>(e);
  const dim3 grid(static_cast<unsigned>((a.p.heads + kGroup - 1) / kGroup), kMaxSplits,
                  static_cast<unsigned>(b));
  kernel<<<grid, kAttendThreads, bytes, st>>>(a);
  return 0;
}

template <int KV>
int LaunchAttendFor(const AttendArgs& a, int64_t b, cudaStream_t st) {
  // 8 heads a block where there are no more (one read of the rows for all of them), else 16
  // (more heads per read; for r + dr = 576, 2 blocks per SM fit with fp32 rows, 1 with the raw
  // 8-bit or bf16 rows beside the fp32 tile).
  const bool wide = a.p.rank > kAttendThreads;
  if (a.p.heads <= 8) {
    return wide ? LaunchAttend<KV, 8, 2>(a, b, st) : LaunchAttend<KV, 8, 1>(a, b, st);
  }
  return wide ? LaunchAttend<KV, 16, 2>(a, b, st) : LaunchAttend<KV, 16, 1>(a, b, st);
}

}  // namespace

int64_t MlaScratchFloats(int64_t b, int64_t heads, int64_t rank, int64_t /*max_ctx*/) {
  return b * heads * (2 * rank + kMaxSplits * (rank + 2));
}

int MlaDecode(const Mla& p, const float* q, int64_t b, const float* kv_b, const uint8_t* pool,
              const int32_t* table, const int32_t* ctx, int64_t max_ctx, float* o, float* scratch,
              void* stream) {
  if (b <= 0) return 0;
  // 8-bit rows read their fp32 scales in place: rows and blocks must keep them 4-byte aligned.
  // The columns of a block's threads cover at most 2 x 256 latent values.
  if (p.heads <= 0 || p.rank <= 0 || p.rank > 2 * kAttendThreads || p.rope < 0 || p.nope < 0 ||
      p.v <= 0 || reinterpret_cast<uintptr_t>(pool) % 4 != 0 ||
      p.block_tokens <= 0 || max_ctx <= 0 || p.kv_dtype < 0 || p.kv_dtype > 3 ||
      p.row_bytes % 4 != 0 || p.block_bytes % 4 != 0 || p.rank % 4 != 0 || b > 65535) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  (void)cudaGetLastError();  // report this launch's error, not an earlier one
  const auto st = static_cast<cudaStream_t>(stream);
  float* q_lat = scratch;
  float* o_lat = q_lat + b * p.heads * p.rank;
  float* part = o_lat + b * p.heads * p.rank;
  float* ml = part + b * p.heads * kMaxSplits * p.rank;
  const int64_t qrow = p.heads * (p.nope + p.rope), kvh = (p.nope + p.v) * p.rank;
  // q_lat[s, h, j] = sum_i q_nope[s, h, i] W_UK[h][i][j]
  HeadGemm({b, p.rank, p.nope, q, qrow, p.nope + p.rope, kv_b, kvh, p.rank, 1, q_lat,
            p.heads * p.rank, p.rank},
           p.heads, st);
  const bool vec16 =
      (reinterpret_cast<uintptr_t>(pool) % 16 | p.row_bytes % 16 | p.block_bytes % 16) == 0;
  AttendArgs a{p, q, q_lat, pool, table, ctx, max_ctx, part, ml, vec16};
  int rc = 0;
  switch (p.kv_dtype) {
    case 0: rc = LaunchAttendFor<0>(a, b, st); break;
    case 1: rc = LaunchAttendFor<1>(a, b, st); break;
    case 2: rc = LaunchAttendFor<2>(a, b, st); break;
    default: rc = LaunchAttendFor<3>(a, b, st); break;
  }
  if (rc != 0) return rc;
  CombineSplitsKernel<<<static_cast<unsigned>(b * p.heads), 128, 0, st>>>(p, ctx, max_ctx, part,
                                                                           ml, o_lat);
  // o[s, h * dv + k] = sum_j o_lat[s, h, j] W_UV[h][k][j]
  HeadGemm({b, p.v, p.rank, o_lat, p.heads * p.rank, p.rank, kv_b + p.nope * p.rank, kvh, 1,
            p.rank, o, p.heads * p.v, p.v},
           p.heads, st);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace dmoe::cuda::launch
