// Multi-head latent attention over a latent cache, for one sequence.
//
// Cache rows are [r + dr]: c (after kv_a_layernorm, r values) then the rotated k_pe (dr values),
// stored in blocks of `block_tokens` consecutive rows (a paged cache; a contiguous cache is one
// block).
// Queries q[T, H, dn + dr] hold q_nope then the rotated q_pe per head. Query t sits at position
// q_pos0 + t and attends to cache rows 0..q_pos0 + t (causal). Output o[T, H * dv].
#ifndef DMOE_KERNELS_CPU_MLA_H_
#define DMOE_KERNELS_CPU_MLA_H_

#include <cstdint>
#include <vector>

namespace dmoe::cpu {

// The cached rows of one sequence in one layer: row u is blocks[u / block_tokens] + (u %
// block_tokens) * (r + dr).
// How cached rows are stored. kF32: r + dr floats. kBf16: r + dr bf16 values (rounded to nearest
// even, NaN kept), 1152 bytes per token per layer for DeepSeek-V2, as the reference model's bf16
// cache holds them. 8-bit (the FlashMLA layout): r values of c_kv in int8 or fp8 e4m3, then one
// fp32 scale per 128 of them, then the dr values of k_pe in bf16: 512 + 16 + 128 = 656 bytes per
// token per layer for DeepSeek-V2 (2304 in fp32).
enum class KvDType { kF32, kInt8, kFp8, kBf16 };
const char* KvDTypeName(KvDType t);
// Bytes of one stored row of r latent + dr rope values.
int64_t KvRowBytes(KvDType t, int64_t r, int64_t dr);
// Stores row[r + dr] (c_kv then k_pe) as `t` at dst (KvRowBytes bytes).
void QuantizeKvRow(KvDType t, const float* row, int64_t r, int64_t dr, uint8_t* dst);
// The inverse: n stored rows at src -> n x (r + dr) floats.
void DequantizeKvRows(KvDType t, const uint8_t* src, int64_t n, int64_t r, int64_t dr, float* dst);

// The cached rows of one layer, block by block: fp32 blocks (`blocks`), or bf16 / 8-bit ones
// (`qblocks`, rows of KvRowBytes) that the kernels widen to fp32 one block (or span) at a time as
// they read them.
struct LatentRows {
  const float* const* blocks = nullptr;
  int64_t block_tokens = 0;
  const uint8_t* const* qblocks = nullptr;  // when the cache is bf16 or 8-bit
  KvDType dtype = KvDType::kF32;
  int64_t r = 0, dr = 0;  // with qblocks
};

struct MlaParams {
  int64_t num_heads = 0;    // H
  int64_t nope_dim = 0;     // dn
  int64_t rope_dim = 0;     // dr
  int64_t v_dim = 0;        // dv
  int64_t latent_rank = 0;  // r
  float softmax_scale = 0;
  const float* kv_b = nullptr;  // [H * (dn + dv), r]: per head W_UK [dn, r] then W_UV [dv, r]
  // Or (kv_b null) the same matrix as bf16 bits, as a bf16 checkpoint stores it: every product
  // widens each value exactly, so the outputs are the bits of its fp32 upcast at half the bytes.
  const uint16_t* kv_b_bf16 = nullptr;
};

// Naive form (prefill): expands k_nope and v for every cached row through kv_b.
void MlaAttentionNaive(const MlaParams& p, const float* q, int64_t t, const LatentRows& cache,
                       int64_t ctx, int64_t q_pos0, float* o, std::vector<float>* scratch);

// Weight-absorbed form (decode): q_lat = W_UK^T q_nope, scores against c directly, and W_UV applied
// to the latent output. Reads only the cache rows, never expands them.
void MlaAttentionAbsorbed(const MlaParams& p, const float* q, int64_t t, const LatentRows& cache,
                          int64_t ctx, int64_t q_pos0, float* o, std::vector<float>* scratch);

// Batched decode in the absorbed form: `b` sequences with one query each. q[b, H, dn + dr]; the
// query of sequence i sits at position ctx[i] - 1 of its cache caches[i] (ctx[i] rows);
// o[b, H * dv]. The W_UK / W_UV products run once for the whole batch.
void MlaDecodeAbsorbedBatch(const MlaParams& p, const float* q, int64_t b, const LatentRows* caches,
                            const int64_t* ctx, float* o, std::vector<float>* scratch);

// The invariant form attends to a position's rows in spans of 256 positions ([0, 256), [256, 512),
// ...), each read from memory once (scores and the weighted sum fused) and folded left to right;
// a call with few queries (batch-1 decode) runs its spans (cut into head groups when they are
// few) on every core, one with many runs a query per task, and one with few queries of one span
// each runs a task per head group from the absorbed query to the output projection (one pass over
// the pool): the same bits every way.
// Tests: the span length (0: 256), the split (0 auto, 1 a task per query, 2 a task per span, 3 a
// task per head group doing every span of every query in one pass), the
// bytes of span results held at once when spans run side by side (0: 64 MiB; smaller makes more
// waves) and the head groups each span is cut into there (0: chosen per call).
void SetMlaSpanForTesting(int64_t rows);
void SetMlaAttendModeForTesting(int mode);
void SetMlaWaveBytesForTesting(int64_t bytes);
void SetMlaHeadGroupsForTesting(int64_t groups);
// Tests: whether calls of at most 4 queries read each head's kv_b rows with plain loads before
// its products (default on; never changes a bit).
void SetMlaPullForTesting(bool on);

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_MLA_H_
