// The launchers of kernels/cuda's .cu files: plain C++ (no CUDA headers), shared by nvcc and the
// C++ wrappers of cuda_kernels.h. Pointers are device pointers; `stream` is a cudaStream_t (null:
// the default stream). Each returns the launch's cudaError_t as an int (0: cudaSuccess).
#ifndef DMOE_KERNELS_CUDA_LAUNCH_H_
#define DMOE_KERNELS_CUDA_LAUNCH_H_

#include <cstdint>

namespace dmoe::cuda::launch {

// y[r] = w * (x[r] * 1/sqrt(mean(x[r]^2) + eps)) for rows r < rows of n values (the sum of
// squares in double, as cpu::RmsNorm); row r at x + r * x_stride and y + r * y_stride.
int RmsNorm(const float* x, int64_t rows, int64_t n, int64_t x_stride, const float* w, double eps,
            float* y, int64_t y_stride, void* stream);

// y[i] = bf16 bits of x[i] (round to nearest even), i < n.
int ToBf16(const float* x, int64_t n, uint16_t* y, void* stream);

// y[i] += a[i], i < n (the residual adds).
int Add(const float* a, int64_t n, float* y, void* stream);

// h[i] = silu(g[i]) * u[i], i < n (the SwiGLU activation).
int SiluMul(const float* g, const float* u, int64_t n, float* h, void* stream);

// out[i] = table[ids[i]] as fp32, rows of `dim`; the table fp32 or bf16 (bits).
int Embedding(const void* table, bool bf16, int64_t dim, const int32_t* ids, int64_t n, float* out,
              void* stream);

// RoPE in DeepSeek's layout (cpu::RopeTable::Apply): for each row r < rows and head h < heads,
// the `dim` values at x + r * row_stride + h * head_stride (checkpoint layout) rotated by
// position pos[r] into the same place of `out` (de-interleaved layout); cos/sin are the
// [max_positions, dim/2] tables. x == out is allowed. dim <= 256.
int Rope(const float* cos, const float* sin, int64_t dim, const int32_t* pos, const float* x,
         int64_t rows, int64_t heads, int64_t row_stride, int64_t head_stride, float* out,
         void* stream);

// One product of a grouped InvariantGemm: c [m, n] (ldc n) = a [m, k] (lda k) @ b [n, k]^T.
struct InvariantGemmGroup {
  int64_t m = 0;
  const void* a = nullptr;
  const void* b = nullptr;
  float* c = nullptr;
};

// Row-major c = alpha * a @ op(b) (+ beta * c) in which every output has ONE fixed order of
// operations, a function of k alone: k is cut into chunks of kInvariantGemmChunk (the last one
// shorter); each chunk is one chain of fused multiply-adds over its k in order (p = +0, then
// p = fma(a[i, j], b(j, col), p)); the chunks' sums are added in chunk order (t = p_0, then
// t = t + p_1, ...; t = +0 when k == 0); then v = alpha * t, and v = fma(beta, c, v) where
// beta != 0 (c is not read when beta == 0). An output's bits are thus a function of its own row
// of a and column of op(b) alone: never of m, the batch, the groups, the tiles, or whether the
// chunks ran in one block or in several (standing rule 1); and they equal a host loop's
// (std::fma, the same order).
// a [m, k] (lda); op(b)(j, col) = b[col * ldb + j] when b_trans (b [n, k]), else b[j * ldb + col]
// (b [k, n]); c [m, n] (ldc). `bf16`: a and b hold bf16 bits (their products are exact in fp32).
// `batch` problems at a + z * stride_a, ... (elements); or, with `groups` (a device array of
// n_groups, b_trans, lda = ldb = k, ldc = n), one product per group with its own m (<= max_m).
// A single product or a grouped one with too few tiles to fill the GPU (decode's few rows) runs
// its chunks in separate blocks (into `scratch`, InvariantGemmScratchFloats(g) floats) and adds
// them in a second kernel.
constexpr int64_t kInvariantGemmChunk = 512;
struct InvariantGemm {
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  bool b_trans = true;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int64_t batch = 1;
  float alpha = 1.0f, beta = 0.0f;
  bool bf16 = false;
  const InvariantGemmGroup* groups = nullptr;
  int64_t n_groups = 0, max_m = 0;
};
// Scratch floats RunInvariantGemm needs for g (0: its chunks run in one block per tile).
int64_t InvariantGemmScratchFloats(const InvariantGemm& g);
int RunInvariantGemm(const InvariantGemm& g, float* scratch, void* stream);

// cpu::GateParams, as plain values.
struct Gate {
  int64_t n_experts = 0;
  int64_t top_k = 0;
  int method = 0;   // 0 greedy, 1 group_limited_greedy, 2 noaux_tc
  int scoring = 0;  // 0 softmax, 1 sigmoid
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = false;
  float routed_scaling_factor = 1.0f;
  bool scale_after_norm = false;
};
// cpu::SelectExperts for t rows of router logits [t, E] (turned into scores in place): ids and w
// [t, k]. `bias` [E] for noaux_tc (else null); `scratch` [t, E] floats. E <= 1024, n_group <= 64.
int SelectExperts(const Gate& p, float* logits, int64_t t, const float* bias, int32_t* ids,
                  float* w, float* scratch, void* stream);

// MLA decode in the weight-absorbed form over a paged latent cache (cpu::MlaDecodeAbsorbedBatch):
// b sequences with one query each, q [b, H, dn + dr]; sequence i attends to its rows 0..ctx[i]-1,
// row u at pool + table[i * table_stride + u / block_tokens] * block_bytes
// + (u % block_tokens) * row_bytes; o [b, H * dv]. Rows as cpu::KvDType stores them: kv_dtype 0
// fp32 (r + dr floats), 1 int8 / 2 fp8 e4m3 (r codes, one fp32 scale per 128, dr bf16: the
// 656-byte layout), 3 bf16 (r + dr bf16 values). kv_b [H * (dn + dv), r] (W_UK then W_UV per head).
// `scratch`: MlaScratchFloats(b, H, r, max_ctx) floats.
struct Mla {
  int64_t heads = 0, nope = 0, rope = 0, v = 0, rank = 0;
  float softmax_scale = 0;
  int64_t block_tokens = 0, block_bytes = 0, row_bytes = 0, table_stride = 0;
  int kv_dtype = 0;
};
int64_t MlaScratchFloats(int64_t b, int64_t heads, int64_t rank, int64_t max_ctx);
int MlaDecode(const Mla& p, const float* q, int64_t b, const float* kv_b, const uint8_t* pool,
              const int32_t* table, const int32_t* ctx, int64_t max_ctx, float* o, float* scratch,
              void* stream);

// One layer of a paged latent cache: row u of block k at pool + k * block_bytes
// + u * row_bytes(kv_dtype, rank, rope) (`pool` already offset to the layer's rows).
struct LatentPool {
  int64_t rank = 0, rope = 0;
  int64_t block_tokens = 0, block_bytes = 0;
  int kv_dtype = 0;  // 0 fp32, 1 int8, 2 fp8 e4m3, 3 bf16 (as Mla::kv_dtype)
};
// Stores the n rows [n, rank + rope] (c_kv then the rotated k_pe) at the slots slots[i]
// (block * block_tokens + offset), quantized as cpu::QuantizeKvRow does.
int StoreLatent(const LatentPool& p, const float* rows, int64_t n, const int32_t* slots,
                uint8_t* pool, void* stream);
// The first ctx rows of one sequence (block table `table`) as fp32, out [ctx, rank + rope].
int GatherLatent(const LatentPool& p, const uint8_t* pool, const int32_t* table, int64_t ctx,
                 float* out, void* stream);

// Causal softmax of scores s [heads * m, ctx] (rows of ctx): row i of each head's m rows is the
// query at position pos0 + i; its entries u > pos0 + i become 0, the others
// softmax(scale * s) (as the CPU's ScaleAndMask + SoftmaxRows).
int CausalSoftmax(float* s, int64_t heads, int64_t m, int64_t ctx, int64_t pos0, float scale,
                  void* stream);

}  // namespace dmoe::cuda::launch

#endif  // DMOE_KERNELS_CUDA_LAUNCH_H_
