// The row-wise kernels of an engine step: RMSNorm, the SwiGLU activation, the embedding lookup,
// YaRN RoPE and the MoE gate. Each mirrors its kernels/cpu counterpart's arithmetic (the GPU tests
// compare them).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

namespace dmoe::cuda::launch {
namespace {

constexpr int kThreads = 256;

// The launch's own error: Clear() before it drops an error left by an earlier call.
void Clear() { (void)cudaGetLastError(); }
int Err() { return static_cast<int>(cudaGetLastError()); }

int64_t Blocks(int64_t n) { return (n + kThreads - 1) / kThreads; }

__global__ void RmsNormKernel(const float* x, int64_t n, int64_t x_stride, const float* w,
                              double eps, float* y, int64_t y_stride) {
  const float* xr = x + blockIdx.x * x_stride;
  float* yr = y + blockIdx.x * y_stride;
  __shared__ double part[kThreads];
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += static_cast<double>(xr[i]) * xr[i];
  part[threadIdx.x] = ss;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  const float inv = static_cast<float>(1.0 / sqrt(part[0] / static_cast<double>(n) + eps));
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

__global__ void SiluMulKernel(const float* g, const float* u, int64_t n, float* h) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) h[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

__global__ void EmbeddingKernel(const void* table, bool bf16, int64_t dim, const int32_t* ids,
                                float* out) {
  const int64_t row = ids[blockIdx.x];
  float* o = out + blockIdx.x * dim;
  if (bf16) {
    const __nv_bfloat16* t = static_cast<const __nv_bfloat16*>(table) + row * dim;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __bfloat162float(t[i]);
  } else {
    const float* t = static_cast<const float*>(table) + row * dim;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = t[i];
  }
}

// One thread per (row, head) vector: it reads the whole vector before writing (x == out is fine).
__global__ void RopeKernel(const float* cos, const float* sin, int64_t dim, const int32_t* pos,
                           const float* x, int64_t rows, int64_t heads, int64_t row_stride,
                           int64_t head_stride, float* out) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= rows * heads) return;
  const int64_t r = v / heads, h = v % heads, half = dim / 2;
  const float* xv = x + r * row_stride + h * head_stride;
  float* ov = out + r * row_stride + h * head_stride;
  const float* cs = cos + static_cast<int64_t>(pos[r]) * half;
  const float* sn = sin + static_cast<int64_t>(pos[r]) * half;
  float in[256];
  for (int64_t i = 0; i < dim; ++i) in[i] = xv[i];
  for (int64_t j = 0; j < half; ++j) {
    const float a = in[2 * j], b = in[2 * j + 1];
    ov[j] = a * cs[j] - b * sn[j];
    ov[j + half] = b * cs[j] + a * sn[j];
  }
}

// The index of the largest of v[0, n) not yet taken (ties: the lower index); -1 if none.
__device__ int ArgMaxFree(const float* v, const bool* taken, int n) {
  int best = -1;
  for (int i = 0; i < n; ++i) {
    if (taken[i]) continue;
    if (best < 0 || v[i] > v[best]) best = i;
  }
  return best;
}

// One thread per token row, in the order of cpu::SelectExperts.
__global__ void SelectExpertsKernel(Gate p, float* logits, int64_t t, const float* bias,
                                    int32_t* ids, float* w, float* scratch) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= t) return;
  const int e = static_cast<int>(p.n_experts);
  float* s = logits + r * e;
  float* cand = scratch + r * e;
  if (p.scoring == 1) {
    for (int i = 0; i < e; ++i) s[i] = 1.0f / (1.0f + expf(-s[i]));
  } else {
    float mx = -INFINITY;
    for (int i = 0; i < e; ++i) mx = s[i] > mx ? s[i] : mx;
    double sum = 0.0;
    for (int i = 0; i < e; ++i) {
      const float x = isinf(s[i]) && s[i] < 0 ? 0.0f : expf(s[i] - mx);
      s[i] = x;
      sum += x;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int i = 0; i < e; ++i) s[i] *= inv;
  }
  for (int i = 0; i < e; ++i) cand[i] = s[i] + (p.method == 2 ? bias[i] : 0.0f);
  if (p.method != 0) {
    const int groups = static_cast<int>(p.n_group), per = e / groups;
    float g[64];
    bool kept[64], taken[64];
    for (int j = 0; j < groups; ++j) {
      float a = -INFINITY, b = -INFINITY;
      for (int i = 0; i < per; ++i) {
        const float v = cand[j * per + i];
        if (v > a) {
          b = a;
          a = v;
        } else if (v > b) {
          b = v;
        }
      }
      g[j] = p.method == 2 ? a + b : a;
      kept[j] = taken[j] = false;
    }
    for (int j = 0; j < p.topk_group; ++j) {
      const int best = ArgMaxFree(g, taken, groups);
      taken[best] = kept[best] = true;
    }
    const float masked = p.method == 2 ? -INFINITY : 0.0f;
    for (int i = 0; i < e; ++i) {
      if (!kept[i / per]) cand[i] = masked;
    }
  }
  bool taken[1024];
  for (int i = 0; i < e; ++i) taken[i] = false;
  int32_t* ri = ids + r * p.top_k;
  float* rw = w + r * p.top_k;
  double sum = 0.0;
  for (int j = 0; j < p.top_k; ++j) {
    const int best = ArgMaxFree(cand, taken, e);
    taken[best] = true;
    ri[j] = best;
    rw[j] = p.method == 2 ? s[best] : cand[best];
    sum += rw[j];
  }
  const bool normalize = p.top_k > 1 && p.norm_topk_prob;
  if (normalize) {
    for (int j = 0; j < p.top_k; ++j) rw[j] = static_cast<float>(rw[j] / (sum + 1e-20));
  }
  if (!normalize || p.scale_after_norm) {
    for (int j = 0; j < p.top_k; ++j) rw[j] *= p.routed_scaling_factor;
  }
}

}  // namespace

