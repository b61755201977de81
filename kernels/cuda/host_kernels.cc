// kernels/cuda's API (cuda_kernels.h, and blas.cc's part of expert_ffn.h) run on the host: "device"
// memory is host memory and each kernel is its kernels/cpu counterpart (or cblas). Linked instead
// of the CUDA implementation (//kernels/cuda:host), it lets what is built on these kernels (the GPU
// engine) run its own logic — buffers, paged block tables, the layer loop — on machines without a
// GPU. The GPU kernels themselves are compared with the CPU ones by cuda_kernels_test on a GPU.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "kernels/cpu/gating.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/expert_ffn.h"

namespace dmoe::cuda {

DeviceProbe Probe() {
  DeviceProbe p;
  p.count = 1;
  p.name = "host emulation (//kernels/cuda:host: no GPU, the CPU kernels)";
  return p;
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Alloc(size_t bytes) {
  DeviceBuffer b;
  if (bytes > 0) {
    b.p_ = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (b.p_ == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("host emulation: ", bytes, " bytes"));
    }
    // Like fresh device memory, the contents are undefined; a fixed pattern (NaN floats) makes a
    // read before any write show in the results.
    std::memset(b.p_, 0xff, bytes);
  }
  b.bytes_ = bytes;
  return b;
}

DeviceBuffer::~DeviceBuffer() { std::free(p_); }

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    std::free(p_);
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

absl::Status DeviceBuffer::Upload(const void* src, size_t bytes) {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("Upload: ", bytes, " bytes into ", bytes_));
  }
  if (bytes > 0) std::memcpy(p_, src, bytes);
  return absl::OkStatus();
}

absl::Status DeviceBuffer::Download(void* dst, size_t bytes) const {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("Download: ", bytes, " bytes from ", bytes_));
  }
  if (bytes > 0) std::memcpy(dst, p_, bytes);
  return absl::OkStatus();
}

absl::Status Synchronize(void*) { return absl::OkStatus(); }

absl::StatusOr<PinnedBuffer> PinnedBuffer::Alloc(size_t bytes) {
  PinnedBuffer b;
  if (bytes > 0) {
    b.p_ = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (b.p_ == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("host emulation: ", bytes, " bytes"));
    }
  }
  b.bytes_ = bytes;
  return b;
}
PinnedBuffer::~PinnedBuffer() { std::free(p_); }
PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  if (this != &o) {
    std::free(p_);
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

absl::Status SetDevice(int device) {
  if (device != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("device ", device, ": the host emulation has one device, 0"));
  }
  return absl::OkStatus();
}

absl::Status CopyToDevice(void* device_dst, const void* src, size_t bytes) {
  if (bytes > 0) std::memcpy(device_dst, src, bytes);
  return absl::OkStatus();
}

absl::Status CopyToHost(void* dst, const void* device_src, size_t bytes) {
  if (bytes > 0) std::memcpy(dst, device_src, bytes);
  return absl::OkStatus();
}

absl::Status RmsNorm(const float* x, int64_t rows, int64_t n, const float* w, double eps, float* y,
                     void*) {
  cpu::RmsNorm(x, rows, n, w, eps, y);
  return absl::OkStatus();
}

absl::Status RmsNorm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* w,
                     double eps, float* y, int64_t ldy, void*) {
  cpu::RmsNorm(x, rows, n, w, eps, y, ldx, ldy);
  return absl::OkStatus();
}

absl::Status ToBf16(const float* x, int64_t n, uint16_t* y, void*) {
  for (int64_t i = 0; i < n; ++i) y[i] = FloatToBf16(x[i]);
  return absl::OkStatus();
}

absl::Status Add(const float* a, int64_t n, float* y, void*) {
  for (int64_t i = 0; i < n; ++i) y[i] += a[i];
  return absl::OkStatus();
}

absl::Status SiluMul(const float* g, const float* u, int64_t n, float* h, void*) {
  cpu::SiluMul(g, u, n, h);
  return absl::OkStatus();
}

