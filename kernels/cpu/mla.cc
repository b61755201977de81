#include "kernels/cpu/mla.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
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

// Rows [row0, row0 + rows) of kv_b as fp32, for the BLAS forms: a pointer into p.kv_b, or those
// rows of p.kv_b_bf16 widened (exactly) into *buf.
const float* KvBRows(const MlaParams& p, int64_t row0, int64_t rows, std::vector<float>* buf) {
  const int64_t r = p.latent_rank;
  if (p.kv_b_bf16 == nullptr) return p.kv_b + row0 * r;
  buf->resize(static_cast<size_t>(rows * r));
  Bf16ToFloatN(p.kv_b_bf16 + row0 * r, static_cast<size_t>(rows * r), buf->data());
  return buf->data();
}

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

// Calls fn(block_rows, first_row, rows) for each block holding rows [0, ctx), with bf16 / 8-bit
// blocks widened into a one-block fp32 tile first.
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
// the output projection through the invariant products, then attention over exactly the rows
// 0..pos of the query's own position (never a masked tail), in spans fixed by position (below).
// So a position gives the same bits in a prefill chunk of any size, in decode, after a
// prefix-cache hit, inside any batch and with any number of threads.

// Calls of up to this many queries in all (decode, or a prefill chunk of at most 4 tokens): a
// head's products read its kv_b rows once, from memory, and PullKvBRows reads them first.
constexpr int64_t kPullQueries = 4;
bool g_pull_kv_b = true;               // (off: tests)
std::atomic<uint64_t> g_pull_sink{0};  // (every core writes it: atomic, so no data race)

// Reads rows [row0, row0 + rows) of kv_b with plain loads and nothing else, so that the product
// that follows finds them in L2. At decode each head's W_UK and W_UV are read once per step, cold,
// by a few-row product whose arithmetic between loads keeps few reads in flight: a bare read loop
// keeps many. V2-Lite's shapes (16 heads, 4 MiB of bf16 kv_b), a batch-1 call: 220-245 -> 145-190
// us per layer with kv_b in memory, 50-60 -> 70-90 us with it in cache (a decode step never
// finds it there); v2-lite-4l int8 decode: attention 2.4-2.6 -> 2.1-2.3 ms per step.
void PullKvBRows(const MlaParams& p, int64_t nq, int64_t row0, int64_t rows) {
  if (!g_pull_kv_b || nq > kPullQueries) return;
  const int64_t r = p.latent_rank, size = p.kv_b_bf16 != nullptr ? 2 : 4;
  const char* c = p.kv_b_bf16 != nullptr ? reinterpret_cast<const char*>(p.kv_b_bf16 + row0 * r)
                                         : reinterpret_cast<const char*>(p.kv_b + row0 * r);
  const int64_t n = rows * r * size / 32;  // 32-byte steps (a few bytes at the end left out)
  uint64_t a = 0, b = 0, d = 0, e = 0;
  const auto at = [c](int64_t byte) {
    uint64_t v;
    std::memcpy(&v, c + byte, 8);  // (any alignment)
    return v;
  };
  for (int64_t i = 0; i < n; ++i) {
    a += at(32 * i);
    b += at(32 * i + 8);
    d += at(32 * i + 16);
    e += at(32 * i + 24);
  }
  g_pull_sink.store(a + b + d + e, std::memory_order_relaxed);  // (keeps the loads)
}

// qc's rows of one head from q[nq, H, dn + dr]: q_lat = q_nope @ W_UK[head], then q_pe.
void AbsorbHead(const MlaParams& p, const float* q, int64_t nq, int64_t head, float* qc) {
  const int64_t h = p.num_heads, dn = p.nope_dim, dr = p.rope_dim, r = p.latent_rank;
  const int64_t qd = dn + dr, kvd = dn + p.v_dim, lc = r + dr;
  PullKvBRows(p, nq, head * kvd, kvd);  // W_UK and W_UV: one longer stream
  if (p.kv_b_bf16 != nullptr) {
    AxpyRowsBf16(q + head * qd, nq, h * qd, p.kv_b_bf16 + head * kvd * r, dn, r, r, qc + head * lc,
                 h * lc, /*accumulate=*/false);
  } else {
    AxpyRows(q + head * qd, nq, h * qd, p.kv_b + head * kvd * r, dn, r, r, qc + head * lc, h * lc,
             /*accumulate=*/false);
  }
  for (int64_t i = 0; i < nq; ++i) {
    const float* qpe = q + (i * h + head) * qd + dn;
    std::copy(qpe, qpe + dr, qc + (i * h + head) * lc + r);
  }
}

