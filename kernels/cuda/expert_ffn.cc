// Linear and ExpertFfn over RunGemm and SiluMul: shared by the CUDA build
// (//kernels/cuda:expert_ffn) and the host emulation (//kernels/cuda:host).
#include "kernels/cuda/expert_ffn.h"

#include "absl/strings/str_cat.h"

namespace dmoe::cuda {

absl::Status Linear(const Blas& blas, const float* x, int64_t m, const float* w, int64_t out,
                    int64_t in, float* y) {
  Gemm g;
  g.m = m;
  g.n = out;
  g.k = in;
  g.a = x;
  g.lda = in;
  g.b = w;
  g.ldb = in;
  g.c = y;
  g.ldc = out;
  return RunGemm(blas, g);
}

absl::Status ExpertFfn(const Blas& blas, const std::vector<ExpertWeights>& groups,
                       const std::vector<int64_t>& offsets, int64_t d, int64_t width,
                       const float* x, float* y, float* scratch) {
  if (offsets.size() != groups.size() + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExpertFfn: ", offsets.size(), " offsets for ", groups.size(), " groups"));
  }
  for (size_t g = 0; g < groups.size(); ++g) {
    const int64_t n = offsets[g + 1] - offsets[g];
    if (n <= 0) continue;
    const float* xg = x + offsets[g] * d;
    float* gate = scratch;
    float* up = scratch + n * width;
    if (auto st = Linear(blas, xg, n, groups[g].gate, width, d, gate); !st.ok()) return st;
    if (auto st = Linear(blas, xg, n, groups[g].up, width, d, up); !st.ok()) return st;
    if (auto st = SiluMul(gate, up, n * width, gate, blas.stream()); !st.ok()) return st;
    if (auto st = Linear(blas, gate, n, groups[g].down, d, width, y + offsets[g] * d); !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

}  // namespace dmoe::cuda
