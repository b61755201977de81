// GPU kernels behind the same plain parameters as kernels/cpu (cpu::GateParams, cpu::RopeTable),
// with absl::Status errors that name the CUDA call, its file and line (never exit). Pointers are
// device pointers; `stream` is a cudaStream_t (null: the default stream). This header needs no
// CUDA headers: without the CUDA toolkit at build time everything returns UNAVAILABLE ("built
// without the CUDA toolkit"), and without a GPU at run time Probe() says why.
#ifndef DMOE_KERNELS_CUDA_CUDA_KERNELS_H_
#define DMOE_KERNELS_CUDA_CUDA_KERNELS_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cpu/gating.h"
#include "kernels/cpu/mla.h"
#include "kernels/cpu/rope.h"

namespace dmoe::cuda {

// What CUDA devices this process can use.
struct DeviceProbe {
  int count = 0;       // usable devices
  std::string name;    // device 0's name and compute capability, when count > 0
  std::string reason;  // why count is 0 (no toolkit at build time, no driver, no device)
};
DeviceProbe Probe();

// Device memory (cudaMalloc), freed on destruction. Movable, not copyable.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static absl::StatusOr<DeviceBuffer> Alloc(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) {
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return p_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }
  // At least `bytes` (grown by half again at least; the contents are not kept).
  absl::Status Reserve(size_t bytes) {
    if (bytes_ >= bytes) return absl::OkStatus();
    auto b = Alloc(bytes > bytes_ * 3 / 2 ? bytes : bytes_ * 3 / 2);
    if (!b.ok()) return b.status();
    *this = std::move(*b);
    return absl::OkStatus();
  }
  // Synchronous copies of [0, bytes) from / to host memory (bytes <= this->bytes()).
  absl::Status Upload(const void* src, size_t bytes);
  absl::Status Download(void* dst, size_t bytes) const;

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory (cudaMallocHost): copies between it and the device run at full PCIe
// speed without a staging copy. Freed on destruction; movable, not copyable.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  static absl::StatusOr<PinnedBuffer> Alloc(size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(PinnedBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) {
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }
  // At least `bytes` (grown by half again at least; the contents are not kept).
  absl::Status Reserve(size_t bytes) {
    if (bytes_ >= bytes) return absl::OkStatus();
    auto b = Alloc(bytes > bytes_ * 3 / 2 ? bytes : bytes_ * 3 / 2);
    if (!b.ok()) return b.status();
    *this = std::move(*b);
    return absl::OkStatus();
  }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Makes `device` (< Probe().count) the calling thread's current device.
absl::Status SetDevice(int device);
// Synchronous copies between host memory and device memory at any device address.
absl::Status CopyToDevice(void* device_dst, const void* src, size_t bytes);
absl::Status CopyToHost(void* dst, const void* device_src, size_t bytes);

// Waits for the stream's work; a kernel's asynchronous error surfaces here.
absl::Status Synchronize(void* stream = nullptr);

// cpu::RmsNorm (rows of n, contiguous).
absl::Status RmsNorm(const float* x, int64_t rows, int64_t n, const float* w, double eps, float* y,
                     void* stream = nullptr);
// The same with row strides: row r at x + r * ldx and y + r * ldy (x == y allowed).
absl::Status RmsNorm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* w,
                     double eps, float* y, int64_t ldy, void* stream = nullptr);
// y[i] = x[i] rounded to bf16 (round to nearest even; the bits), i < n.
absl::Status ToBf16(const float* x, int64_t n, uint16_t* y, void* stream = nullptr);
// y[i] += a[i], i < n.
absl::Status Add(const float* a, int64_t n, float* y, void* stream = nullptr);
// cpu::SiluMul.
absl::Status SiluMul(const float* g, const float* u, int64_t n, float* h, void* stream = nullptr);
// out[i] = table[ids[i]] (rows of dim; the table fp32, or bf16 bits when `bf16`).
absl::Status Embedding(const void* table, bool bf16, int64_t dim, const int32_t* ids, int64_t n,
                       float* out, void* stream = nullptr);