// q[nq, H, dn + dr] -> qc[nq * H, r + dr] (q_lat = q_nope @ W_UK per head, then q_pe).
void AbsorbQueries(const MlaParams& p, const float* q, int64_t nq, float* qc) {
  // One head per task: at decode each head's product is too small to split, and the heads are
  // independent outputs (the products inside run inline, with the same chains).
  ThePool().RunEach(static_cast<int>(p.num_heads),
                    [&](int head) { AbsorbHead(p, q, nq, head, qc); });
}

// One head's columns of o[nq, H * dv] from olat[nq * H, r]: o_lat @ W_UV[head]^T.
void ProjectHead(const MlaParams& p, const float* olat, int64_t nq, int64_t head, float* o) {
  const int64_t h = p.num_heads, dn = p.nope_dim, dv = p.v_dim, r = p.latent_rank;
  const int64_t kvd = dn + dv;  // (W_UV was read with W_UK, AbsorbHead: in L2 or L3 now)
  if (p.kv_b_bf16 != nullptr) {
    DotRowsBf16(olat + head * r, nq, h * r, p.kv_b_bf16 + (head * kvd + dn) * r, dv, r, r,
                o + head * dv, h * dv);
  } else {
    DotRows(olat + head * r, nq, h * r, p.kv_b + (head * kvd + dn) * r, dv, r, r, o + head * dv,
            h * dv);
  }
}

// olat[nq * H, r] -> o[nq, H * dv] (o_lat @ W_UV^T per head).
void ProjectOutputs(const MlaParams& p, const float* olat, int64_t nq, float* o) {
  ThePool().RunEach(static_cast<int>(p.num_heads),
                    [&](int head) { ProjectHead(p, olat, nq, head, o); });
}

// ---- attention over spans (one pass over the cache) ----
// A query at position pos attends to rows 0..pos taken in spans of g_span positions, fixed by
// position alone ([0, S), [S, 2S), ...; never by the block size, the batch or the threads). Each
// span's rows are read from memory once: scores for every head, then (while the rows are still in
// cache) the softmax numerators and their weighted sum, relative to the span's own maximum. The
// spans are then folded left to right (span 0, then 1, ...), rescaling to the running maximum, as
// flash-decoding does. One fixed sequence of operations per query: the same bits whether its spans
// run one after another in one task (many queries: prefill, batched decode) or side by side on
// every core (few queries: batch-1 decode at a long context).
int64_t g_span = 256;
int g_attend_mode = 0;                     // 0 auto, 1 a task per query, 2 a task per span,
                                           // 3 a task per head group in one pass
int64_t g_wave_bytes = int64_t{64} << 20;  // span results held at once by AttendSpansInParallel
int64_t g_head_groups = 0;                 // 0: chosen per call
constexpr float kNoRows = -std::numeric_limits<float>::infinity();

// One query row group (H heads): qc [H, r + dr], its cache of ctx rows, olat [H, r].
struct Query {
  const float* qc;
  const LatentRows* cache;
  int64_t ctx;
  float* olat;
};

// One span's result per head: the maximum score m, l = sum of exp(s - m), and
// acc[r] = sum of exp(s - m) * c[:r].
struct SpanResult {
  float* m;
  double* l;
  float* acc;
};

struct Piece {
  const float* rows;  // row `first`
  int64_t first, n;
};

// Asks for n floats at p to be brought into L2 (prefetches never fault): a whole piece prefetched
// into L1 would evict the piece being scored; the products' own row-ahead prefetch takes rows on
// from L2 (a 4000-token small-model step: 4.1 -> 3.6 ms of attention).
void Prefetch(const float* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * 4; i += 64) _mm_prefetch(c + i, _MM_HINT_T1);
}

