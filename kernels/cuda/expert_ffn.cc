// Linear and ExpertFfn over RunGemm and SiluMul: shared by the CUDA build
// (//kernels/cuda:expert_ffn) and the host emulation (//kernels/cuda:host).
#include "kernels/cuda/expert_ffn.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace dmoe::cuda {

absl::StatusOr<uint16_t*> Blas::Bf16Scratch(int64_t n) const {
  if (auto st = bf16_.Reserve(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(uint16_t));
      !st.ok()) {
    return st;
  }
  return bf16_.as<uint16_t>();
}

absl::StatusOr<void**> Blas::PointerScratch(int64_t n) const {
  if (auto st = pointers_.Reserve(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(void*));
      !st.ok()) {
    return st;
  }
  return static_cast<void**>(pointers_.get());
}

absl::StatusOr<float*> Blas::SplitScratch(int64_t n) const {
  if (auto st = split_.Reserve(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float));
      !st.ok()) {
    return st;
  }
  return split_.as<float>();
}

absl::Status RunGroupMember(const Blas& blas, const GroupedGemm& g, size_t i) {
  if (g.bf16) {
    return RunGemmBf16(blas, g.m[i], g.n, g.k, static_cast<const uint16_t*>(g.a[i]),
                       static_cast<const uint16_t*>(g.b[i]), g.c[i], g.n);
  }
  Gemm single;
  single.m = g.m[i];
  single.n = g.n;
  single.k = g.k;
  single.a = static_cast<const float*>(g.a[i]);
  single.lda = g.k;
  single.b = static_cast<const float*>(g.b[i]);
  single.ldb = g.k;
  single.c = g.c[i];
  single.ldc = g.n;
  return RunGemm(blas, single);
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

namespace {

// One projection of every group whose weights have the given dtype: out_g = in_g @ w_g^T, in_g at
// in + first_g * in_dim (fp32 or bf16 bits), out_g at out + first_g * out_dim.
absl::Status Project(const Blas& blas, const std::vector<ExpertWeights>& groups,
                     const std::vector<int64_t>& offsets, const void* const ExpertWeights::*w,
                     bool bf16, const void* in, int64_t in_dim, float* out, int64_t out_dim) {
  GroupedGemm g;
  g.n = out_dim;
  g.k = in_dim;
  g.bf16 = bf16;
  const size_t elem = bf16 ? sizeof(uint16_t) : sizeof(float);
  for (size_t i = 0; i < groups.size(); ++i) {
    const int64_t rows = offsets[i + 1] - offsets[i];
    if (rows <= 0 || groups[i].bf16 != bf16) continue;
    g.m.push_back(rows);
    g.a.push_back(static_cast<const char*>(in) + offsets[i] * in_dim * elem);
    g.b.push_back(groups[i].*w);
    g.c.push_back(out + offsets[i] * out_dim);
  }
  return g.m.empty() ? absl::OkStatus() : RunGemmGrouped(blas, g);
}

}  // namespace

absl::Status ExpertFfn(const Blas& blas, const std::vector<ExpertWeights>& groups,
                       const std::vector<int64_t>& offsets, int64_t d, int64_t width,
                       const float* x, float* y, float* scratch) {
  if (offsets.size() != groups.size() + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExpertFfn: ", offsets.size(), " offsets for ", groups.size(), " groups"));
  }
  for (size_t i = 0; i + 1 < offsets.size(); ++i) {
    if (offsets[i] < 0 || offsets[i + 1] < offsets[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat("ExpertFfn: offsets not increasing at group ", i));
    }
  }
  // Rows, the scratch's included, are addressed by the offsets themselves.
  const int64_t first = offsets.front(), last = offsets.back();
  if (last <= first) return absl::OkStatus();
  float* gate = scratch;
  float* up = scratch + last * width;
  bool any_bf16 = false, any_f32 = false;
  for (const ExpertWeights& w : groups) (w.bf16 ? any_bf16 : any_f32) = true;
  for (const bool bf16 : {false, true}) {
    if (!(bf16 ? any_bf16 : any_f32)) continue;
    const void* in = x;
    if (bf16) {  // every row rounded to bf16 once (a row of an fp32 group is never read here)
      ASSIGN_OR_RETURN(uint16_t * xb, blas.Bf16Scratch(last * std::max(d, width)));
      RETURN_IF_ERROR(ToBf16(x + first * d, (last - first) * d, xb + first * d, blas.stream()));
      in = xb;
    }
    RETURN_IF_ERROR(Project(blas, groups, offsets, &ExpertWeights::gate, bf16, in, d, gate, width));
    RETURN_IF_ERROR(Project(blas, groups, offsets, &ExpertWeights::up, bf16, in, d, up, width));
  }
  RETURN_IF_ERROR(SiluMul(gate + first * width, up + first * width, (last - first) * width,
                          gate + first * width, blas.stream()));
  for (const bool bf16 : {false, true}) {
    if (!(bf16 ? any_bf16 : any_f32)) continue;
    const void* in = gate;
    if (bf16) {
      ASSIGN_OR_RETURN(uint16_t * hb, blas.Bf16Scratch(last * std::max(d, width)));
      RETURN_IF_ERROR(
          ToBf16(gate + first * width, (last - first) * width, hb + first * width, blas.stream()));
      in = hb;
    }
    RETURN_IF_ERROR(Project(blas, groups, offsets, &ExpertWeights::down, bf16, in, width, y, d));
  }
  return absl::OkStatus();
}

}  // namespace dmoe::cuda