int RmsNorm(const float* x, int64_t rows, int64_t n, int64_t x_stride, const float* w, double eps,
            float* y, int64_t y_stride, void* stream) {
  if (rows <= 0) return 0;
  Clear();
  RmsNormKernel<<<static_cast<unsigned>(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, n, x_stride, w, eps, y, y_stride);
  return Err();
}

int SiluMul(const float* g, const float* u, int64_t n, float* h, void* stream) {
  if (n <= 0) return 0;
  Clear();
  SiluMulKernel<<<static_cast<unsigned>(Blocks(n)), kThreads, 0,
                  static_cast<cudaStream_t>(stream)>>>(g, u, n, h);
  return Err();
}

int Embedding(const void* table, bool bf16, int64_t dim, const int32_t* ids, int64_t n, float* out,
              void* stream) {
  if (n <= 0) return 0;
  Clear();
  EmbeddingKernel<<<static_cast<unsigned>(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      table, bf16, dim, ids, out);
  return Err();
}

int Rope(const float* cos, const float* sin, int64_t dim, const int32_t* pos, const float* x,
         int64_t rows, int64_t heads, int64_t row_stride, int64_t head_stride, float* out,
         void* stream) {
  if (dim > 256 || dim % 2 != 0) return static_cast<int>(cudaErrorInvalidValue);
  if (rows * heads <= 0) return 0;
  Clear();
  RopeKernel<<<static_cast<unsigned>(Blocks(rows * heads)), kThreads, 0,
               static_cast<cudaStream_t>(stream)>>>(cos, sin, dim, pos, x, rows, heads, row_stride,
                                                    head_stride, out);
  return Err();
}

int SelectExperts(const Gate& p, float* logits, int64_t t, const float* bias, int32_t* ids,
                  float* w, float* scratch, void* stream) {
  if (p.n_experts <= 0 || p.n_experts > 1024 || p.n_group <= 0 || p.n_group > 64 ||
      p.n_experts % p.n_group != 0 || p.top_k < 1 || p.top_k > p.n_experts ||
      (p.method != 0 && (p.topk_group < 1 || p.topk_group > p.n_group)) ||
      (p.method == 2 && bias == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (t <= 0) return 0;
  Clear();
  SelectExpertsKernel<<<static_cast<unsigned>((t + 63) / 64), 64, 0,
                        static_cast<cudaStream_t>(stream)>>>(p, logits, t, bias, ids, w, scratch);
  return Err();
}

}  // namespace dmoe::cuda::launch
