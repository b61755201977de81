// A16 bf16 products (kernels/cpu/bf16dot.h) against their definition written here from the
// row-major weights (so packing is checked too), at every ISA level this CPU has (forced), for
// every shape class of the presets and M from 1 to 512; levels against each other where products
// are far below a sum's last bit, and against a float64 reference where products are subnormal
// but sums are not; a row alone against the same row in batches; and the error against fp32
// activations.
#include "kernels/cpu/bf16dot.h"

#include <immintrin.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/qlinear.h"

namespace dmoe::cpu {
namespace {

// Round to nearest even (finite inputs), written here independently of common/dtype.h.
uint16_t Rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float Widen(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The definition over row-major bf16 weights w [n, k]; the data here never underflows, so the
// flush modes cannot matter (the test is compiled with -ffp-contract=off: nothing is fused).
std::vector<float> Definition(const std::vector<float>& x, int64_t m,
                              const std::vector<uint16_t>& w, int64_t n, int64_t k) {
  std::vector<float> y(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t o = 0; o < n; ++o) {
      float acc[4] = {0, 0, 0, 0};
      for (int64_t b = 0; b < k / 8; ++b) {
        for (int p = 0; p < 4; ++p) {
          const int64_t j = 8 * b + 2 * p;
          const float odd = Widen(Rne(x[i * k + j + 1])) * Widen(w[o * k + j + 1]);
          acc[p] = acc[p] + odd;
          const float even = Widen(Rne(x[i * k + j])) * Widen(w[o * k + j]);
          acc[p] = acc[p] + even;
        }
      }
      y[i * n + o] = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    }
  }
  return y;
}

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, scale);
  std::vector<float> v(n);
  for (float& f : v) f = nd(rng);
  return v;
}

struct Packed {
  std::vector<uint16_t> rows, packed;
};
Packed MakeWeights(int64_t n, int64_t k, uint32_t seed) {
  Packed p;
  const auto wf = Random(static_cast<size_t>(n * k), seed, 0.05f);
  for (float f : wf) p.rows.push_back(Rne(f));
  p.packed.resize(p.rows.size());
  PackRows(WeightFormat::kBf16, p.rows.data(), n, k, p.packed.data());
  return p;
}

TEST(Bf16Dot, MatchesItsDefinitionAtEveryIsaLevel) {
  const int top = SetBf16DotIsaForTesting(-1);
  std::printf("A16 levels checked: 0..%d (2 = AVX512-BF16 vdpbf16ps, 1 = AVX2 emulation)\n", top);
  for (auto [n, k] : {std::pair<int64_t, int64_t>{8, 8},
                      {64, 512},
                      {512, 1024},
                      {1024, 512},
                      {288, 1024},
                      {768, 384},
                      {1024, 2816}}) {
    const Packed w = MakeWeights(n, k, static_cast<uint32_t>(n + k));
    // (every row of tiles of 1..7 rows, 9, and 13 = 7 + 6: tiles.h)
    for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 9, 13, 16, 64, 512}) {
      if (m * n * k > (int64_t{1} << 27)) continue;  // the float reference is slow
      const auto x = Random(static_cast<size_t>(m * k), static_cast<uint32_t>(m));
      const auto want = Definition(x, m, w.rows, n, k);
      for (int level = 0; level <= top; ++level) {
        SetBf16DotIsaForTesting(level);
        std::vector<float> got(want.size());
        LinearBf16A16(x.data(), m, k, w.packed.data(), n, k, got.data(), n);
        ASSERT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size()))
            << "n " << n << " k " << k << " m " << m << " level " << level;
      }
    }
  }
  SetBf16DotIsaForTesting(-1);
}

// Products deep below the smallest normal float (~1e-42) beside normal ones: added exactly, they
// are far below the sum's last bit; the levels give the same bits.
TEST(Bf16Dot, LevelsAgreeWhereProductsUnderflow) {
  const int64_t n = 64, k = 256, m = 5;
  Packed w = MakeWeights(n, k, 3);
  for (size_t i = 0; i < w.rows.size(); i += 3) w.rows[i] = Rne(1e-30f * (1 + (i % 7)));
  PackRows(WeightFormat::kBf16, w.rows.data(), n, k, w.packed.data());
  auto x = Random(static_cast<size_t>(m * k), 4);
  for (size_t i = 0; i < x.size(); i += 2) x[i] *= 1e-12f;
  std::vector<std::vector<float>> ys;
  for (int level = 0; level <= Bf16DotIsaLevel(); ++level) {
    SetBf16DotIsaForTesting(level);
    ys.emplace_back(static_cast<size_t>(m * n));
    LinearBf16A16(x.data(), m, k, w.packed.data(), n, k, ys.back().data(), n);
    EXPECT_EQ(0, std::memcmp(ys[0].data(), ys.back().data(), 4 * ys[0].size())) << level;
  }
  SetBf16DotIsaForTesting(-1);
}

// Products below the smallest normal float (2^-126) whose sums are normal: vdpbf16ps adds each
// product exactly (a fused multiply-add) and flushes only a sum that is subnormal. Every level
// must give those bits; the reference here sums in float64, where these products and sums are
// exact, and rounds each step to float once. (The emulations once flushed such products before
// adding them: levels 0 and 1 differed from the CPU's instruction in 319 of 320 outputs.)
float FlushToZero(float v) { return std::fabs(v) < 0x1p-126f ? std::copysign(0.0f, v) : v; }

