// Blas and RunGemm through launch.h's InvariantGemm or cuBLAS (or UNAVAILABLE stubs without the
// toolkit).
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda/expert_ffn.h"
#include "kernels/cuda/launch.h"

#if DMOE_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <type_traits>
#include <vector>
#endif

namespace dmoe::cuda {

#if DMOE_HAVE_CUDA

namespace {

#define DMOE_STR2(x) #x
#define DMOE_STR(x) DMOE_STR2(x)

// The cuBLAS entry points dmoe uses, from libcublas loaded on first use (see @local_cuda's
// `cublas` target for why it is not linked).
struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetMathMode) set_math_mode = nullptr;
  decltype(&cublasSgemmStridedBatched) sgemm_strided_batched = nullptr;
  // cublasGemmEx has a C++ overload (cublasDataType_t): the C one, spelled out.
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t) = nullptr;
  decltype(&cublasGemmGroupedBatchedEx) gemm_grouped = nullptr;  // null: one call per group
  decltype(&cublasGetStatusName) status_name = nullptr;
  decltype(&cublasGetStatusString) status_string = nullptr;
  std::string error;  // why it could not be loaded
};

const CublasApi& Cublas() {
  static const CublasApi api = [] {
    CublasApi a;
    const std::string name = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
#ifdef DMOE_CUDA_LIB_DIR
    if (lib == nullptr) {
      lib = dlopen((std::string(DMOE_STR(DMOE_CUDA_LIB_DIR)) + "/" + name).c_str(),
                   RTLD_NOW | RTLD_LOCAL);
    }
#endif
    if (lib == nullptr) {
      const char* e = dlerror();
      a.error = absl::StrCat("cuBLAS: dlopen ", name, ": ", e ? e : "failed");
      return a;
    }
    auto sym = [&](auto& fn, const char* symbol) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, symbol));
      if (fn == nullptr && a.error.empty()) a.error = absl::StrCat("cuBLAS: no ", symbol);
    };
    sym(a.create, "cublasCreate_v2");
    sym(a.destroy, "cublasDestroy_v2");
    sym(a.set_stream, "cublasSetStream_v2");
    sym(a.set_math_mode, "cublasSetMathMode");
    sym(a.sgemm_strided_batched, "cublasSgemmStridedBatched");
    sym(a.gemm_ex, "cublasGemmEx");
    sym(a.status_name, "cublasGetStatusName");
    // cuBLAS 12.5+; without it grouped products run one call per group.
    a.gemm_grouped =
        reinterpret_cast<decltype(a.gemm_grouped)>(dlsym(lib, "cublasGemmGroupedBatchedEx"));
    sym(a.status_string, "cublasGetStatusString");
    return a;
  }();
  return api;
}

absl::Status BlasError(cublasStatus_t st, const char* what, const char* file, int line) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", what, ": ",
                                          Cublas().status_name(st), " (",
                                          Cublas().status_string(st), ")"));
}

#define DMOE_CUBLAS_RETURN_IF_ERROR(expr)                                             \
  do {                                                                                \
    if (absl::Status _st = BlasError((expr), #expr, __FILE__, __LINE__); !_st.ok()) { \
      return _st;                                                                     \
    }                                                                                 \
  } while (0)

int I(int64_t v) { return static_cast<int>(v); }

static_assert(launch::kInvariantGemmChunk == kInvariantGemmChunk, "one chunk size");

absl::Status Invariant(const launch::InvariantGemm& g, const Blas& blas, const char* file,
                       int line) {
  float* scratch = nullptr;
  if (const int64_t floats = launch::InvariantGemmScratchFloats(g); floats > 0) {
    ASSIGN_OR_RETURN(scratch, blas.SplitScratch(floats));
  }
  const int err = launch::RunInvariantGemm(g, scratch, blas.stream());
  if (err == 0) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(
      file, ":", line, ": RunInvariantGemm: ", cudaGetErrorString(static_cast<cudaError_t>(err))));
}

}  // namespace

