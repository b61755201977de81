#include "kernels/cpu/mla.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/dtype.h"
#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"

namespace dmoe::cpu {
namespace {

int I(int64_t v) { return static_cast<int>(v); }

// Scales the scores and masks u > q_pos0 + row / rows_per_query.
void ScaleAndMask(float* s, int64_t rows, int64_t rows_per_query, int64_t ctx, int64_t q_pos0,
                  float scale) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t row = 0; row < rows; ++row) {
    float* sr = s + row * ctx;
    const int64_t last = q_pos0 + row / rows_per_query;
    for (int64_t u = 0; u < ctx; ++u) sr[u] = u <= last ? sr[u] * scale : ninf;
  }
}

// Calls fn(block_rows, first_row, rows) for each block holding rows [0, ctx), with 8-bit blocks
// dequantized into a one-block fp32 tile first.
template <typename Fn>
void ForEachBlock(const LatentRows& c, int64_t ctx, Fn fn) {
  if (c.qblocks == nullptr) {
    for (int64_t first = 0, b = 0; first < ctx; first += c.block_tokens, ++b) {
      fn(c.blocks[b], first, std::min(c.block_tokens, ctx - first));
    }
    return;
  }
  thread_local std::vector<float> tile;
  tile.resize(static_cast<size_t>(c.block_tokens * (c.r + c.dr)));
  for (int64_t first = 0, b = 0; first < ctx; first += c.block_tokens, ++b) {
    const int64_t n = std::min(c.block_tokens, ctx - first);
    DequantizeKvRows(c.dtype, c.qblocks[b], n, c.r, c.dr, tile.data());
    fn(static_cast<const float*>(tile.data()), first, n);
  }
}

// S[m, ctx] (row stride ld) = alpha * A[m, k] (row stride lda) @ rows[:, offset:offset+k]^T.
void ScoreRows(const float* a, int64_t m, int64_t lda, const LatentRows& c, int64_t ctx, int64_t lc,
               int64_t offset, int64_t k, float alpha, float beta, float* s, int64_t ld) {
  ForEachBlock(c, ctx, [&](const float* rows, int64_t first, int64_t n) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(m), I(n), I(k), alpha, a, I(lda),
                rows + offset, I(lc), beta, s + first, I(ld));
  });
}

// out[m, r] (row stride ldo) = P[m, ctx] (row stride ld) @ rows[:, :r].
void SumRows(const float* p, int64_t m, int64_t ld, const LatentRows& c, int64_t ctx, int64_t lc,
             int64_t r, float* out, int64_t ldo) {
  ForEachBlock(c, ctx, [&](const float* rows, int64_t first, int64_t n) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(m), I(r), I(n), 1.0f, p + first, I(ld),
                rows, I(lc), first == 0 ? 0.0f : 1.0f, out, I(ldo));
  });
}

// ---- the batch-invariant form (KernelMode::kInvariant) ----
// Every query row is computed the same way whatever the other queries of the call: q_lat and
// the output projection through the invariant products, scores against each cached row, the
// softmax and the weighted sum over exactly the rows 0..pos of the query's own position (never a
// masked tail), in row order. So a position gives the same bits in a prefill chunk of any size,
// in decode, after a prefix-cache hit, and inside any batch.

// q[nq, H, dn + dr] -> qc[nq * H, r + dr] (q_lat = q_nope @ W_UK per head, then q_pe).
void AbsorbQueries(const MlaParams& p, const float* q, int64_t nq, float* qc) {
  const int64_t h = p.num_heads, dn = p.nope_dim, dr = p.rope_dim, r = p.latent_rank;
  const int64_t qd = dn + dr, kvd = dn + p.v_dim, lc = r + dr;
  // One head per task: at decode each head's product is too small to split, and the heads are
  // independent outputs (the products inside run inline, with the same chains).
  ThePool().Run(static_cast<int>(h), [&](int head) {
    AxpyRows(q + head * qd, nq, h * qd, p.kv_b + head * kvd * r, dn, r, r, qc + head * lc, h * lc,
             /*accumulate=*/false);
  });
  for (int64_t i = 0; i < nq * h; ++i) {
    const float* qpe = q + i * qd + dn;
    std::copy(qpe, qpe + dr, qc + i * lc + r);
  }
}

