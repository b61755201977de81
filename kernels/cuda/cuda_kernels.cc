#include "kernels/cuda/cuda_kernels.h"

#include <utility>

#include "absl/strings/str_cat.h"

#if DMOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/launch.h"
#endif

namespace dmoe::cuda {

#if DMOE_HAVE_CUDA

namespace {

absl::Status CudaError(int err, const char* what, const char* file, int line) {
  if (err == 0) return absl::OkStatus();
  const auto e = static_cast<cudaError_t>(err);
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", what, ": ", cudaGetErrorName(e),
                                          " (", cudaGetErrorString(e), ")"));
}

// launch.h's kv_dtype codes.
int LaunchKvDType(cpu::KvDType t) {
  switch (t) {
    case cpu::KvDType::kF32:
      return 0;
    case cpu::KvDType::kInt8:
      return 1;
    case cpu::KvDType::kFp8:
      return 2;
    case cpu::KvDType::kBf16:
      return 3;
  }
  return -1;  // refused by the launchers
}

}  // namespace

#define DMOE_CUDA_CHECK(expr) CudaError(static_cast<int>(expr), #expr, __FILE__, __LINE__)
#define DMOE_CUDA_RETURN_IF_ERROR(expr)                                  \
  do {                                                                   \
    if (absl::Status _st = DMOE_CUDA_CHECK(expr); !_st.ok()) return _st; \
  } while (0)

DeviceProbe Probe() {
  DeviceProbe p;
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    p.reason = absl::StrCat("no CUDA device: cudaGetDeviceCount: ", cudaGetErrorName(e), " (",
                            cudaGetErrorString(e), ")");
    return p;
  }
  if (n == 0) {
    p.reason = "no CUDA device: cudaGetDeviceCount found none";
    return p;
  }
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
    p.name = absl::StrCat(prop.name, " (sm_", prop.major, prop.minor, ", ",
                          prop.totalGlobalMem >> 20, " MiB)");
  }
  p.count = n;
  return p;
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Alloc(size_t bytes) {
  DeviceBuffer b;
  if (bytes > 0) DMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&b.p_, bytes));
  b.bytes_ = bytes;
  return b;
}

DeviceBuffer::~DeviceBuffer() {
  if (p_ != nullptr) cudaFree(p_);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (p_ != nullptr) cudaFree(p_);
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

absl::Status DeviceBuffer::Upload(const void* src, size_t bytes) {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("Upload: ", bytes, " bytes into ", bytes_));
  }
  return DMOE_CUDA_CHECK(cudaMemcpy(p_, src, bytes, cudaMemcpyHostToDevice));
}

absl::Status DeviceBuffer::Download(void* dst, size_t bytes) const {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("Download: ", bytes, " bytes from ", bytes_));
  }
  return DMOE_CUDA_CHECK(cudaMemcpy(dst, p_, bytes, cudaMemcpyDeviceToHost));
}

absl::StatusOr<PinnedBuffer> PinnedBuffer::Alloc(size_t bytes) {
  PinnedBuffer b;
  if (bytes > 0) DMOE_CUDA_RETURN_IF_ERROR(cudaMallocHost(&b.p_, bytes));
  b.bytes_ = bytes;
  return b;
}