absl::Status Embedding(const void* table, bool bf16, int64_t dim, const int32_t* ids, int64_t n,
                       float* out, void*) {
  for (int64_t i = 0; i < n; ++i) {
    float* o = out + i * dim;
    if (bf16) {
      const uint16_t* t = static_cast<const uint16_t*>(table) + ids[i] * dim;
      for (int64_t j = 0; j < dim; ++j) {
        const uint32_t bits = static_cast<uint32_t>(t[j]) << 16;
        std::memcpy(o + j, &bits, 4);
      }
    } else {
      std::memcpy(o, static_cast<const float*>(table) + ids[i] * dim, sizeof(float) * dim);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<RopeTable> RopeTable::Upload(const cpu::RopeTable& host) {
  RopeTable t;
  t.dim_ = host.dim();
  const size_t bytes = host.cos_table().size() * sizeof(float);
  auto c = DeviceBuffer::Alloc(bytes);
  if (!c.ok()) return c.status();
  auto s = DeviceBuffer::Alloc(bytes);
  if (!s.ok()) return s.status();
  t.cos_ = std::move(*c);
  t.sin_ = std::move(*s);
  if (auto st = t.cos_.Upload(host.cos_table().data(), bytes); !st.ok()) return st;
  if (auto st = t.sin_.Upload(host.sin_table().data(), bytes); !st.ok()) return st;
  return t;
}

// cpu::RopeTable::Apply's arithmetic over the uploaded tables.
absl::Status RopeTable::Apply(const float* x, const int32_t* pos, int64_t rows, int64_t heads,
                              int64_t row_stride, int64_t head_stride, float* out, void*) const {
  if (dim_ > 256 || dim_ % 2 != 0) return absl::InvalidArgumentError("Rope: dim > 256 or odd");
  const int64_t half = dim_ / 2;
  std::vector<float> tmp(static_cast<size_t>(dim_));
  for (int64_t r = 0; r < rows; ++r) {
    const float* cs = cos_.as<float>() + pos[r] * half;
    const float* sn = sin_.as<float>() + pos[r] * half;
    for (int64_t h = 0; h < heads; ++h) {
      const float* xv = x + r * row_stride + h * head_stride;
      for (int64_t j = 0; j < half; ++j) {
        const float a = xv[2 * j], b = xv[2 * j + 1];
        tmp[static_cast<size_t>(j)] = a * cs[j] - b * sn[j];
        tmp[static_cast<size_t>(j + half)] = b * cs[j] + a * sn[j];
      }
      std::copy(tmp.begin(), tmp.end(), out + r * row_stride + h * head_stride);
    }
  }
  return absl::OkStatus();
}

absl::Status SelectExperts(const cpu::GateParams& p, float* logits, int64_t t, const float* bias,
                           int32_t* ids, float* w, float*, void*) {
  // The CUDA launcher's limits (basic_kernels.cu), so that both builds refuse the same calls.
  const bool grouped = p.method != cpu::GateMethod::kGreedy;
  if (p.n_experts <= 0 || p.n_experts > 1024 || p.n_group <= 0 || p.n_group > 64 ||
      p.n_experts % p.n_group != 0 || p.top_k < 1 || p.top_k > p.n_experts ||
      (grouped && (p.topk_group < 1 || p.topk_group > p.n_group)) ||
      (p.method == cpu::GateMethod::kNoauxTc && bias == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat(__FILE__, ":", __LINE__, ": SelectExperts: bad gate parameters"));
  }
  cpu::SelectExperts(p, logits, t, ids, w, bias);
  return absl::OkStatus();
}

// The CUDA launcher's size (mla_decode.cu's MlaScratchFloats), so that callers allocate the same.
int64_t MlaDecodeScratchFloats(const cpu::MlaParams& p, int64_t b, int64_t max_ctx) {
  (void)max_ctx;
  constexpr int64_t kMaxSplits = 16;  // mla_decode.cu's: per-split sums, max and total
  return b * p.num_heads * (2 * p.latent_rank + kMaxSplits * (p.latent_rank + 2));
}

absl::Status MlaDecodeAbsorbed(const cpu::MlaParams& p, const float* q, int64_t b,
                               const PagedLatentCache& cache, float* o, float*, void*) {
  // mla_decode.cu's limits, so that both builds refuse the same calls.
  if (p.latent_rank <= 0 || p.latent_rank > 512 || p.latent_rank % 4 != 0 || p.nope_dim < 0 ||
      p.v_dim <= 0 || p.rope_dim < 0 || b > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("MlaDecodeAbsorbed: unsupported shape (r ", p.latent_rank, ", b ", b, ")"));
  }
  const int64_t blocks = (cache.max_ctx + cache.block_tokens - 1) / cache.block_tokens;
  std::vector<const float*> fp(static_cast<size_t>(b * blocks));
  std::vector<const uint8_t*> qp(static_cast<size_t>(b * blocks));
  std::vector<cpu::LatentRows> rows(static_cast<size_t>(b));
  std::vector<int64_t> ctx(static_cast<size_t>(b));
  const auto* pool = static_cast<const uint8_t*>(cache.pool);
  for (int64_t i = 0; i < b; ++i) {
    ctx[static_cast<size_t>(i)] = std::min<int64_t>(cache.ctx[i], cache.max_ctx);
    for (int64_t k = 0; k * cache.block_tokens < ctx[static_cast<size_t>(i)]; ++k) {
      const uint8_t* blk = pool + cache.table[i * cache.table_stride + k] * cache.block_bytes;
      fp[static_cast<size_t>(i * blocks + k)] = reinterpret_cast<const float*>(blk);
      qp[static_cast<size_t>(i * blocks + k)] = blk;
    }
    cpu::LatentRows& lr = rows[static_cast<size_t>(i)];
    lr.block_tokens = cache.block_tokens;
    lr.r = p.latent_rank;
    lr.dr = p.rope_dim;
    lr.dtype = cache.dtype;
    if (cache.dtype == cpu::KvDType::kF32) {
      lr.blocks = fp.data() + i * blocks;
    } else {
      lr.qblocks = qp.data() + i * blocks;
    }
  }
  std::vector<float> scratch;
  cpu::MlaDecodeAbsorbedBatch(p, q, b, rows.data(), ctx.data(), o, &scratch);
  return absl::OkStatus();
}

namespace {
// engine_kernels.cu's checks, so that both builds refuse the same pools.
absl::Status CheckPool(const cpu::MlaParams& p, const LatentPool& pool) {
  const int64_t rb = cpu::KvRowBytes(pool.dtype, p.latent_rank, p.rope_dim);
  if (p.latent_rank <= 0 || p.rope_dim < 0 || pool.block_tokens <= 0 || pool.block_bytes <= 0 ||
      pool.block_bytes % 4 != 0 || rb % 4 != 0 || pool.block_bytes < pool.block_tokens * rb) {
    return absl::InvalidArgumentError(
        absl::StrCat(__FILE__, ":", __LINE__, ": bad latent pool layout"));
  }
  return absl::OkStatus();
}

uint8_t* RowAt(const cpu::MlaParams& p, const LatentPool& pool, int64_t slot) {
  return static_cast<uint8_t*>(pool.pool) + (slot / pool.block_tokens) * pool.block_bytes +
         (slot % pool.block_tokens) * cpu::KvRowBytes(pool.dtype, p.latent_rank, p.rope_dim);
}
}  // namespace

absl::Status StoreLatentRows(const cpu::MlaParams& p, const LatentPool& pool, const float* rows,
                             int64_t n, const int32_t* slots, void*) {
  if (absl::Status st = CheckPool(p, pool); !st.ok()) return st;
  const int64_t lc = p.latent_rank + p.rope_dim;
  for (int64_t i = 0; i < n; ++i) {
    cpu::QuantizeKvRow(pool.dtype, rows + i * lc, p.latent_rank, p.rope_dim,
                       RowAt(p, pool, slots[i]));
  }
  return absl::OkStatus();
}

absl::Status GatherLatentRows(const cpu::MlaParams& p, const LatentPool& pool, const int32_t* table,
                              int64_t ctx, float* out, void*) {
  const int64_t lc = p.latent_rank + p.rope_dim;
  for (int64_t u = 0; u < ctx; ++u) {
    const int64_t slot = static_cast<int64_t>(table[u / pool.block_tokens]) * pool.block_tokens +
                         u % pool.block_tokens;
    cpu::DequantizeKvRows(pool.dtype, RowAt(p, pool, slot), 1, p.latent_rank, p.rope_dim,
                          out + u * lc);
  }
  return absl::OkStatus();
}

absl::Status CausalSoftmax(float* s, int64_t heads, int64_t m, int64_t ctx, int64_t pos0,
                           float scale, void*) {
  if (pos0 < 0) return absl::InvalidArgumentError("CausalSoftmax: pos0 < 0");
  for (int64_t row = 0; row < heads * m; ++row) {
    float* sr = s + row * ctx;
    const int64_t limit = std::min(ctx, pos0 + row % m + 1);
    for (int64_t u = 0; u < ctx; ++u) {
      sr[u] = u < limit ? sr[u] * scale : -std::numeric_limits<float>::infinity();
    }
    cpu::SoftmaxRows(sr, 1, ctx, ctx);
  }
  return absl::OkStatus();
}

// ---- expert_ffn.h ----

namespace {

// launch.h's InvariantGemm: every output one chain of fused multiply-adds per chunk of
// kInvariantGemmChunk k, the chunks added in order, then alpha (and beta) as the kernel applies
// them; the same bits as the GPU's. (Under set_cublas the emulation uses OpenBLAS, whose bits
// change with m, as cuBLAS's do.)
void InvariantProduct(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                      int64_t ldb, bool b_trans, float alpha, float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float total = 0.0f;
      for (int64_t k0 = 0; k0 < k; k0 += kInvariantGemmChunk) {
        float acc = 0.0f;
        for (int64_t u = k0; u < std::min(k, k0 + kInvariantGemmChunk); ++u) {
          acc = std::fma(a[i * lda + u], b_trans ? b[j * ldb + u] : b[u * ldb + j], acc);
        }
        total = k0 == 0 ? acc : total + acc;
      }
      float* out = c + i * ldc + j;
      float v = alpha * total;
      if (beta != 0.0f) v = std::fma(beta, *out, v);
      *out = v;
    }
  }
}

}  // namespace

