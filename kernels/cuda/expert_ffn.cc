// Linear and ExpertFfn over RunGemm and SiluMul: shared by the CUDA build
// (//kernels/cuda:expert_ffn) and the host emulation (//kernels/cuda:host).
#include "kernels/cuda/expert_ffn.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace dmoe::cuda {

absl::StatusOr<uint16_t*> Blas::Bf16Scratch(int64_t n) const {
  if (auto st = bf16_.Reserve(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(uint16_t));
      !st.ok()) {
    return st;
  }
  return bf16_.as<uint16_t>();
}

absl::Status Linear(const Blas& blas, const float* x, int64_t m, DeviceWeight w, int64_t out,
                    int64_t in, float* y) {
  if (w.bf16) {
    auto xb = blas.Bf16Scratch(m * in);
    if (!xb.ok()) return xb.status();
    if (auto st = ToBf16(x, m * in, *xb, blas.stream()); !st.ok()) return st;
    return RunGemmBf16(blas, m, out, in, *xb, static_cast<const uint16_t*>(w.w), y, out);
  }
  Gemm g;
  g.m = m;
  g.n = out;
  g.k = in;
  g.a = x;
  g.lda = in;
  g.b = static_cast<const float*>(w.w);
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
    const bool bf16 = groups[g].bf16;
    if (auto st = Linear(blas, xg, n, {groups[g].gate, bf16}, width, d, gate); !st.ok()) return st;
    if (auto st = Linear(blas, xg, n, {groups[g].up, bf16}, width, d, up); !st.ok()) return st;
    if (auto st = SiluMul(gate, up, n * width, gate, blas.stream()); !st.ok()) return st;
    if (auto st = Linear(blas, gate, n, {groups[g].down, bf16}, d, width, y + offsets[g] * d);
        !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

}  // namespace dmoe::cuda