// Row-major C[m, n] is column-major C^T [n, m], and C^T = op(B)^T A^T: cuBLAS multiplies B's
// storage (transposed when b is [n, k]) by A's storage.
absl::Status RunGemm(const Blas& blas, const Gemm& g) {
  if (g.m <= 0 || g.n <= 0 || g.batch <= 0) return absl::OkStatus();
  if (!blas.cublas()) {
    launch::InvariantGemm v;
    v.m = g.m;
    v.n = g.n;
    v.k = g.k;
    v.a = g.a;
    v.lda = g.lda;
    v.stride_a = g.stride_a;
    v.b = g.b;
    v.ldb = g.ldb;
    v.stride_b = g.stride_b;
    v.b_trans = g.b_trans;
    v.c = g.c;
    v.ldc = g.ldc;
    v.stride_c = g.stride_c;
    v.batch = g.batch;
    v.alpha = g.alpha;
    v.beta = g.beta;
    return Invariant(v, blas, __FILE__, __LINE__);
  }
  DMOE_CUBLAS_RETURN_IF_ERROR(Cublas().sgemm_strided_batched(
      static_cast<cublasHandle_t>(blas.handle()), g.b_trans ? CUBLAS_OP_T : CUBLAS_OP_N,
      CUBLAS_OP_N, I(g.n), I(g.m), I(g.k), &g.alpha, g.b, I(g.ldb), g.stride_b, g.a, I(g.lda),
      g.stride_a, &g.beta, g.c, I(g.ldc), g.stride_c, I(g.batch)));
  return absl::OkStatus();
}

