#include "kernels/cuda/expert_ffn.h"

#include <utility>

#include "absl/strings/str_cat.h"

#if DMOE_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#endif

namespace dmoe::cuda {

#if DMOE_HAVE_CUDA

namespace {

absl::Status BlasError(cublasStatus_t st, const char* what, const char* file, int line) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", what, ": ",
                                          cublasGetStatusName(st), " (", cublasGetStatusString(st),
                                          ")"));
}

#define DMOE_CUBLAS_RETURN_IF_ERROR(expr)                                             \
  do {                                                                                \
    if (absl::Status _st = BlasError((expr), #expr, __FILE__, __LINE__); !_st.ok()) { \
      return _st;                                                                     \
    }                                                                                 \
  } while (0)

// C[m, n] = A[m, k] B[n, k]^T, all row-major: in cuBLAS's column-major view that is
// C^T[n, m] = B[n, k] (as k x n, transposed) x A^T[k, m].
absl::Status GemmNT(cublasHandle_t h, int64_t m, int64_t n, int64_t k, const float* a,
                    const float* b, float* c) {
  const float one = 1.0f, zero = 0.0f;
  DMOE_CUBLAS_RETURN_IF_ERROR(cublasSgemm(
      h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
      &one, b, static_cast<int>(k), a, static_cast<int>(k), &zero, c, static_cast<int>(n)));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Blas> Blas::Create(void* stream) {
  Blas b;
  cublasHandle_t h = nullptr;
  DMOE_CUBLAS_RETURN_IF_ERROR(cublasCreate(&h));
  b.handle_ = h;
  b.stream_ = stream;
  DMOE_CUBLAS_RETURN_IF_ERROR(cublasSetStream(h, static_cast<cudaStream_t>(stream)));
  // Plain fp32 products (no TF32): the results are compared with the CPU's.
  DMOE_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  return b;
}

Blas::~Blas() {
  if (handle_ != nullptr) cublasDestroy(static_cast<cublasHandle_t>(handle_));
}

Blas& Blas::operator=(Blas&& o) noexcept {
  if (this != &o) {
    if (handle_ != nullptr) cublasDestroy(static_cast<cublasHandle_t>(handle_));
    handle_ = std::exchange(o.handle_, nullptr);
    stream_ = o.stream_;
  }
  return *this;
}

absl::Status ExpertFfn(const Blas& blas, const std::vector<ExpertWeights>& groups,
                       const std::vector<int64_t>& offsets, int64_t d, int64_t width,
                       const float* x, float* y, float* scratch) {
  if (offsets.size() != groups.size() + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExpertFfn: ", offsets.size(), " offsets for ", groups.size(), " groups"));
  }
  const auto h = static_cast<cublasHandle_t>(blas.handle());
  for (size_t g = 0; g < groups.size(); ++g) {
    const int64_t n = offsets[g + 1] - offsets[g];
    if (n <= 0) continue;
    const float* xg = x + offsets[g] * d;
    float* gate = scratch;
    float* up = scratch + n * width;
    if (auto st = GemmNT(h, n, width, d, xg, groups[g].gate, gate); !st.ok()) return st;
    if (auto st = GemmNT(h, n, width, d, xg, groups[g].up, up); !st.ok()) return st;
    if (auto st = SiluMul(gate, up, n * width, gate, blas.stream()); !st.ok()) return st;
    if (auto st = GemmNT(h, n, d, width, gate, groups[g].down, y + offsets[g] * d); !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

#else  // !DMOE_HAVE_CUDA

absl::StatusOr<Blas> Blas::Create(void*) {
  return absl::UnavailableError("built without the CUDA toolkit");
}
Blas::~Blas() = default;
Blas& Blas::operator=(Blas&& o) noexcept {
  handle_ = std::exchange(o.handle_, nullptr);
  stream_ = o.stream_;
  return *this;
}
absl::Status ExpertFfn(const Blas&, const std::vector<ExpertWeights>&, const std::vector<int64_t>&,
                       int64_t, int64_t, const float*, float*, float*) {
  return absl::UnavailableError("built without the CUDA toolkit");
}

#endif  // DMOE_HAVE_CUDA

}  // namespace dmoe::cuda
