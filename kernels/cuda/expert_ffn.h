// The routed experts' SwiGLU FFN on the GPU, as one group of rows per expert through cuBLAS
// (fp32 or bf16 weights): y = down(silu(gate(x)) * up(x)) for the rows routed to each expert,
// unweighted (the combine weighs them, as on the CPU). No CUDA headers here.
#ifndef DMOE_KERNELS_CUDA_EXPERT_FFN_H_
#define DMOE_KERNELS_CUDA_EXPERT_FFN_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_kernels.h"

namespace dmoe::cuda {

// k per chain of the invariant GEMM (launch.h's kInvariantGemmChunk; the host emulation's too).
constexpr int64_t kInvariantGemmChunk = 512;

// A cuBLAS handle bound to a stream, and which GEMM the products below run. Movable, not
// copyable.
//
// By default every product is launch.h's InvariantGemm: each output one fma chain per fixed
// chunk of k (kInvariantGemmChunk values), the chunks added in order, so a row's bits never
// depend on the other rows of its batch or group (standing rule 1; the same bits as the host
// emulation's). set_cublas(true) sends them to cuBLAS instead (faster
// at large m, tensor cores for bf16), whose algorithm, tiles and split of k change with the
// shape: then a request's output depends on its company.
class Blas {
 public:
  static absl::StatusOr<Blas> Create(void* stream = nullptr);
  Blas() = default;
  ~Blas();
  Blas(Blas&& o) noexcept
      : handle_(o.handle_),
        stream_(o.stream_),
        bf16_(std::move(o.bf16_)),
        pointers_(std::move(o.pointers_)),
        split_(std::move(o.split_)),
        cublas_(o.cublas_) {
    o.handle_ = nullptr;
  }
  Blas& operator=(Blas&& o) noexcept;
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  void* handle() const { return handle_; }
  void* stream() const { return stream_; }
  bool cublas() const { return cublas_; }
  void set_cublas(bool on) { cublas_ = on; }
  // Device scratch for `n` bf16 values (the activations of a bf16 product), grown as needed.
  absl::StatusOr<uint16_t*> Bf16Scratch(int64_t n) const;
  // Device scratch for `n` pointers (a grouped product's arrays), grown as needed.
  absl::StatusOr<void**> PointerScratch(int64_t n) const;
  // Device scratch for `n` floats (the per-chunk sums of a product split over k), grown as needed.
  absl::StatusOr<float*> SplitScratch(int64_t n) const;

 private:
  void* handle_ = nullptr;
  void* stream_ = nullptr;
  mutable DeviceBuffer bf16_;
  mutable DeviceBuffer pointers_;
  mutable DeviceBuffer split_;
  bool cublas_ = false;
};

// Row-major c = alpha * a @ op(b) + beta * c for `batch` problems (problem i's matrices at
// a + i * stride_a, ...): a [m, k] (row stride lda); b [n, k] when b_trans, else [k, n] (ldb);
// c [m, n] (ldc). Plain fp32 (no TF32); beta == 0 does not read c.
struct Gemm {
  int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const float* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  bool b_trans = true;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int64_t batch = 1;
  float alpha = 1.0f, beta = 0.0f;
};
absl::Status RunGemm(const Blas& blas, const Gemm& g);
// Row-major c [m, n] (ldc, fp32) = a [m, k] (bf16 bits) @ b[n, k]^T (bf16 bits), the products
// accumulated in fp32 (cublasGemmEx, CUBLAS_COMPUTE_32F, under set_cublas).
absl::Status RunGemmBf16(const Blas& blas, int64_t m, int64_t n, int64_t k, const uint16_t* a,
                         const uint16_t* b, float* c, int64_t ldc);

// Row-major c_g [m_g, n] (fp32) = a_g [m_g, k] @ b_g [n, k]^T for every group g, in one call
// (InvariantGemm's groups; cublasGemmGroupedBatchedEx under set_cublas): all fp32, or all bf16
// bits with fp32 sums; each product's sums as RunGemm's / RunGemmBf16's. Groups with m_g == 0 are
// skipped; under set_cublas a single product runs alone.
struct GroupedGemm {
  int64_t n = 0, k = 0;
  bool bf16 = false;
  std::vector<int64_t> m;
  std::vector<const void*> a, b;
  std::vector<float*> c;
};
absl::Status RunGemmGrouped(const Blas& blas, const GroupedGemm& g);
// Product i of g alone, through RunGemm or RunGemmBf16.
absl::Status RunGroupMember(const Blas& blas, const GroupedGemm& g, size_t i);
// Whether RunGemmGrouped under set_cublas runs one product per group for these inputs: cuBLAS
// lacks the grouped call or refused it for them (always true on the host).
bool GroupedGemmRefused(bool bf16);

// A weight matrix on the device: fp32, or bf16 bits (then the activations are rounded to bf16,
// round to nearest even, and the products accumulate in fp32: about 3 significant digits).
struct DeviceWeight {
  const void* w = nullptr;
  bool bf16 = false;
};
// y[m, out] = x[m, in] @ w[out, in]^T (nn.Linear without bias).
absl::Status Linear(const Blas& blas, const float* x, int64_t m, DeviceWeight w, int64_t out,
                    int64_t in, float* y);
inline absl::Status Linear(const Blas& blas, const float* x, int64_t m, const float* w, int64_t out,
                           int64_t in, float* y) {
  return Linear(blas, x, m, DeviceWeight{w, false}, out, in, y);
}

// One expert's weights on the device, fp32 or bf16, as nn.Linear stores them: gate and up [I, D],
// down [D, I].
struct ExpertWeights {
  const void* gate = nullptr;
  const void* up = nullptr;
  const void* down = nullptr;
  bool bf16 = false;  // the three hold bf16 bits (DeviceWeight)
};

// x [rows, D] grouped by expert: the rows of group g are [offsets[g], offsets[g + 1]) (host
// offsets, groups.size() + 1 of them) and go through groups[g]; y [rows, D]. `scratch`: at least
// 2 * offsets.back() * I floats. Each projection is one grouped product for all experts (two when
// fp32 and bf16 experts are mixed).
absl::Status ExpertFfn(const Blas& blas, const std::vector<ExpertWeights>& groups,
                       const std::vector<int64_t>& offsets, int64_t d, int64_t width,
                       const float* x, float* y, float* scratch);

}  // namespace dmoe::cuda

#endif  // DMOE_KERNELS_CUDA_EXPERT_FFN_H_