// Row-major c [m, n] = a [m, k] @ b [n, k]^T in cuBLAS's column-major view: c^T = b a^T.
absl::Status RunGemmBf16(const Blas& blas, int64_t m, int64_t n, int64_t k, const uint16_t* a,
                         const uint16_t* b, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return absl::OkStatus();
  if (!blas.cublas()) {
    launch::InvariantGemm v;
    v.m = m;
    v.n = n;
    v.k = k;
    v.a = a;
    v.lda = k;
    v.b = b;
    v.ldb = k;
    v.c = c;
    v.ldc = ldc;
    v.bf16 = true;
    return Invariant(v, blas, __FILE__, __LINE__);
  }
  const float one = 1.0f, zero = 0.0f;
  DMOE_CUBLAS_RETURN_IF_ERROR(
      Cublas().gemm_ex(static_cast<cublasHandle_t>(blas.handle()), CUBLAS_OP_T, CUBLAS_OP_N, I(n),
                       I(m), I(k), &one, b, CUDA_R_16BF, I(k), a, CUDA_R_16BF, I(k), &zero, c,
                       CUDA_R_32F, I(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

namespace {

// Whether this cuBLAS refused the grouped call for fp32 / bf16 inputs (the types it takes vary by
// version; bf16 inputs with an fp32 C are not in every version's table): then each group runs
// alone.
std::atomic<bool> grouped_refused[2] = {false, false};

}  // namespace

bool GroupedGemmRefused(bool bf16) {
  return Cublas().gemm_grouped == nullptr || grouped_refused[bf16].load();
}

absl::Status RunGemmGrouped(const Blas& blas, const GroupedGemm& g) {
  const size_t groups = g.m.size();
  if (g.a.size() != groups || g.b.size() != groups || g.c.size() != groups) {
    return absl::InvalidArgumentError("RunGemmGrouped: arrays of different lengths");
  }
  if (g.n <= 0 || g.k <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("RunGemmGrouped: n ", g.n, ", k ", g.k));
  }
  std::vector<size_t> live;  // the non-empty products
  for (size_t i = 0; i < groups; ++i) {
    if (g.m[i] > 0) live.push_back(i);
  }
  if (!blas.cublas() && !live.empty()) {  // one launch for every group
    std::vector<launch::InvariantGemmGroup> host(live.size());
    int64_t max_m = 0;
    for (size_t j = 0; j < live.size(); ++j) {
      host[j] = {g.m[live[j]], g.a[live[j]], g.b[live[j]], g.c[live[j]]};
      max_m = std::max(max_m, g.m[live[j]]);
    }
    static_assert(std::is_trivially_copyable_v<launch::InvariantGemmGroup>);
    const int64_t words = static_cast<int64_t>(
        (host.size() * sizeof(launch::InvariantGemmGroup) + sizeof(void*) - 1) / sizeof(void*));
    ASSIGN_OR_RETURN(void** dev, blas.PointerScratch(words));
    // From pageable memory: staged before the call returns, ordered on the stream.
    if (cudaError_t e =
            cudaMemcpyAsync(dev, host.data(), host.size() * sizeof(launch::InvariantGemmGroup),
                            cudaMemcpyHostToDevice, static_cast<cudaStream_t>(blas.stream()));
        e != cudaSuccess) {
      return absl::InternalError(
          absl::StrCat("RunGemmGrouped: cudaMemcpyAsync: ", cudaGetErrorString(e)));
    }
    launch::InvariantGemm v;
    v.n = g.n;
    v.k = g.k;
    v.bf16 = g.bf16;
    v.groups = reinterpret_cast<const launch::InvariantGemmGroup*>(dev);
    v.n_groups = static_cast<int64_t>(live.size());
    v.max_m = max_m;
    return Invariant(v, blas, __FILE__, __LINE__);
  }
  // One product: the plain GEMM (the grouped call took 2.6x its time for 1024 rows on an H200).
  if (live.size() > 1 && !GroupedGemmRefused(g.bf16)) {
    // c_i^T = b_i a_i^T, as RunGemmBf16: one group of one product per expert.
    const size_t n = live.size();
    std::vector<cublasOperation_t> ta(n, CUBLAS_OP_T), tb(n, CUBLAS_OP_N);
    std::vector<int> mm(n, I(g.n)), nn(n), kk(n, I(g.k)), lda(n, I(g.k)), ldc(n, I(g.n)),
        size(n, 1);
    std::vector<float> alpha(n, 1.0f), beta(n, 0.0f);
    std::vector<void*> ptrs(3 * n);  // cuBLAS reads the a and b arrays only
    for (size_t j = 0; j < n; ++j) {
      nn[j] = I(g.m[live[j]]);
      ptrs[j] = const_cast<void*>(g.b[live[j]]);
      ptrs[n + j] = const_cast<void*>(g.a[live[j]]);
      ptrs[2 * n + j] = g.c[live[j]];
    }
    ASSIGN_OR_RETURN(void** dev, blas.PointerScratch(static_cast<int64_t>(3 * n)));
    // From pageable memory: staged before the call returns, ordered on the stream.
    if (cudaError_t e =
            cudaMemcpyAsync(dev, ptrs.data(), 3 * n * sizeof(void*), cudaMemcpyHostToDevice,
                            static_cast<cudaStream_t>(blas.stream()));
        e != cudaSuccess) {
      return absl::InternalError(
          absl::StrCat("RunGemmGrouped: cudaMemcpyAsync: ", cudaGetErrorString(e)));
    }
    const cudaDataType in = g.bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const cublasStatus_t st = Cublas().gemm_grouped(
        static_cast<cublasHandle_t>(blas.handle()), ta.data(), tb.data(), mm.data(), nn.data(),
        kk.data(), alpha.data(), dev, in, lda.data(), dev + n, in, lda.data(), beta.data(),
        dev + 2 * n, CUDA_R_32F, ldc.data(), I(static_cast<int64_t>(n)), size.data(),
        CUBLAS_COMPUTE_32F);
    if (st != CUBLAS_STATUS_NOT_SUPPORTED) {
      DMOE_CUBLAS_RETURN_IF_ERROR(st);
      return absl::OkStatus();
    }
    grouped_refused[g.bf16] = true;  // the same products one by one below, from now on
  }
  for (const size_t i : live) RETURN_IF_ERROR(RunGroupMember(blas, g, i));
  return absl::OkStatus();
}

absl::StatusOr<Blas> Blas::Create(void* stream) {
  if (!Cublas().error.empty()) return absl::UnavailableError(Cublas().error);
  Blas b;
  cublasHandle_t h = nullptr;
  DMOE_CUBLAS_RETURN_IF_ERROR(Cublas().create(&h));
  b.handle_ = h;
  b.stream_ = stream;
  DMOE_CUBLAS_RETURN_IF_ERROR(Cublas().set_stream(h, static_cast<cudaStream_t>(stream)));
  // Plain fp32 products (no TF32): the results are compared with the CPU's.
  DMOE_CUBLAS_RETURN_IF_ERROR(Cublas().set_math_mode(h, CUBLAS_DEFAULT_MATH));
  return b;
}

Blas::~Blas() {
  if (handle_ != nullptr) Cublas().destroy(static_cast<cublasHandle_t>(handle_));
}

Blas& Blas::operator=(Blas&& o) noexcept {
  if (this != &o) {
    if (handle_ != nullptr) Cublas().destroy(static_cast<cublasHandle_t>(handle_));
    handle_ = std::exchange(o.handle_, nullptr);
    stream_ = o.stream_;
    bf16_ = std::move(o.bf16_);
    pointers_ = std::move(o.pointers_);
    split_ = std::move(o.split_);
    cublas_ = o.cublas_;
  }
  return *this;
}

#else  // !DMOE_HAVE_CUDA

absl::StatusOr<Blas> Blas::Create(void*) {
  return absl::UnavailableError("built without the CUDA toolkit");
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
absl::Status RunGemm(const Blas&, const Gemm&) {
  return absl::UnavailableError("built without the CUDA toolkit");
}
absl::Status RunGemmBf16(const Blas&, int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*,
                         float*, int64_t) {
  return absl::UnavailableError("built without the CUDA toolkit");
}
absl::Status RunGemmGrouped(const Blas&, const GroupedGemm&) {
  return absl::UnavailableError("built without the CUDA toolkit");
}
bool GroupedGemmRefused(bool) { return true; }

#endif  // DMOE_HAVE_CUDA

}  // namespace dmoe::cuda