absl::StatusOr<Blas> Blas::Create(void* stream) {
  static int no_handle;  // any non-null value: there is no cuBLAS handle here
  Blas b;
  b.handle_ = &no_handle;
  b.stream_ = stream;
  return b;
}
Blas::~Blas() = default;
Blas& Blas::operator=(Blas&& o) noexcept {
  handle_ = std::exchange(o.handle_, nullptr);
  stream_ = o.stream_;
  bf16_ = std::move(o.bf16_);
  pointers_ = std::move(o.pointers_);
  split_ = std::move(o.split_);
  cublas_ = o.cublas_;
  return *this;
}

absl::Status RunGemmBf16(const Blas& blas, int64_t m, int64_t n, int64_t k, const uint16_t* a,
                         const uint16_t* b, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return absl::OkStatus();
  auto up = [](const uint16_t* src, int64_t count) {
    std::vector<float> v(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
      std::memcpy(&v[static_cast<size_t>(i)], &bits, 4);
    }
    return v;
  };
  const std::vector<float> af = up(a, m * k), bf = up(b, n * k);
  if (!blas.cublas()) {
    InvariantProduct(m, n, k, af.data(), k, bf.data(), k, true, 1.0f, 0.0f, c, ldc);
    return absl::OkStatus();
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), 1.0f, af.data(), static_cast<int>(k), bf.data(),
              static_cast<int>(k), 0.0f, c, static_cast<int>(ldc));
  return absl::OkStatus();
}