// cpu::RopeTable on the device.
class RopeTable {
 public:
  static absl::StatusOr<RopeTable> Upload(const cpu::RopeTable& host);
  // For rows r < rows and heads h < heads: the dim values at x + r * row_stride + h * head_stride
  // rotated by position pos[r] (device int32) into the same place of `out` (x == out allowed),
  // as cpu::RopeTable::Apply.
  absl::Status Apply(const float* x, const int32_t* pos, int64_t rows, int64_t heads,
                     int64_t row_stride, int64_t head_stride, float* out,
                     void* stream = nullptr) const;

 private:
  int64_t dim_ = 0;
  DeviceBuffer cos_, sin_;
};

// cpu::SelectExperts: logits [t, E] become the scores; ids, w [t, k]; `bias` [E] for noaux_tc;
// `scratch` [t, E] floats.
absl::Status SelectExperts(const cpu::GateParams& p, float* logits, int64_t t, const float* bias,
                           int32_t* ids, float* w, float* scratch, void* stream = nullptr);

// One layer of a paged latent cache on the device: block k of the pool at
// pool + k * block_bytes, rows of cpu::KvRowBytes(dtype, r, dr) bytes stored as
// cpu::QuantizeKvRow stores them (fp32, or the 8-bit layout); sequence i's blocks are
// table[i * table_stride + j] (any order: non-contiguous block tables), its length ctx[i].
struct PagedLatentCache {
  const void* pool = nullptr;
  cpu::KvDType dtype = cpu::KvDType::kF32;
  int64_t block_tokens = 0;
  int64_t block_bytes = 0;
  const int32_t* table = nullptr;  // device
  int64_t table_stride = 0;
  const int32_t* ctx = nullptr;  // device, [b]
  int64_t max_ctx = 0;           // >= every ctx[i]
};
// Floats of scratch MlaDecodeAbsorbed needs.
int64_t MlaDecodeScratchFloats(const cpu::MlaParams& p, int64_t b, int64_t max_ctx);
// cpu::MlaDecodeAbsorbedBatch: q [b, H, dn + dr], o [b, H * dv]; p.kv_b must point to device
// memory.
absl::Status MlaDecodeAbsorbed(const cpu::MlaParams& p, const float* q, int64_t b,
                               const PagedLatentCache& cache, float* o, float* scratch,
                               void* stream = nullptr);

// One layer of a paged latent cache, writable: row u of block k at pool + k * block_bytes
// + u * cpu::KvRowBytes(dtype, r, dr) (pool already offset to the layer's rows).
struct LatentPool {
  void* pool = nullptr;
  cpu::KvDType dtype = cpu::KvDType::kF32;
  int64_t block_tokens = 0;
  int64_t block_bytes = 0;
};
// Stores rows [n, r + dr] (c_kv after its norm, then the rotated k_pe) at slots[i] (device,
// block * block_tokens + offset), quantized as cpu::QuantizeKvRow does. r = p.latent_rank,
// dr = p.rope_dim.
absl::Status StoreLatentRows(const cpu::MlaParams& p, const LatentPool& pool, const float* rows,
                             int64_t n, const int32_t* slots, void* stream = nullptr);
// The first ctx rows of one sequence (its block table `table`, device) as fp32 rows
// out [ctx, r + dr] (cpu::DequantizeKvRows).
absl::Status GatherLatentRows(const cpu::MlaParams& p, const LatentPool& pool, const int32_t* table,
                              int64_t ctx, float* out, void* stream = nullptr);
// Scores s [heads * m, ctx]: row i of each head's m rows is the query at position pos0 + i.
// Entries u > pos0 + i become 0; the rest softmax(scale * s) (the naive MLA's mask and softmax).
absl::Status CausalSoftmax(float* s, int64_t heads, int64_t m, int64_t ctx, int64_t pos0,
                           float scale, void* stream = nullptr);

}  // namespace dmoe::cuda

#endif  // DMOE_KERNELS_CUDA_CUDA_KERNELS_H_