TEST(Bf16Dot, LevelsAgreeWhereProductsAreSubnormalButSumsAreNot) {
  const int64_t n = 64, k = 256, m = 5;
  Packed w = MakeWeights(n, k, 5);
  for (uint16_t& h : w.rows) h = Rne(Widen(h) * 2e-18f);  // ~1e-19
  PackRows(WeightFormat::kBf16, w.rows.data(), n, k, w.packed.data());
  const auto x = Random(static_cast<size_t>(m * k), 6, 1e-19f);
  std::vector<float> want(static_cast<size_t>(m * n));
  int64_t subnormal = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t o = 0; o < n; ++o) {
      float acc[4] = {0, 0, 0, 0};
      for (int64_t j = 0; j < k; ++j) {
        const int64_t c = (j & ~int64_t{1}) | (1 - (j & 1));  // odd column of each pair first
        const double prod =
            static_cast<double>(Widen(Rne(x[i * k + c]))) * Widen(w.rows[o * k + c]);
        subnormal += prod != 0 && std::fabs(prod) < 0x1p-126;
        float& a = acc[(c % 8) / 2];
        a = FlushToZero(static_cast<float>(a + prod));
      }
      want[i * n + o] = FlushToZero(FlushToZero(acc[0] + acc[2]) + FlushToZero(acc[1] + acc[3]));
    }
  }
  ASSERT_GT(subnormal, m * n * k / 4) << "the data must put many products below 2^-126";
  // The data must tell the two semantics apart: most outputs normal, and most of them not what
  // flushing each product before adding it gives.
  int normal = 0, flushed_differs = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t o = 0; o < n; ++o) {
      float acc[4] = {0, 0, 0, 0};
      for (int64_t c = 0; c < k; ++c) {
        const int64_t j = (c & ~int64_t{1}) | (1 - (c & 1));
        const float p = FlushToZero(Widen(Rne(x[i * k + j])) * Widen(w.rows[o * k + j]));
        acc[(j % 8) / 2] = FlushToZero(acc[(j % 8) / 2] + p);
      }
      const float f = FlushToZero(FlushToZero(acc[0] + acc[2]) + FlushToZero(acc[1] + acc[3]));
      const float y = want[static_cast<size_t>(i * n + o)];
      normal += std::fabs(y) >= 0x1p-126f;
      flushed_differs += std::memcmp(&f, &y, 4) != 0;
    }
  }
  ASSERT_GT(normal, m * n / 2);
  ASSERT_GT(flushed_differs, m * n / 2);
  for (int level = 0; level <= Bf16DotIsaLevel(); ++level) {
    SetBf16DotIsaForTesting(level);
    std::vector<float> got(want.size());
    LinearBf16A16(x.data(), m, k, w.packed.data(), n, k, got.data(), n);
    int differ = 0;
    for (size_t i = 0; i < got.size(); ++i) differ += std::memcmp(&got[i], &want[i], 4) != 0;
    EXPECT_EQ(0, differ) << "level " << level << ": outputs of " << got.size();
  }
  SetBf16DotIsaForTesting(-1);
}

// Through LinearW with A16 on: a row alone == the same row in batches of 2..40 rows.
TEST(Bf16Dot, RowAloneEqualsRowInAnyBatchThroughLinearW) {
  const int64_t n = 512, k = 1024;
  const Packed w = MakeWeights(n, k, 5);
  WeightRef ref{WeightFormat::kBf16, nullptr, nullptr, nullptr, n, k, w.packed.data()};
  ref.packed = true;
  SetBf16Activations(true);
  const auto target = Random(static_cast<size_t>(k), 6);
  std::vector<float> alone(static_cast<size_t>(n));
  LinearW(target.data(), 1, ref, alone.data());
  // (the row alone in a tile of every size 2..12, and in the last of several: tiles.h)
  for (int64_t m : {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17, 25, 40}) {
    auto x = Random(static_cast<size_t>(m * k), static_cast<uint32_t>(7 + m));
    std::copy(target.begin(), target.end(), x.begin() + (m - 1) * k);
    std::vector<float> y(static_cast<size_t>(m * n));
    LinearW(x.data(), m, ref, y.data());
    EXPECT_EQ(0, std::memcmp(y.data() + (m - 1) * n, alone.data(), 4 * alone.size())) << m;
  }
  SetBf16Activations(false);
}

// What rounding the activations costs: relative RMS error of A16 and of fp32 activations (A32)
// against float64, reported; A16 stays within 1 % and within a few times A32's.
TEST(Bf16Dot, ErrorAgainstFloat64StaysSmall) {
  const int64_t n = 512, k = 1024, m = 16;
  const Packed w = MakeWeights(n, k, 8);
  const auto x = Random(static_cast<size_t>(m * k), 9);
  std::vector<float> a16(static_cast<size_t>(m * n)), a32(a16.size());
  LinearBf16A16(x.data(), m, k, w.packed.data(), n, k, a16.data(), n);
  DotRowsBf16Packed(x.data(), m, k, w.packed.data(), n, k, a32.data(), n);
  double e16 = 0, e32 = 0, ref2 = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t o = 0; o < n; ++o) {
      double want = 0;
      for (int64_t j = 0; j < k; ++j) want += double{x[i * k + j]} * Widen(w.rows[o * k + j]);
      e16 += std::pow(a16[i * n + o] - want, 2);
      e32 += std::pow(a32[i * n + o] - want, 2);
      ref2 += want * want;
    }
  }
  const double r16 = std::sqrt(e16 / ref2), r32 = std::sqrt(e32 / ref2);
  std::printf("relative RMS error vs float64: A16 %.2e, A32 %.2e\n", r16, r32);
  EXPECT_LT(r16, 1e-2);
  EXPECT_GT(r16, r32);  // rounding the activations does cost something
}

}  // namespace
}  // namespace dmoe::cpu