// olat[nq * H, r] -> o[nq, H * dv] (o_lat @ W_UV^T per head).
void ProjectOutputs(const MlaParams& p, const float* olat, int64_t nq, float* o) {
  const int64_t h = p.num_heads, dn = p.nope_dim, dv = p.v_dim, r = p.latent_rank;
  const int64_t kvd = dn + dv;
  ThePool().Run(static_cast<int>(h), [&](int head) {
    DotRows(olat + head * r, nq, h * r, p.kv_b + (head * kvd + dn) * r, dv, r, r, o + head * dv,
            h * dv);
  });
}

// t consecutive queries of one sequence at positions pos0 .. pos0 + t - 1: qc[t * H, lc] ->
// olat[t * H, r]. s: scratch of t * H * (pos0 + t) floats.
void AttendInvariant(const MlaParams& p, const float* qc, int64_t t, const LatentRows& cache,
                     int64_t pos0, float* s, float* olat) {
  const int64_t h = p.num_heads, r = p.latent_rank, lc = r + p.rope_dim;
  const int64_t ctx = pos0 + t;
  ForEachBlock(cache, ctx, [&](const float* rows, int64_t first, int64_t n) {
    DotRows(qc, t * h, lc, rows, n, lc, lc, s + first, ctx);
  });
  for (int64_t i = 0; i < t; ++i) {
    const int64_t limit = pos0 + i + 1;
    float* si = s + i * h * ctx;
    for (int64_t row = 0; row < h; ++row) {
      for (int64_t u = 0; u < limit; ++u) si[row * ctx + u] *= p.softmax_scale;
    }
    SoftmaxRows(si, h, limit, ctx);
  }
  ForEachBlock(cache, ctx, [&](const float* rows, int64_t first, int64_t n) {
    for (int64_t i = 0; i < t; ++i) {
      const int64_t limit = pos0 + i + 1;
      if (limit <= first) continue;
      AxpyRows(s + i * h * ctx + first, h, ctx, rows, std::min(n, limit - first), lc, r,
               olat + i * h * r, r, /*accumulate=*/first > 0);
    }
  });
}

void MlaInvariant(const MlaParams& p, const float* q, int64_t nseq, const int64_t* t,
                  const LatentRows* caches, const int64_t* pos0, float* o,
                  std::vector<float>* scratch) {
  const int64_t h = p.num_heads, r = p.latent_rank, lc = r + p.rope_dim;
  int64_t nq = 0, s_max = 0;
  for (int64_t i = 0; i < nseq; ++i) {
    nq += t[i];
    s_max = std::max(s_max, t[i] * h * (pos0[i] + t[i]));
  }
  scratch->resize(static_cast<size_t>(nq * h * lc + nq * h * r + s_max));
  float* qc = scratch->data();
  float* olat = qc + nq * h * lc;
  float* s = olat + nq * h * r;
  AbsorbQueries(p, q, nq, qc);
  for (int64_t i = 0, row = 0; i < nseq; row += t[i], ++i) {
    AttendInvariant(p, qc + row * h * lc, t[i], caches[i], pos0[i], s, olat + row * h * r);
  }
  ProjectOutputs(p, olat, nq, o);
}
}  // namespace

const char* KvDTypeName(KvDType t) {
  switch (t) {
    case KvDType::kF32:
      return "f32";
    case KvDType::kInt8:
      return "int8";
    case KvDType::kFp8:
      return "fp8_e4m3";
  }
  return "?";
}

int64_t KvRowBytes(KvDType t, int64_t r, int64_t dr) {
  if (t == KvDType::kF32) return 4 * (r + dr);
  return r + 4 * ((r + 127) / 128) + 2 * dr;
}

void QuantizeKvRow(KvDType t, const float* row, int64_t r, int64_t dr, uint8_t* dst) {
  if (t == KvDType::kF32) {
    std::memcpy(dst, row, sizeof(float) * static_cast<size_t>(r + dr));
    return;
  }
  const int64_t ns = (r + 127) / 128;
  uint8_t* q = dst;
  uint8_t* scales = dst + r;
  uint8_t* pe = scales + 4 * ns;
  for (int64_t g = 0; g < ns; ++g) {
    const int64_t a = g * 128, b = std::min(r, a + 128);
    float amax = 0;
    for (int64_t i = a; i < b; ++i) amax = std::max(amax, std::fabs(row[i]));
    const float scale = amax > 0 ? amax / (t == KvDType::kInt8 ? 127.0f : 448.0f) : 1.0f;
    std::memcpy(scales + 4 * g, &scale, 4);
    for (int64_t i = a; i < b; ++i) {
      const float v = row[i] / scale;
      q[i] = t == KvDType::kInt8 ? static_cast<uint8_t>(static_cast<int8_t>(
                                       std::max(-127.0f, std::min(127.0f, std::nearbyint(v)))))
                                 : FloatToFp8E4M3(v);
    }
  }
  for (int64_t j = 0; j < dr; ++j) {
    const uint16_t h = FloatToBf16(row[r + j]);
    std::memcpy(pe + 2 * j, &h, 2);
  }
}

