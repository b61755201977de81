// MLA decode, weight-absorbed, over a paged latent cache (fp32 or 8-bit rows, dequantized as they
// are read): three kernels per step (q_lat =
// W_UK^T q_nope; scores, softmax and o_lat = sum P c per (sequence, head); o = W_UV o_lat). A
// plain first version for correctness (the GPU tests compare it with the CPU kernel); the fused,
// bandwidth-bound kernel is still to come.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

namespace dmoe::cuda::launch {
namespace {

constexpr int kThreads = 256;

__device__ const uint8_t* Row(const Mla& p, const uint8_t* pool, const int32_t* table, int64_t seq,
                              int64_t u) {
  const int64_t block = table[seq * p.table_stride + u / p.block_tokens];
  return pool + block * p.block_bytes + (u % p.block_tokens) * p.row_bytes;
}

// fp8 e4m3 (OCP: bias 7, no infinities, 0x7f / 0xff NaN) -> float, exactly.
__device__ float Fp8E4M3(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) {
    v = __int_as_float(0x7fc00000);
  } else if (e == 0) {
    v = ldexpf(static_cast<float>(m), -9);  // m / 8 * 2^-6
  } else {
    v = ldexpf(static_cast<float>(8 + m), e - 10);  // (1 + m / 8) * 2^(e - 7)
  }
  return (b & 0x80) ? -v : v;
}

// Element j < r of a row's latent part, and element j < dr of its rope part.
__device__ float Latent(const Mla& p, const uint8_t* row, int64_t j) {
  if (p.kv_dtype == 0) return reinterpret_cast<const float*>(row)[j];
  if (p.kv_dtype == 3) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[j]);
  const float scale = reinterpret_cast<const float*>(row + p.rank)[j / 128];
  const uint8_t c = row[j];
  return (p.kv_dtype == 1 ? static_cast<float>(static_cast<int8_t>(c)) : Fp8E4M3(c)) * scale;
}
__device__ float RopePart(const Mla& p, const uint8_t* row, int64_t j) {
  if (p.kv_dtype == 0) return reinterpret_cast<const float*>(row)[p.rank + j];
  if (p.kv_dtype == 3)
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[p.rank + j]);
  const int64_t ns = (p.rank + 127) / 128;
  return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row + p.rank + 4 * ns)[j]);
}

// q_lat[s, h, j] = sum_i W_UK[h][i][j] q_nope[s, h, i]; one block per (s, h).
__global__ void AbsorbQueryKernel(Mla p, const float* q, const float* kv_b, float* q_lat) {
  const int64_t s = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const float* qn = q + (s * p.heads + h) * (p.nope + p.rope);
  const float* wuk = kv_b + h * (p.nope + p.v) * p.rank;
  float* out = q_lat + (s * p.heads + h) * p.rank;
  for (int64_t j = threadIdx.x; j < p.rank; j += blockDim.x) {
    float acc = 0.0f;
    for (int64_t i = 0; i < p.nope; ++i) acc += wuk[i * p.rank + j] * qn[i];
    out[j] = acc;
  }
}

__device__ float BlockReduce(float v, bool max, float* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float a = shared[threadIdx.x], b = shared[threadIdx.x + s];
      shared[threadIdx.x] = max ? fmaxf(a, b) : a + b;
    }
    __syncthreads();
  }
  const float r = shared[0];
  __syncthreads();
  return r;
}

// Scores against every cached row, softmax, and o_lat = sum_u P[u] c[u]; one block per (s, h).
__global__ void AttendKernel(Mla p, const float* q, const float* q_lat, const uint8_t* pool,
                             const int32_t* table, const int32_t* ctx, int64_t max_ctx,
                             float* scores, float* o_lat) {
  __shared__ float red[kThreads];
  const int64_t s = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t n = min(static_cast<int64_t>(ctx[s]), max_ctx);  // the launcher's bound
  const float* ql = q_lat + (s * p.heads + h) * p.rank;
  const float* qpe = q + (s * p.heads + h) * (p.nope + p.rope) + p.nope;
  float* sc = scores + (s * p.heads + h) * max_ctx;
  float mx = -INFINITY;
  for (int64_t u = threadIdx.x; u < n; u += blockDim.x) {
    const uint8_t* row = Row(p, pool, table, s, u);
    float acc = 0.0f;
    for (int64_t j = 0; j < p.rank; ++j) acc += ql[j] * Latent(p, row, j);
    for (int64_t j = 0; j < p.rope; ++j) acc += qpe[j] * RopePart(p, row, j);
    sc[u] = acc * p.softmax_scale;
    mx = fmaxf(mx, sc[u]);
  }
  mx = BlockReduce(mx, true, red);
  float sum = 0.0f;
  for (int64_t u = threadIdx.x; u < n; u += blockDim.x) {
    sc[u] = expf(sc[u] - mx);
    sum += sc[u];
  }
  sum = BlockReduce(sum, false, red);
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // ctx 0: a zero output, not NaN
  __syncthreads();  // every score written before any thread reads them all
  float* ol = o_lat + (s * p.heads + h) * p.rank;
  for (int64_t j = threadIdx.x; j < p.rank; j += blockDim.x) {
    float acc = 0.0f;
    for (int64_t u = 0; u < n; ++u) acc += sc[u] * Latent(p, Row(p, pool, table, s, u), j);
    ol[j] = acc * inv;
  }
}

// o[s, h * dv + k] = sum_j W_UV[h][k][j] o_lat[s, h, j]; one block per (s, h).
__global__ void ExpandOutputKernel(Mla p, const float* kv_b, const float* o_lat, float* o) {
  const int64_t s = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const float* wuv = kv_b + (h * (p.nope + p.v) + p.nope) * p.rank;
  const float* ol = o_lat + (s * p.heads + h) * p.rank;
  for (int64_t k = threadIdx.x; k < p.v; k += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < p.rank; ++j) acc += wuv[k * p.rank + j] * ol[j];
    o[s * p.heads * p.v + h * p.v + k] = acc;
  }
}

}  // namespace

int64_t MlaScratchFloats(int64_t b, int64_t heads, int64_t rank, int64_t max_ctx) {
  return b * heads * (2 * rank + max_ctx);
}

int MlaDecode(const Mla& p, const float* q, int64_t b, const float* kv_b, const uint8_t* pool,
              const int32_t* table, const int32_t* ctx, int64_t max_ctx, float* o, float* scratch,
              void* stream) {
  if (b <= 0) return 0;
  // 8-bit rows read their fp32 scales in place: rows and blocks must keep them 4-byte aligned.
  if (p.heads <= 0 || p.rank <= 0 || p.block_tokens <= 0 || max_ctx <= 0 || p.kv_dtype < 0 ||
      p.kv_dtype > 3 || p.row_bytes % 4 != 0 || p.block_bytes % 4 != 0 || p.rank % 4 != 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  (void)cudaGetLastError();  // report this launch's error, not an earlier one
  const auto st = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(b * p.heads);
  float* q_lat = scratch;
  float* o_lat = q_lat + b * p.heads * p.rank;
  float* scores = o_lat + b * p.heads * p.rank;
  AbsorbQueryKernel<<<grid, kThreads, 0, st>>>(p, q, kv_b, q_lat);
  AttendKernel<<<grid, kThreads, 0, st>>>(p, q, q_lat, pool, table, ctx, max_ctx, scores, o_lat);
  ExpandOutputKernel<<<grid, kThreads, 0, st>>>(p, kv_b, o_lat, o);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace dmoe::cuda::launch
