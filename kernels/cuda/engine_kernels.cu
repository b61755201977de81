// The kernels of the GPU engine's step besides kernels/cuda/basic_kernels.cu's: residual adds,
// writing and reading rows of the paged latent cache (fp32 or the 656-byte 8-bit layout, as
// cpu::QuantizeKvRow / cpu::DequantizeKvRows), and the causal softmax of the naive (prefill)
// attention.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

namespace dmoe::cuda::launch {
namespace {

constexpr int kThreads = 256;

void Clear() { (void)cudaGetLastError(); }
int Err() { return static_cast<int>(cudaGetLastError()); }
int64_t Blocks(int64_t n) { return (n + kThreads - 1) / kThreads; }

__global__ void AddKernel(const float* a, int64_t n, float* y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] += a[i];
}

__device__ int64_t RowBytes(const LatentPool& p) {
  if (p.kv_dtype == 0) return 4 * (p.rank + p.rope);
  if (p.kv_dtype == 3) return 2 * (p.rank + p.rope);
  return p.rank + 4 * ((p.rank + 127) / 128) + 2 * p.rope;
}

__device__ uint8_t* RowAt(const LatentPool& p, uint8_t* pool, int64_t slot) {
  return pool + (slot / p.block_tokens) * p.block_bytes + (slot % p.block_tokens) * RowBytes(p);
}

// common/dtype.cc's FloatToFp8E4M3: round to nearest even, saturating at 448.
__device__ uint8_t ToFp8E4M3(float f) {
  const uint8_t sign = signbit(f) ? 0x80 : 0;
  if (isnan(f)) return sign | 0x7f;
  const float a = fabsf(f);
  if (a >= 448.0f) return sign | 0x7e;
  if (a < 0.015625f) return sign | static_cast<uint8_t>(rintf(a * 512.0f));
  int e;
  frexpf(a, &e);
  int e2 = e - 1;
  int m = static_cast<int>(rintf((ldexpf(a, -e2) - 1.0f) * 8.0f));
  if (m == 8) {
    m = 0;
    ++e2;
  }
  return sign | static_cast<uint8_t>(((e2 + 7) << 3) | m);
}

__device__ float FromFp8E4M3(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) {
    v = __int_as_float(0x7fc00000);
  } else if (e == 0) {
    v = ldexpf(static_cast<float>(m), -9);
  } else {
    v = ldexpf(static_cast<float>(8 + m), e - 10);
  }
  return (b & 0x80) ? -v : v;
}

// One block per row; one warp per 128-value scale group of the 8-bit layout.
__global__ void StoreLatentKernel(LatentPool p, const float* rows, const int32_t* slots,
                                  uint8_t* pool) {
  const float* src = rows + blockIdx.x * (p.rank + p.rope);
  uint8_t* dst = RowAt(p, pool, slots[blockIdx.x]);
  if (p.kv_dtype == 0) {
    float* d = reinterpret_cast<float*>(dst);
    for (int64_t i = threadIdx.x; i < p.rank + p.rope; i += blockDim.x) d[i] = src[i];
    return;
  }
  if (p.kv_dtype == 3) {
    __nv_bfloat16* d = reinterpret_cast<__nv_bfloat16*>(dst);
    for (int64_t i = threadIdx.x; i < p.rank + p.rope; i += blockDim.x)
      d[i] = __float2bfloat16_rn(src[i]);
    return;
  }
  const int64_t groups = (p.rank + 127) / 128;
  float* scales = reinterpret_cast<float*>(dst + p.rank);
  __nv_bfloat16* pe = reinterpret_cast<__nv_bfloat16*>(dst + p.rank + 4 * groups);
  for (int64_t j = threadIdx.x; j < p.rope; j += blockDim.x)
    pe[j] = __float2bfloat16_rn(src[p.rank + j]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t g = warp; g < groups; g += blockDim.x / 32) {
    const int64_t a = g * 128, b = min(p.rank, a + 128);
    float amax = 0.0f;
    for (int64_t i = a + lane; i < b; i += 32) amax = fmaxf(amax, fabsf(src[i]));
    for (int off = 16; off > 0; off >>= 1)
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    const float scale = amax > 0.0f ? amax / (p.kv_dtype == 1 ? 127.0f : 448.0f) : 1.0f;
    if (lane == 0) scales[g] = scale;
    for (int64_t i = a + lane; i < b; i += 32) {
      const float v = src[i] / scale;
      dst[i] =
          p.kv_dtype == 1
              ? static_cast<uint8_t>(static_cast<int8_t>(fmaxf(-127.0f, fminf(127.0f, rintf(v)))))
              : ToFp8E4M3(v);
    }
  }
}