void DequantizeKvRows(KvDType t, const uint8_t* src, int64_t n, int64_t r, int64_t dr, float* dst) {
  const int64_t rb = KvRowBytes(t, r, dr), lc = r + dr;
  if (t == KvDType::kF32) {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n * lc));
    return;
  }
  const int64_t ns = (r + 127) / 128;
  // fp8 codes -> float, once.
  static const std::vector<float> fp8 = [] {
    std::vector<float> v(256);
    for (int i = 0; i < 256; ++i)
      v[static_cast<size_t>(i)] = Fp8E4M3ToFloat(static_cast<uint8_t>(i));
    return v;
  }();
  for (int64_t row = 0; row < n; ++row) {
    const uint8_t* q = src + row * rb;
    const uint8_t* scales = q + r;
    const uint8_t* pe = scales + 4 * ns;
    float* out = dst + row * lc;
    for (int64_t g = 0; g < ns; ++g) {
      float scale;
      std::memcpy(&scale, scales + 4 * g, 4);
      const int64_t a = g * 128, b = std::min(r, a + 128);
      if (t == KvDType::kInt8) {
        for (int64_t i = a; i < b; ++i)
          out[i] = static_cast<float>(static_cast<int8_t>(q[i])) * scale;
      } else {
        for (int64_t i = a; i < b; ++i) out[i] = fp8[q[i]] * scale;
      }
    }
    for (int64_t j = 0; j < dr; ++j) {
      uint16_t h;
      std::memcpy(&h, pe + 2 * j, 2);
      out[r + j] = Bf16ToFloat(h);
    }
  }
}

void MlaAttentionNaive(const MlaParams& p, const float* q, int64_t t, const LatentRows& cache,
                       int64_t ctx, int64_t q_pos0, float* o, std::vector<float>* scratch) {
  const int64_t h = p.num_heads, dn = p.nope_dim, dr = p.rope_dim, dv = p.v_dim, r = p.latent_rank;
  const int64_t qd = dn + dr, kvd = dn + dv, ld_cache = r + dr;
  scratch->resize(static_cast<size_t>(ctx * h * kvd + t * ctx));
  float* kv = scratch->data();    // [ctx, H * (dn + dv)]
  float* s = kv + ctx * h * kvd;  // [t, ctx]
  ForEachBlock(cache, ctx, [&](const float* rows, int64_t first, int64_t n) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(n), I(h * kvd), I(r), 1.0f, rows,
                I(ld_cache), p.kv_b, I(r), 0.0f, kv + first * h * kvd, I(h * kvd));
  });
  for (int64_t head = 0; head < h; ++head) {
    const float* qn = q + head * qd;
    const float* kn = kv + head * kvd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(t), I(ctx), I(dn), 1.0f, qn, I(h * qd),
                kn, I(h * kvd), 0.0f, s, I(ctx));
    ScoreRows(qn + dn, t, h * qd, cache, ctx, ld_cache, r, dr, 1.0f, 1.0f, s, ctx);
    ScaleAndMask(s, t, 1, ctx, q_pos0, p.softmax_scale);
    SoftmaxRows(s, t, ctx, ctx);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(t), I(dv), I(ctx), 1.0f, s, I(ctx),
                kn + dn, I(h * kvd), 0.0f, o + head * dv, I(h * dv));
  }
}