// Rows [a, b) of a cache (rows of lc floats) as fp32 pieces: pointers into fp32 blocks, or one
// piece of `tile` where bf16 / 8-bit rows are widened (once per span).
void SpanPieces(const LatentRows& c, int64_t lc, int64_t a, int64_t b, std::vector<float>* tile,
                std::vector<Piece>* pieces) {
  pieces->clear();
  if (c.qblocks != nullptr) tile->resize(static_cast<size_t>((b - a) * lc));
  for (int64_t first = a; first < b;) {
    const int64_t blk = first / c.block_tokens, in = first % c.block_tokens;
    const int64_t n = std::min(c.block_tokens - in, b - first);
    if (c.qblocks == nullptr) {
      pieces->push_back({c.blocks[blk] + in * lc, first, n});
    } else {
      DequantizeKvRows(c.dtype, c.qblocks[blk] + in * KvRowBytes(c.dtype, c.r, c.dr), n, c.r, c.dr,
                       tile->data() + (first - a) * lc);
    }
    first += n;
  }
  if (c.qblocks != nullptr) pieces->push_back({tile->data(), a, b - a});
}

// Per head (row `head` of s, n scores): the scores times `scale`, their maximum m, the
// numerators exp(s - m) in place (ops.h's ExpScaled: vector exp, the same bits at every ISA
// level; glibc's scalar expf had taken a fifth of a long-context decode's attention) and their sum
// l in double, in row order. Up to 8 heads' sums advance side by side: each is still its own chain
// in row order (the same bits), without waiting on one add's latency per row.
void SpanNumerators(float scale, int64_t h, int64_t n, float* s, const SpanResult& out) {
  for (int64_t head = 0; head < h; ++head) {
    float* row = s + head * n;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t u = 0; u < n; ++u) {
      row[u] *= scale;
      mx = row[u] > mx ? row[u] : mx;
    }
    out.m[head] = mx;
    if (mx == kNoRows) {  // -inf scores only (overflowed products) weigh nothing, as in SoftmaxRows
      std::fill(row, row + n, 0.0f);
    } else {
      ExpScaled(row, n, mx, 1.0f, row);  // (x - m) * 1 is x - m, exactly
    }
  }
  constexpr int64_t kHeads = 8;
  for (int64_t h0 = 0; h0 < h; h0 += kHeads) {
    const int64_t hn = std::min(kHeads, h - h0);
    double sum[kHeads] = {};
    for (int64_t u = 0; u < n; ++u) {
      for (int64_t j = 0; j < hn; ++j) sum[j] += s[(h0 + j) * n + u];
    }
    for (int64_t j = 0; j < hn; ++j) out.l[h0 + j] = sum[j];
  }
}

// The span [a, b) of one query, heads [h0, h1): scores (DotRows' chains, times the softmax
// scale), per head the maximum, the numerators and their sum (SpanNumerators), and acc = the
// AxpyRows chain of the numerators over the rows in order. Heads never interact, so any split of
// the heads gives the same bits.
void AttendSpan(const MlaParams& p, const Query& q, int64_t a, int64_t b, const SpanResult& res,
                int64_t h0, int64_t h1) {
  const int64_t h = h1 - h0, r = p.latent_rank, lc = r + p.rope_dim, n = b - a;
  const float* qc = q.qc + h0 * lc;
  const SpanResult out{res.m + h0, res.l + h0, res.acc + h0 * r};
  thread_local std::vector<float> s, tile;
  thread_local std::vector<Piece> pieces;
  // Room for a whole span at once: these grow with the context otherwise, each thread on its own
  // history (an allocation in whichever later step a worker first meets a longer span).
  const size_t span_rows = static_cast<size_t>(std::max(g_span, n));
  if (s.capacity() < static_cast<size_t>(p.num_heads) * span_rows) {
    s.reserve(static_cast<size_t>(p.num_heads) * span_rows);
    pieces.reserve(span_rows + 1);
    if (q.cache->qblocks != nullptr) tile.reserve(span_rows * static_cast<size_t>(lc));
  }
  s.resize(static_cast<size_t>(h * n));
  SpanPieces(*q.cache, lc, a, b, &tile, &pieces);
  // Each piece's rows are fetched while the previous piece is scored: cached rows come from
  // memory, and a row pass ahead (the products' own prefetch) is too short to hide its latency.
  Prefetch(pieces[0].rows, pieces[0].n * lc);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const Piece& pc = pieces[i];
    if (i + 1 < pieces.size()) Prefetch(pieces[i + 1].rows, pieces[i + 1].n * lc);
    DotRows(qc, h, lc, pc.rows, pc.n, lc, lc, s.data() + pc.first - a, n);
  }
  SpanNumerators(p.softmax_scale, h, n, s.data(), out);
  for (const Piece& pc : pieces) {
    AxpyRows(s.data() + pc.first - a, h, n, pc.rows, pc.n, lc, r, out.acc, r,
             /*accumulate=*/pc.first > a);
  }
}