bool GroupedGemmRefused(bool) { return true; }

absl::Status RunGemmGrouped(const Blas& blas, const GroupedGemm& g) {
  const size_t n = g.m.size();
  if (g.a.size() != n || g.b.size() != n || g.c.size() != n) {
    return absl::InvalidArgumentError("RunGemmGrouped: arrays of different lengths");
  }
  if (g.n <= 0 || g.k <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("RunGemmGrouped: n ", g.n, ", k ", g.k));
  }
  for (size_t i = 0; i < n; ++i) {
    if (g.m[i] > 0) RETURN_IF_ERROR(RunGroupMember(blas, g, i));
  }
  return absl::OkStatus();
}

absl::Status RunGemm(const Blas& blas, const Gemm& g) {
  if (g.m <= 0 || g.n <= 0) return absl::OkStatus();
  for (int64_t i = 0; i < g.batch; ++i) {
    if (!blas.cublas()) {
      InvariantProduct(g.m, g.n, g.k, g.a + i * g.stride_a, g.lda, g.b + i * g.stride_b, g.ldb,
                       g.b_trans, g.alpha, g.beta, g.c + i * g.stride_c, g.ldc);
      continue;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, g.b_trans ? CblasTrans : CblasNoTrans,
                static_cast<int>(g.m), static_cast<int>(g.n), static_cast<int>(g.k), g.alpha,
                g.a + i * g.stride_a, static_cast<int>(g.lda), g.b + i * g.stride_b,
                static_cast<int>(g.ldb), g.beta, g.c + i * g.stride_c, static_cast<int>(g.ldc));
  }
  return absl::OkStatus();
}

}  // namespace dmoe::cuda