PinnedBuffer::~PinnedBuffer() {
  if (p_ != nullptr) cudaFreeHost(p_);
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  if (this != &o) {
    if (p_ != nullptr) cudaFreeHost(p_);
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

absl::Status SetDevice(int device) { return DMOE_CUDA_CHECK(cudaSetDevice(device)); }

absl::Status CopyToDevice(void* device_dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  return DMOE_CUDA_CHECK(cudaMemcpy(device_dst, src, bytes, cudaMemcpyHostToDevice));
}

absl::Status CopyToHost(void* dst, const void* device_src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  return DMOE_CUDA_CHECK(cudaMemcpy(dst, device_src, bytes, cudaMemcpyDeviceToHost));
}

absl::Status Synchronize(void* stream) {
  return DMOE_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}

absl::Status RmsNorm(const float* x, int64_t rows, int64_t n, const float* w, double eps, float* y,
                     void* stream) {
  return DMOE_CUDA_CHECK(launch::RmsNorm(x, rows, n, n, w, eps, y, n, stream));
}

absl::Status RmsNorm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* w,
                     double eps, float* y, int64_t ldy, void* stream) {
  return DMOE_CUDA_CHECK(launch::RmsNorm(x, rows, n, ldx, w, eps, y, ldy, stream));
}

absl::Status Add(const float* a, int64_t n, float* y, void* stream) {
  return DMOE_CUDA_CHECK(launch::Add(a, n, y, stream));
}

absl::Status ToBf16(const float* x, int64_t n, uint16_t* y, void* stream) {
  return DMOE_CUDA_CHECK(launch::ToBf16(x, n, y, stream));
}

absl::Status SiluMul(const float* g, const float* u, int64_t n, float* h, void* stream) {
  return DMOE_CUDA_CHECK(launch::SiluMul(g, u, n, h, stream));
}

absl::Status Embedding(const void* table, bool bf16, int64_t dim, const int32_t* ids, int64_t n,
                       float* out, void* stream) {
  return DMOE_CUDA_CHECK(launch::Embedding(table, bf16, dim, ids, n, out, stream));
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

absl::Status RopeTable::Apply(const float* x, const int32_t* pos, int64_t rows, int64_t heads,
                              int64_t row_stride, int64_t head_stride, float* out,
                              void* stream) const {
  return DMOE_CUDA_CHECK(launch::Rope(cos_.as<float>(), sin_.as<float>(), dim_, pos, x, rows, heads,
                                      row_stride, head_stride, out, stream));
}

absl::Status SelectExperts(const cpu::GateParams& p, float* logits, int64_t t, const float* bias,
                           int32_t* ids, float* w, float* scratch, void* stream) {
  launch::Gate g;
  g.n_experts = p.n_experts;
  g.top_k = p.top_k;
  g.method = p.method == cpu::GateMethod::kGreedy               ? 0
             : p.method == cpu::GateMethod::kGroupLimitedGreedy ? 1
                                                                : 2;
  g.scoring = p.scoring == cpu::GateScoring::kSigmoid ? 1 : 0;
  g.n_group = p.n_group;
  g.topk_group = p.topk_group;
  g.norm_topk_prob = p.norm_topk_prob;
  g.routed_scaling_factor = p.routed_scaling_factor;
  g.scale_after_norm = p.scale_after_norm;
  return DMOE_CUDA_CHECK(launch::SelectExperts(g, logits, t, bias, ids, w, scratch, stream));
}

int64_t MlaDecodeScratchFloats(const cpu::MlaParams& p, int64_t b, int64_t max_ctx) {
  return launch::MlaScratchFloats(b, p.num_heads, p.latent_rank, max_ctx);
}

absl::Status MlaDecodeAbsorbed(const cpu::MlaParams& p, const float* q, int64_t b,
                               const PagedLatentCache& cache, float* o, float* scratch,
                               void* stream) {
  launch::Mla m;
  m.heads = p.num_heads;
  m.nope = p.nope_dim;
  m.rope = p.rope_dim;
  m.v = p.v_dim;
  m.rank = p.latent_rank;
  m.softmax_scale = p.softmax_scale;
  m.block_tokens = cache.block_tokens;
  m.block_bytes = cache.block_bytes;
  m.row_bytes = cpu::KvRowBytes(cache.dtype, p.latent_rank, p.rope_dim);
  m.table_stride = cache.table_stride;
  m.kv_dtype = LaunchKvDType(cache.dtype);
  return DMOE_CUDA_CHECK(launch::MlaDecode(m, q, b, p.kv_b, static_cast<const uint8_t*>(cache.pool),
                                           cache.table, cache.ctx, cache.max_ctx, o, scratch,
                                           stream));
}

namespace {
launch::LatentPool PoolParams(const cpu::MlaParams& p, const LatentPool& pool) {
  launch::LatentPool l;
  l.rank = p.latent_rank;
  l.rope = p.rope_dim;
  l.block_tokens = pool.block_tokens;
  l.block_bytes = pool.block_bytes;
  l.kv_dtype = LaunchKvDType(pool.dtype);
  return l;
}
}  // namespace

absl::Status StoreLatentRows(const cpu::MlaParams& p, const LatentPool& pool, const float* rows,
                             int64_t n, const int32_t* slots, void* stream) {
  return DMOE_CUDA_CHECK(launch::StoreLatent(PoolParams(p, pool), rows, n, slots,
                                             static_cast<uint8_t*>(pool.pool), stream));
}

absl::Status GatherLatentRows(const cpu::MlaParams& p, const LatentPool& pool, const int32_t* table,
                              int64_t ctx, float* out, void* stream) {
  return DMOE_CUDA_CHECK(launch::GatherLatent(
      PoolParams(p, pool), static_cast<const uint8_t*>(pool.pool), table, ctx, out, stream));
}

absl::Status CausalSoftmax(float* s, int64_t heads, int64_t m, int64_t ctx, int64_t pos0,
                           float scale, void* stream) {
  return DMOE_CUDA_CHECK(launch::CausalSoftmax(s, heads, m, ctx, pos0, scale, stream));
}

#else  // !DMOE_HAVE_CUDA: built without the CUDA toolkit.

namespace {
absl::Status NoToolkit() { return absl::UnavailableError("built without the CUDA toolkit"); }
}  // namespace

DeviceProbe Probe() {
  DeviceProbe p;
  p.reason = "no CUDA device: built without the CUDA toolkit (bazel/cuda_configure.bzl)";
  return p;
}
absl::StatusOr<DeviceBuffer> DeviceBuffer::Alloc(size_t) { return NoToolkit(); }
DeviceBuffer::~DeviceBuffer() = default;
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  p_ = std::exchange(o.p_, nullptr);
  bytes_ = std::exchange(o.bytes_, 0);
  return *this;
}
absl::Status DeviceBuffer::Upload(const void*, size_t) { return NoToolkit(); }
absl::Status DeviceBuffer::Download(void*, size_t) const { return NoToolkit(); }
absl::Status Synchronize(void*) { return NoToolkit(); }
absl::StatusOr<PinnedBuffer> PinnedBuffer::Alloc(size_t) { return NoToolkit(); }
PinnedBuffer::~PinnedBuffer() = default;
PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  p_ = std::exchange(o.p_, nullptr);
  bytes_ = std::exchange(o.bytes_, 0);
  return *this;
}
absl::Status SetDevice(int) { return NoToolkit(); }
absl::Status CopyToDevice(void*, const void*, size_t) { return NoToolkit(); }
absl::Status CopyToHost(void*, const void*, size_t) { return NoToolkit(); }
absl::Status RmsNorm(const float*, int64_t, int64_t, const float*, double, float*, void*) {
  return NoToolkit();
}
absl::Status RmsNorm(const float*, int64_t, int64_t, int64_t, const float*, double, float*, int64_t,
                     void*) {
  return NoToolkit();
}
absl::Status Add(const float*, int64_t, float*, void*) { return NoToolkit(); }
absl::Status ToBf16(const float*, int64_t, uint16_t*, void*) { return NoToolkit(); }
absl::Status StoreLatentRows(const cpu::MlaParams&, const LatentPool&, const float*, int64_t,
                             const int32_t*, void*) {
  return NoToolkit();
}
absl::Status GatherLatentRows(const cpu::MlaParams&, const LatentPool&, const int32_t*, int64_t,
                              float*, void*) {
  return NoToolkit();
}
absl::Status CausalSoftmax(float*, int64_t, int64_t, int64_t, int64_t, float, void*) {
  return NoToolkit();
}
absl::Status SiluMul(const float*, const float*, int64_t, float*, void*) { return NoToolkit(); }
absl::Status Embedding(const void*, bool, int64_t, const int32_t*, int64_t, float*, void*) {
  return NoToolkit();
}
absl::StatusOr<RopeTable> RopeTable::Upload(const cpu::RopeTable&) { return NoToolkit(); }
absl::Status RopeTable::Apply(const float*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                              float*, void*) const {
  return NoToolkit();
}
absl::Status SelectExperts(const cpu::GateParams&, float*, int64_t, const float*, int32_t*, float*,
                           float*, void*) {
  return NoToolkit();
}
int64_t MlaDecodeScratchFloats(const cpu::MlaParams&, int64_t, int64_t) { return 0; }
absl::Status MlaDecodeAbsorbed(const cpu::MlaParams&, const float*, int64_t,
                               const PagedLatentCache&, float*, float*, void*) {
  return NoToolkit();
}

#endif  // DMOE_HAVE_CUDA

}  // namespace dmoe::cuda