// One block per row u < ctx of the sequence.
__global__ void GatherLatentKernel(LatentPool p, const uint8_t* pool, const int32_t* table,
                                   float* out) {
  const int64_t u = blockIdx.x;
  const int64_t slot =
      static_cast<int64_t>(table[u / p.block_tokens]) * p.block_tokens + u % p.block_tokens;
  const uint8_t* row = RowAt(p, const_cast<uint8_t*>(pool), slot);
  float* o = out + u * (p.rank + p.rope);
  if (p.kv_dtype == 0) {
    const float* r = reinterpret_cast<const float*>(row);
    for (int64_t i = threadIdx.x; i < p.rank + p.rope; i += blockDim.x) o[i] = r[i];
    return;
  }
  if (p.kv_dtype == 3) {
    const __nv_bfloat16* r = reinterpret_cast<const __nv_bfloat16*>(row);
    for (int64_t i = threadIdx.x; i < p.rank + p.rope; i += blockDim.x)
      o[i] = __bfloat162float(r[i]);
    return;
  }
  const int64_t groups = (p.rank + 127) / 128;
  const float* scales = reinterpret_cast<const float*>(row + p.rank);
  const __nv_bfloat16* pe = reinterpret_cast<const __nv_bfloat16*>(row + p.rank + 4 * groups);
  for (int64_t i = threadIdx.x; i < p.rank; i += blockDim.x) {
    const float c =
        p.kv_dtype == 1 ? static_cast<float>(static_cast<int8_t>(row[i])) : FromFp8E4M3(row[i]);
    o[i] = c * scales[i / 128];
  }
  for (int64_t j = threadIdx.x; j < p.rope; j += blockDim.x)
    o[p.rank + j] = __bfloat162float(pe[j]);
}

__device__ double ReduceSum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const double r = shared[0];
  __syncthreads();
  return r;
}

__device__ float Reduce(float v, bool max, float* shared) {
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

// One block per row (head, i). The sum in double, as cpu::SoftmaxRows.
__global__ void CausalSoftmaxKernel(float* s, int64_t m, int64_t ctx, int64_t pos0, float scale) {
  __shared__ float red[kThreads];
  __shared__ double dred[kThreads];
  float* row = s + static_cast<int64_t>(blockIdx.x) * ctx;
  const int64_t limit = min(ctx, pos0 + static_cast<int64_t>(blockIdx.x) % m + 1);
  float mx = -INFINITY;
  for (int64_t u = threadIdx.x; u < limit; u += blockDim.x) {
    row[u] *= scale;
    mx = fmaxf(mx, row[u]);
  }
  mx = Reduce(mx, true, red);
  double sum = 0.0;
  for (int64_t u = threadIdx.x; u < ctx; u += blockDim.x) {
    const float e = u < limit ? expf(row[u] - mx) : 0.0f;
    row[u] = e;
    sum += e;
  }
  sum = ReduceSum(sum, dred);
  const float inv = sum > 0.0 ? static_cast<float>(1.0 / sum) : 0.0f;
  for (int64_t u = threadIdx.x; u < limit; u += blockDim.x) row[u] *= inv;
}

__global__ void ToBf16Kernel(const float* x, int64_t n, uint16_t* y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
}

bool BadPool(const LatentPool& p) {
  return p.rank <= 0 || p.rope < 0 || p.block_tokens <= 0 || p.block_bytes <= 0 || p.kv_dtype < 0 ||
         p.kv_dtype > 3 || p.block_bytes % 4 != 0 ||
         (p.kv_dtype != 0 && (p.rank % 4 != 0 || (p.rank + p.rope) % 2 != 0));
}

}  // namespace

int Add(const float* a, int64_t n, float* y, void* stream) {
  if (n <= 0) return 0;
  Clear();
  AddKernel<<<static_cast<unsigned>(Blocks(n)), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      a, n, y);
  return Err();
}

int ToBf16(const float* x, int64_t n, uint16_t* y, void* stream) {
  if (n <= 0) return 0;
  Clear();
  ToBf16Kernel<<<static_cast<unsigned>(Blocks(n)), kThreads, 0,
                 static_cast<cudaStream_t>(stream)>>>(x, n, y);
  return Err();
}

int StoreLatent(const LatentPool& p, const float* rows, int64_t n, const int32_t* slots,
                uint8_t* pool, void* stream) {
  if (BadPool(p)) return static_cast<int>(cudaErrorInvalidValue);
  if (n <= 0) return 0;
  Clear();
  StoreLatentKernel<<<static_cast<unsigned>(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      p, rows, slots, pool);
  return Err();
}

int GatherLatent(const LatentPool& p, const uint8_t* pool, const int32_t* table, int64_t ctx,
                 float* out, void* stream) {
  if (BadPool(p)) return static_cast<int>(cudaErrorInvalidValue);
  if (ctx <= 0) return 0;
  Clear();
  GatherLatentKernel<<<static_cast<unsigned>(ctx), kThreads, 0,
                       static_cast<cudaStream_t>(stream)>>>(p, pool, table, out);
  return Err();
}

int CausalSoftmax(float* s, int64_t heads, int64_t m, int64_t ctx, int64_t pos0, float scale,
                  void* stream) {
  if (m <= 0 || heads <= 0 || ctx <= 0) return 0;
  if (pos0 < 0) return static_cast<int>(cudaErrorInvalidValue);
  Clear();
  CausalSoftmaxKernel<<<static_cast<unsigned>(heads * m), kThreads, 0,
                        static_cast<cudaStream_t>(stream)>>>(s, m, ctx, pos0, scale);
  return Err();
}

}  // namespace dmoe::cuda::launch