// state = state (+) next: both rescaled to the larger maximum (separate multiplies and adds, in
// this order, for every head).
void FoldSpan(int64_t h, int64_t r, const SpanResult& state, const SpanResult& next) {
  for (int64_t head = 0; head < h; ++head) {
    const float mx = std::max(state.m[head], next.m[head]);
    float a = 0.0f, b = 0.0f;  // exp(m - mx) by SpanNumerators' exp (glibc's expf picks its code
                               // by the CPU: bits could differ between replicas' machines)
    if (state.m[head] != kNoRows) ExpScaled(state.m + head, 1, mx, 1.0f, &a);
    if (next.m[head] != kNoRows) ExpScaled(next.m + head, 1, mx, 1.0f, &b);
    state.m[head] = mx;
    state.l[head] = state.l[head] * a + next.l[head] * b;
    float* acc = state.acc + head * r;
    const float* nacc = next.acc + head * r;
    for (int64_t i = 0; i < r; ++i) acc[i] = acc[i] * a + nacc[i] * b;
  }
}

// olat = acc / l per head.
void FinishQuery(int64_t h, int64_t r, const SpanResult& state, float* olat) {
  for (int64_t head = 0; head < h; ++head) {
    const float inv = static_cast<float>(1.0 / state.l[head]);
    for (int64_t i = 0; i < r; ++i) olat[head * r + i] = state.acc[head * r + i] * inv;
  }
}

// Space for `count` span results of H heads (m, l, acc), and result i within it.
struct SpanResults {
  std::vector<float> f;  // m [count, H] then acc [count, H, r]
  std::vector<double> l;
  int64_t h = 0, r = 0, count = 0;
  void Resize(int64_t heads, int64_t rank, int64_t n) {
    h = heads;
    r = rank;
    count = n;
    f.resize(static_cast<size_t>(n * h * (1 + r)));
    l.resize(static_cast<size_t>(n * h));
  }
  SpanResult At(int64_t i) {
    return {f.data() + i * h, l.data() + i * h, f.data() + count * h + i * h * r};
  }
};

int64_t SpanCount(int64_t ctx) { return (ctx + g_span - 1) / g_span; }

// One query's heads [h0, h1), its spans one after another in this task.
void AttendQueryHeads(const MlaParams& p, const Query& q, int64_t h0, int64_t h1) {
  thread_local SpanResults res;
  const int64_t r = p.latent_rank;
  res.Resize(p.num_heads, r, 2);
  const SpanResult state = res.At(0), next = res.At(1);
  const SpanResult from{state.m + h0, state.l + h0, state.acc + h0 * r};  // heads h0.. of state
  const SpanResult add{next.m + h0, next.l + h0, next.acc + h0 * r};
  for (int64_t k = 0, a = 0; a < q.ctx; ++k, a += g_span) {
    AttendSpan(p, q, a, std::min(q.ctx, a + g_span), k == 0 ? state : next, h0, h1);
    if (k > 0) FoldSpan(h1 - h0, r, from, add);
  }
  FinishQuery(h1 - h0, r, from, q.olat + h0 * r);
}