void MlaAttentionAbsorbed(const MlaParams& p, const float* q, int64_t t, const LatentRows& cache,
                          int64_t ctx, int64_t q_pos0, float* o, std::vector<float>* scratch) {
  if (GetKernelMode() == KernelMode::kInvariant && ctx == q_pos0 + t) {
    MlaInvariant(p, q, 1, &t, &cache, &q_pos0, o, scratch);
    return;
  }
  const int64_t h = p.num_heads, dn = p.nope_dim, dr = p.rope_dim, dv = p.v_dim, r = p.latent_rank;
  const int64_t qd = dn + dr, kvd = dn + dv, lc = r + dr;
  scratch->resize(static_cast<size_t>(t * h * lc + t * h * ctx + t * h * r));
  float* qc = scratch->data();    // [t * H, r + dr]: q_lat then q_pe, rows ordered (t, h)
  float* s = qc + t * h * lc;     // [t * H, ctx]
  float* olat = s + t * h * ctx;  // [t * H, r]
  for (int64_t head = 0; head < h; ++head) {
    // q_lat[t, h] = q_nope[t, h] @ W_UK[h]  ([dn] x [dn, r]).
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(t), I(r), I(dn), 1.0f, q + head * qd,
                I(h * qd), p.kv_b + head * kvd * r, I(r), 0.0f, qc + head * lc, I(h * lc));
    for (int64_t i = 0; i < t; ++i) {
      const float* qpe = q + i * h * qd + head * qd + dn;
      float* dst = qc + (i * h + head) * lc + r;
      for (int64_t j = 0; j < dr; ++j) dst[j] = qpe[j];
    }
  }
  // One GEMM scores every (query, head) row against [c, k_pe] of every cached token.
  ScoreRows(qc, t * h, lc, cache, ctx, lc, 0, lc, 1.0f, 0.0f, s, ctx);
  ScaleAndMask(s, t * h, h, ctx, q_pos0, p.softmax_scale);
  SoftmaxRows(s, t * h, ctx, ctx);
  SumRows(s, t * h, ctx, cache, ctx, lc, r, olat, r);
  for (int64_t head = 0; head < h; ++head) {
    // o[t, h] = o_lat[t, h] @ W_UV[h]^T  ([r] x [r, dv]).
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(t), I(dv), I(r), 1.0f, olat + head * r,
                I(h * r), p.kv_b + (head * kvd + dn) * r, I(r), 0.0f, o + head * dv, I(h * dv));
  }
}

void MlaDecodeAbsorbedBatch(const MlaParams& p, const float* q, int64_t b, const LatentRows* caches,
                            const int64_t* ctx, float* o, std::vector<float>* scratch) {
  if (GetKernelMode() == KernelMode::kInvariant) {
    thread_local std::vector<int64_t> ones, pos;
    ones.assign(static_cast<size_t>(b), 1);
    pos.resize(static_cast<size_t>(b));
    for (int64_t i = 0; i < b; ++i) pos[static_cast<size_t>(i)] = ctx[i] - 1;
    MlaInvariant(p, q, b, ones.data(), caches, pos.data(), o, scratch);
    return;
  }
  const int64_t h = p.num_heads, dn = p.nope_dim, dr = p.rope_dim, dv = p.v_dim, r = p.latent_rank;
  const int64_t qd = dn + dr, kvd = dn + dv, lc = r + dr;
  int64_t max_ctx = 0;
  for (int64_t i = 0; i < b; ++i) max_ctx = std::max(max_ctx, ctx[i]);
  scratch->resize(static_cast<size_t>(b * h * lc + h * max_ctx + b * h * r));
  float* qc = scratch->data();    // [b * H, r + dr], rows ordered (sequence, head)
  float* s = qc + b * h * lc;     // [H, max_ctx], one sequence at a time
  float* olat = s + h * max_ctx;  // [b * H, r]
  for (int64_t head = 0; head < h; ++head) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(b), I(r), I(dn), 1.0f, q + head * qd,
                I(h * qd), p.kv_b + head * kvd * r, I(r), 0.0f, qc + head * lc, I(h * lc));
  }
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t head = 0; head < h; ++head) {
      const float* qpe = q + (i * h + head) * qd + dn;
      std::copy(qpe, qpe + dr, qc + (i * h + head) * lc + r);
    }
    const int64_t n = ctx[i];
    ScoreRows(qc + i * h * lc, h, lc, caches[i], n, lc, 0, lc, p.softmax_scale, 0.0f, s, n);
    SoftmaxRows(s, h, n, n);
    SumRows(s, h, n, caches[i], n, lc, r, olat + i * h * r, r);
  }
  for (int64_t head = 0; head < h; ++head) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(b), I(dv), I(r), 1.0f, olat + head * r,
                I(h * r), p.kv_b + (head * kvd + dn) * r, I(r), 0.0f, o + head * dv, I(h * dv));
  }
}

}  // namespace dmoe::cpu