// One query, its spans one after another in this task.
void AttendQuery(const MlaParams& p, const Query& q) { AttendQueryHeads(p, q, 0, p.num_heads); }

// Head groups for calls whose spans are few (the result cut so that every core has two tasks).
int64_t HeadGroups(int64_t h, int64_t spans) {
  const int64_t want = (2 * ThePool().size() + spans - 1) / spans;
  return g_head_groups > 0 ? std::min(g_head_groups, h)
                           : std::max<int64_t>(1, std::min(want, h / 4));
}

// Heads per task of AttendInOnePass: two tasks per core, at least 2 heads each. (HeadGroups' 4
// heads left `small`'s 8 heads as one task per core on 2 cores: whichever core the other one's
// vCPU lag left alone ran both, up to half the pass; its groups read the cache from L2 here.) It
// runs ceil(h / that) tasks: fewer than asked for when the heads do not divide evenly (9 heads
// asked in 4 groups: 3 of 3).
int64_t OnePassHeads(int64_t h) {
  const int64_t asked = g_head_groups > 0
                            ? std::min(g_head_groups, h)
                            : std::max<int64_t>(1, std::min<int64_t>(2 * ThePool().size(), h / 2));
  return std::max<int64_t>(1, (h + asked - 1) / asked);
}

// Few queries of one span each (a batch-1 decode step at a short context): one pass over the pool,
// a task per head group doing its heads' absorbed queries, attention and output projection for
// every query — the per-head operations of AbsorbQueries, AttendSpansInParallel and
// ProjectOutputs, so the same bits, from one hand-off to the pool instead of three. Taken when the
// head groups alone give every core a task (MlaInvariant).
void AttendInOnePass(const MlaParams& p, const float* q, int64_t nq, float* qc,
                     const std::vector<Query>& qs, float* olat, float* o) {
  const int64_t h = p.num_heads;
  const int64_t hg = OnePassHeads(h);  // each task covers every query
  ThePool().RunEach(static_cast<int>((h + hg - 1) / hg), [&](int g) {
    const int64_t h0 = g * hg, h1 = std::min(h, h0 + hg);
    for (int64_t head = h0; head < h1; ++head) AbsorbHead(p, q, nq, head, qc);
    for (const Query& query : qs) AttendQueryHeads(p, query, h0, h1);
    for (int64_t head = h0; head < h1; ++head) ProjectHead(p, olat, nq, head, o);
  });
}

// Few queries: their spans in waves over the pool (a wave's results held, then folded in order).
void AttendSpansInParallel(const MlaParams& p, const std::vector<Query>& qs) {
  const int64_t h = p.num_heads, r = p.latent_rank, nq = static_cast<int64_t>(qs.size());
  int64_t most = 0;
  for (const Query& q : qs) most = std::max(most, SpanCount(q.ctx));
  // At most g_wave_bytes of span results in flight (and at most the pool's 65535 tasks), at
  // least one span per query.
  const int64_t per = h * (r + 3) * 4;
  const int64_t wave =
      std::max<int64_t>(1, std::min({most, g_wave_bytes / (per * nq), int64_t{0xffff} / nq}));
  // Heads in groups (of at least 4) when the spans alone give fewer than two tasks per core (a
  // batch-1 decode at a short context: V2's 128 heads over every core).
  int64_t spans = 0;
  for (const Query& q : qs) spans += std::min(wave, SpanCount(q.ctx));
  const int64_t groups =
      std::min(HeadGroups(h, spans), std::max<int64_t>(1, int64_t{0xffff} / (nq * wave)));
  const int64_t hg = (h + groups - 1) / groups;
  thread_local SpanResults held, state;
  held.Resize(h, r, nq * wave);
  state.Resize(h, r, nq);
  struct Task {
    int64_t query, span, h0;
  };
  thread_local std::vector<Task> kept_tasks;  // (its capacity kept from call to call)
  std::vector<Task>& tasks = kept_tasks;      // (a thread_local named in the lambda: the worker's)
  for (int64_t k0 = 0; k0 < most; k0 += wave) {
    tasks.clear();
    for (int64_t i = 0; i < nq; ++i) {
      for (int64_t k = k0; k < std::min(k0 + wave, SpanCount(qs[i].ctx)); ++k) {
        for (int64_t h0 = 0; h0 < h; h0 += hg) tasks.push_back({i, k, h0});
      }
    }
    SpanResults& hv = held;  // (a thread_local named inside the lambda would be the worker's)
    ThePool().RunEach(static_cast<int>(tasks.size()), [&](int t) {
      const Task& task = tasks[static_cast<size_t>(t)];
      const Query& q = qs[static_cast<size_t>(task.query)];
      const int64_t a = task.span * g_span;
      AttendSpan(p, q, a, std::min(q.ctx, a + g_span), hv.At(task.query * wave + task.span - k0),
                 task.h0, std::min(h, task.h0 + hg));
    });
    for (const Task& task : tasks) {
      if (task.h0 != 0) continue;  // one fold per (query, span), every head at once
      const int64_t i = task.query, k = task.span;
      const SpanResult got = held.At(i * wave + k - k0), s = state.At(i);
      if (k == 0) {
        std::copy(got.m, got.m + h, s.m);
        std::copy(got.l, got.l + h, s.l);
        std::copy(got.acc, got.acc + h * r, s.acc);
      } else {
        FoldSpan(h, r, s, got);
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i) FinishQuery(h, r, state.At(i), qs[static_cast<size_t>(i)].olat);
}

void AttendAll(const MlaParams& p, const std::vector<Query>& qs) {
  const int64_t nq = static_cast<int64_t>(qs.size());
  if (nq == 0) return;  // (every query had ctx <= 0: its output is zeros)
  const bool per_query = g_attend_mode == 1 ||
                         (g_attend_mode == 0 && nq >= 2 * static_cast<int64_t>(ThePool().size()));
  if (per_query) {
    ThePool().RunEach(static_cast<int>(nq),
                      [&](int i) { AttendQuery(p, qs[static_cast<size_t>(i)]); });
  } else {
    AttendSpansInParallel(p, qs);
  }
}

void MlaInvariant(const MlaParams& p, const float* q, int64_t nseq, const int64_t* t,
                  const LatentRows* caches, const int64_t* pos0, float* o,
                  std::vector<float>* scratch) {
  const int64_t h = p.num_heads, r = p.latent_rank, lc = r + p.rope_dim;
  int64_t nq = 0;
  for (int64_t i = 0; i < nseq; ++i) nq += t[i];
  if (nq <= 0) return;
  scratch->resize(static_cast<size_t>(nq * h * lc + nq * h * r));
  float* qc = scratch->data();
  float* olat = qc + nq * h * lc;
  thread_local std::vector<Query> qs;
  qs.clear();
  for (int64_t i = 0, row = 0; i < nseq; ++i) {
    for (int64_t j = 0; j < t[i]; ++j, ++row) {
      const int64_t ctx = pos0[i] + j + 1;
      if (ctx <= 0) {  // no rows to attend to (not a valid call): zeros, never stale results
        std::fill(olat + row * h * r, olat + (row + 1) * h * r, 0.0f);
        continue;
      }
      qs.push_back({qc + row * h * lc, caches + i, ctx, olat + row * h * r});
    }
  }
  const int64_t cores = ThePool().size();
  const int64_t per_task = OnePassHeads(h);
  bool one_span = nq < 2 * cores && (h + per_task - 1) / per_task >= cores;
  for (const Query& query : qs) one_span = one_span && SpanCount(query.ctx) == 1;
  if (g_attend_mode == 3 || (g_attend_mode == 0 && one_span)) {
    AttendInOnePass(p, q, nq, qc, qs, olat, o);
    return;
  }
  AbsorbQueries(p, q, nq, qc);
  AttendAll(p, qs);
  ProjectOutputs(p, olat, nq, o);
}
}  // namespace

void SetMlaSpanForTesting(int64_t rows) { g_span = rows > 0 ? rows : 256; }
void SetMlaPullForTesting(bool on) { g_pull_kv_b = on; }
void SetMlaAttendModeForTesting(int mode) { g_attend_mode = mode; }
void SetMlaHeadGroupsForTesting(int64_t groups) { g_head_groups = groups; }
void SetMlaWaveBytesForTesting(int64_t bytes) {
  g_wave_bytes = bytes > 0 ? bytes : int64_t{64} << 20;
}

const char* KvDTypeName(KvDType t) {
  switch (t) {
    case KvDType::kF32:
      return "f32";
    case KvDType::kInt8:
      return "int8";
    case KvDType::kFp8:
      return "fp8_e4m3";
    case KvDType::kBf16:
      return "bf16";
  }
  return "?";
}

int64_t KvRowBytes(KvDType t, int64_t r, int64_t dr) {
  if (t == KvDType::kF32) return 4 * (r + dr);
  if (t == KvDType::kBf16) return 2 * (r + dr);
  return r + 4 * ((r + 127) / 128) + 2 * dr;
}

void QuantizeKvRow(KvDType t, const float* row, int64_t r, int64_t dr, uint8_t* dst) {
  if (t == KvDType::kF32) {
    std::memcpy(dst, row, sizeof(float) * static_cast<size_t>(r + dr));
    return;
  }
  if (t == KvDType::kBf16) {
    uint16_t* h = reinterpret_cast<uint16_t*>(dst);  // KvRowBytes keeps rows 2-byte aligned
    FloatToBf16N(row, static_cast<size_t>(r + dr), h);
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
  if (t == KvDType::kBf16) {  // exact: the same floats at every ISA level
    Bf16ToFloatN(reinterpret_cast<const uint16_t*>(src), static_cast<size_t>(n * lc), dst);
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
  std::vector<float> wide;  // (bf16 kv_b: widened once per call, freed with it)
  const float* kv_b = KvBRows(p, 0, h * kvd, &wide);
  float* kv = scratch->data();    // [ctx, H * (dn + dv)]
  float* s = kv + ctx * h * kvd;  // [t, ctx]
  ForEachBlock(cache, ctx, [&](const float* rows, int64_t first, int64_t n) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, I(n), I(h * kvd), I(r), 1.0f, rows,
                I(ld_cache), kv_b, I(r), 0.0f, kv + first * h * kvd, I(h * kvd));
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
  thread_local std::vector<float> wide;  // one head's W_UK or W_UV at a time (bf16 kv_b)
  float* qc = scratch->data();           // [t * H, r + dr]: q_lat then q_pe, rows ordered (t, h)
  float* s = qc + t * h * lc;            // [t * H, ctx]
  float* olat = s + t * h * ctx;         // [t * H, r]
  for (int64_t head = 0; head < h; ++head) {
    // q_lat[t, h] = q_nope[t, h] @ W_UK[h]  ([dn] x [dn, r]).
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(t), I(r), I(dn), 1.0f, q + head * qd,
                I(h * qd), KvBRows(p, head * kvd, dn, &wide), I(r), 0.0f, qc + head * lc,
                I(h * lc));
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
                I(h * r), KvBRows(p, head * kvd + dn, dv, &wide), I(r), 0.0f, o + head * dv,
                I(h * dv));
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
  thread_local std::vector<float> wide;  // one head's W_UK or W_UV at a time (bf16 kv_b)
  float* qc = scratch->data();           // [b * H, r + dr], rows ordered (sequence, head)
  float* s = qc + b * h * lc;            // [H, max_ctx], one sequence at a time
  float* olat = s + h * max_ctx;         // [b * H, r]
  for (int64_t head = 0; head < h; ++head) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, I(b), I(r), I(dn), 1.0f, q + head * qd,
                I(h * qd), KvBRows(p, head * kvd, dn, &wide), I(r), 0.0f, qc + head * lc,
                I(h * lc));
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
                I(h * r), KvBRows(p, head * kvd + dn, dv, &wide), I(r), 0.0f, o + head * dv,
                I(h * dv));
  }
}

}  // namespace dmoe::cpu
