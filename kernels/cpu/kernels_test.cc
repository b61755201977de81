#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/cpu/gating.h"
#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/mla.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/small_gemm.h"
#include "kernels/cpu/thread_pool.h"

namespace dmoe::cpu {
namespace {

std::vector<float> Random(size_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

TEST(Linear, MatchesDoubleLoopsAtEveryBatchSize) {
  const int64_t in = 37, out = 23;
  const auto w = Random(in * out, 1);
  for (int64_t t : {1, 2, 9}) {
    const auto x = Random(t * in, t);
    std::vector<float> y(t * out);
    Linear(x.data(), t, in, w.data(), out, y.data());
    for (int64_t i = 0; i < t; ++i) {
      for (int64_t o = 0; o < out; ++o) {
        double s = 0;
        for (int64_t j = 0; j < in; ++j) s += double(x[i * in + j]) * w[o * in + j];
        EXPECT_NEAR(y[i * out + o], s, 1e-4);
      }
    }
  }
}

TEST(RmsNorm, MatchesTheFormula) {
  const auto x = Random(2 * 8, 3);
  const auto w = Random(8, 4);
  std::vector<float> y(16);
  RmsNorm(x.data(), 2, 8, w.data(), 1e-6, y.data());
  for (int r = 0; r < 2; ++r) {
    double ms = 0;
    for (int i = 0; i < 8; ++i) ms += double(x[r * 8 + i]) * x[r * 8 + i] / 8;
    for (int i = 0; i < 8; ++i) {
      EXPECT_NEAR(y[r * 8 + i], w[i] * x[r * 8 + i] / std::sqrt(ms + 1e-6), 1e-5);
    }
  }
}

TEST(Gating, GroupLimitedGreedyDropsTheWeakGroups) {
  GateParams p;
  p.n_experts = 8;
  p.top_k = 3;
  p.method = GateMethod::kGroupLimitedGreedy;
  p.n_group = 4;  // groups {0,1} {2,3} {4,5} {6,7}
  p.topk_group = 2;
  p.routed_scaling_factor = 2.0f;
  // Softmax is monotone, so pick logits whose order we know. Group maxima: g0=5, g1=1, g2=4.5,
  // g3=4.8 -> keep g0 and g3. Plain greedy would take expert 4 (4.5) as third; group-limited
  // takes expert 7 (4.8), then expert 6 (4.7) beats expert 1.
  std::vector<float> logits = {5.0f, 0.0f, 1.0f, 0.5f, 4.5f, 4.4f, 4.7f, 4.8f};
  std::vector<double> sm(8);
  double z = 0;
  for (int i = 0; i < 8; ++i) z += std::exp(double(logits[i]));
  for (int i = 0; i < 8; ++i) sm[i] = std::exp(double(logits[i])) / z;
  std::vector<int32_t> ids(3);
  std::vector<float> w(3);
  SelectExperts(p, logits.data(), 1, ids.data(), w.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 7, 6}));
  EXPECT_NEAR(w[0], 2.0 * sm[0], 1e-6);
  EXPECT_NEAR(w[1], 2.0 * sm[7], 1e-6);
  EXPECT_NEAR(w[2], 2.0 * sm[6], 1e-6);
}

TEST(Gating, TiesGoToTheLowerIndexAndNormTopkNormalizesWithoutScaling) {
  GateParams p;
  p.n_experts = 6;
  p.top_k = 2;
  p.norm_topk_prob = true;
  p.routed_scaling_factor = 16.0f;  // must not apply (original V2 rule)
  std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f, 3.0f, 0.0f};
  std::vector<int32_t> ids(2);
  std::vector<float> w(2);
  SelectExperts(p, logits.data(), 1, ids.data(), w.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 3}));
  EXPECT_NEAR(w[0], 0.5, 1e-6);
  EXPECT_NEAR(w[1], 0.5, 1e-6);
}

// DeepSeek-V3 noaux_tc (MODEL_SPEC.md): groups {0,1} {2,3} {4,5} {6,7} ranked by the sum of
// their two best biased sigmoid scores. Expert 0 has the best score, but its group's sum (0.95 +
// 0.05) loses: a max-per-group rule would keep it. The bias lifts expert 6 (0.27 + 0.5) so that
// group 3 wins and 6 is chosen; its weight is its unbiased score. Weights: normalized, then
// scaled by rsf.
TEST(Gating, NoauxTcRanksGroupsByTopTwoSumsAndWeighsByUnbiasedScores) {
  GateParams p;
  p.n_experts = 8;
  p.top_k = 2;
  p.method = GateMethod::kNoauxTc;
  p.scoring = GateScoring::kSigmoid;
  p.n_group = 4;
  p.topk_group = 2;
  p.norm_topk_prob = true;
  p.routed_scaling_factor = 2.5f;
  p.scale_after_norm = true;
  const std::vector<float> logits0 = {3.0f, -3.0f, 1.0f, 1.0f, 0.5f, 0.4f, -1.0f, 2.0f};
  auto sig = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  std::vector<int32_t> ids(2);
  std::vector<float> w(2);
  std::vector<float> bias = {0, 0, 0, 0, 0, 0, 0.5f, 0};
  std::vector<float> logits = logits0;
  SelectExperts(p, logits.data(), 1, ids.data(), w.data(), bias.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{7, 6}));
  const double z = sig(2.0) + sig(-1.0);
  EXPECT_NEAR(w[0], 2.5 * sig(2.0) / z, 1e-6);
  EXPECT_NEAR(w[1], 2.5 * sig(-1.0) / z, 1e-6);
  EXPECT_NEAR(logits[0], sig(3.0), 1e-6);  // the scores replace the logits
  // Without the bias group 3 sums 1.15 and loses to groups 1 (1.46) and 2 (1.22); the tie
  // between experts 2 and 3 goes to the lower index first.
  std::fill(bias.begin(), bias.end(), 0.0f);
  logits = logits0;
  SelectExperts(p, logits.data(), 1, ids.data(), w.data(), bias.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{2, 3}));
  EXPECT_NEAR(w[0], 1.25, 1e-6);
  // Without norm_topk_prob the weights are the scaled scores.
  p.norm_topk_prob = false;
  logits = logits0;
  SelectExperts(p, logits.data(), 1, ids.data(), w.data(), bias.data());
  EXPECT_NEAR(w[0], 2.5 * sig(1.0), 1e-6);
}

// The tiny preset's RoPE (model/tiny_model.cc): dim 16, theta 1e4, YaRN factor 4 over an original
// 128 positions, beta 32/1.
RopeParams TinyRope() {
  RopeParams p;
  p.dim = 16;
  p.max_positions = 512;
  p.theta = 10000.0;
  p.yarn = true;
  p.factor = 4.0;
  p.original_max_positions = 128;
  p.beta_fast = 32.0;
  p.beta_slow = 1.0;
  return p;
}

// Runs fn(n, out) at every ISA level (portable, AVX2, ...) for each length n = full - cut, cut 0..7
// (every remainder modulo 8: values in the vector body and in the scalar tail), expects the same
// bits from every level, and returns the full length's result.
std::vector<float> SameBitsAtEveryIsaLevel(int64_t full,
                                           const std::function<void(int64_t, float*)>& fn) {
  const int top = SetGemmIsaForTesting(-1);
  EXPECT_GE(top, 0);
  std::vector<float> result;
  for (int64_t cut = 0; cut < 8; ++cut) {
    const int64_t n = full - cut;
    std::vector<std::vector<float>> at_level;
    for (int level = 0; level <= top; ++level) {
      if (SetGemmIsaForTesting(level) != level) {
        ADD_FAILURE() << "could not select ISA level " << level;
        SetGemmIsaForTesting(-1);
        return {};
      }
      std::vector<float> y(static_cast<size_t>(n));
      fn(n, y.data());
      at_level.push_back(y);
    }
    SetGemmIsaForTesting(-1);
    for (size_t l = 1; l < at_level.size(); ++l) {
      EXPECT_EQ(0, std::memcmp(at_level[0].data(), at_level[l].data(), 4 * static_cast<size_t>(n)))
          << "level " << l << " length " << n;
    }
    if (cut == 0) result = at_level.back();
  }
  return result;
}

// The gate's scores (SelectExperts' sigmoid, SoftmaxRows' softmax: the router's, batch-invariant
// paths) take their exp from ExpScaled: the same bits at every ISA level, so on every CPU (glibc's
// expf picks its code by the CPU), and within a few ulp of the definition in double, over logits
// in [-30, 30] with a -inf entry (weight 0, score 0).
TEST(Gating, ScoresHaveTheSameBitsAtEveryIsaLevelAndMatchTheDefinition) {
  const int64_t full = 67;
  std::vector<float> logits(full);
  for (int64_t i = 0; i < full; ++i) logits[i] = -30.0f + 60.0f * ((i * 37) % full) / full;
  logits[5] = -std::numeric_limits<float>::infinity();
  const std::vector<float> soft = SameBitsAtEveryIsaLevel(full, [&](int64_t n, float* out) {
    std::copy(logits.begin(), logits.begin() + n, out);
    SoftmaxRows(out, 1, n, n);
  });
  const std::vector<float> sig = SameBitsAtEveryIsaLevel(full, [&](int64_t n, float* out) {
    GateParams p;
    p.n_experts = n;
    p.top_k = 1;
    p.method = GateMethod::kGreedy;
    p.scoring = GateScoring::kSigmoid;
    std::copy(logits.begin(), logits.begin() + n, out);
    int32_t id = 0;
    float w = 0;
    SelectExperts(p, out, 1, &id, &w);  // (the scores replace the logits)
  });
  ASSERT_EQ(soft.size(), static_cast<size_t>(full));
  ASSERT_EQ(sig.size(), static_cast<size_t>(full));
  double mx = -1e300, sum = 0;
  for (float x : logits) mx = std::max(mx, double(x));
  for (float x : logits) sum += std::exp(double(x) - mx);
  for (int64_t i = 0; i < full; ++i) {
    if (i == 5) continue;  // (the -inf entry: below)
    const double x = logits[i], want_soft = std::exp(x - mx) / sum;
    // (x - mx is rounded to float first, as every softmax over floats does: a relative error of
    // up to |x - mx| * 2^-24 in the numerator, besides the exp's own few ulp)
    EXPECT_NEAR(soft[i], want_soft, (6e-7 + std::fabs(x - mx) * 6e-8) * want_soft) << i;
    const double want_sig = 1.0 / (1.0 + std::exp(-x));
    EXPECT_NEAR(sig[i], want_sig, 1e-6 * want_sig) << i;
  }
  EXPECT_EQ(soft[5], 0.0f);
  EXPECT_EQ(sig[5], 0.0f);
  // Bit for bit the definitions through ExpScaled (what makes them the same on every CPU):
  // sigmoid 1 / (1 + exp(-x)); softmax exp(x - max) times float(1 / their double sum in order).
  std::vector<float> e(full), neg(full);
  for (int64_t i = 0; i < full; ++i) neg[i] = -logits[i];
  ExpScaled(neg.data(), full, 0.0f, 1.0f, e.data());
  for (int64_t i = 0; i < full; ++i) EXPECT_EQ(sig[i], 1.0f / (1.0f + e[i])) << i;
  const float fmx = *std::max_element(logits.begin(), logits.end());
  ExpScaled(logits.data(), full, fmx, 1.0f, e.data());
  double esum = 0;
  for (float v : e) esum += v;
  const float inv = static_cast<float>(1.0 / esum);
  for (int64_t i = 0; i < full; ++i) EXPECT_EQ(soft[i], e[i] * inv) << i;
}

// SiluMul (its own vector exp): within a few ulp of silu(g) * u in double over g in [-100, 100]
// where the result is a normal float, exactly 0 where exp(-g) passes 88 (its range's end), NaN for
// NaN, and the same bits at every ISA level (portable, AVX2), specials inside the vector body as
// well as in the scalar tail, for every length remainder modulo 8.
TEST(SiluMul, NearTheDefinitionAndTheSameBitsAtEveryIsaLevel) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> specials = {nan,   0.0f,   -0.0f, 1e-30f, -1e-30f, 87.0f, -87.0f,
                                       88.0f, -88.0f, 88.5f, -88.5f, 1e-40f,  inf,   -inf};
  std::vector<float> g = specials;  // (the first 8 go through the vector code)
  for (float v = -100.0f; v <= 100.0f; v += 0.0137f) g.push_back(v);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0, 3);
  for (int i = 0; i < 20000; ++i) g.push_back(nd(rng));
  for (float v : specials) g.push_back(v);  // (and in the tail, for some lengths)
  std::vector<float> u;
  for (size_t i = 0; i < g.size(); ++i) u.push_back(0.5f + 0.25f * static_cast<float>(i % 7));
  const std::vector<float> h =
      SameBitsAtEveryIsaLevel(static_cast<int64_t>(g.size()),
                              [&](int64_t n, float* out) { SiluMul(g.data(), u.data(), n, out); });
  double worst = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double x = g[i];
    if (std::isnan(x) || x == -inf) {  // (-inf / inf: NaN, as g / (1 + exp(-g)) gives)
      EXPECT_TRUE(std::isnan(h[i])) << x;
      continue;
    }
    if (x == inf) {
      EXPECT_EQ(h[i], inf);
      continue;
    }
    const double want = x / (1.0 + std::exp(-x)) * u[i];
    if (x < -88.0) {
      EXPECT_EQ(h[i], 0.0f) << x;  // exp(-x) past 88: +inf, so -0
      continue;
    }
    if (std::fabs(want) < std::numeric_limits<float>::min()) continue;
    worst = std::max(worst, std::fabs(h[i] - want) / std::fabs(want));
  }
  std::printf("SiluMul at the best ISA level: worst relative error %.3g (float's ulp: 1.19e-07)\n",
              worst);
  EXPECT_LT(worst, 5e-7);
}

// ExpScaled (the sampler's softmax numerators): exp((x - shift) * scale) within a few ulp of the
// double formula where the result is a normal float, 0 below the range, NaN for NaN, the same bits
// at every ISA level and for every length remainder modulo 8 (specials in the body and the tail).
TEST(ExpScaled, NearTheDefinitionAndTheSameBitsAtEveryIsaLevel) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> specials = {nan, 3.5f, -inf, 1e30f, -1e30f, 3.5f - 87.0f * 0.7f, inf, 0};
  std::vector<float> x = specials;
  for (float v = -150.0f; v <= 3.5f; v += 0.0071f) x.push_back(v);
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0, 2.5);
  for (int i = 0; i < 20000; ++i) x.push_back(std::min(nd(rng), 3.5f));
  for (float v : specials) x.push_back(v);
  const float shift = 3.5f, scale = 1.0f / 0.7f;
  const std::vector<float> y = SameBitsAtEveryIsaLevel(
      static_cast<int64_t>(x.size()),
      [&](int64_t n, float* out) { ExpScaled(x.data(), n, shift, scale, out); });
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    // (the argument rounded to float as the definition says; exp's own error is what is left)
    const float af = (x[i] - shift) * scale;
    const double a = af;
    if (std::isnan(a)) {
      EXPECT_TRUE(std::isnan(y[i])) << x[i];
      continue;
    }
    if (a < -87.0) {
      EXPECT_EQ(y[i], 0.0f) << x[i];  // 0 below the range (the sampler counts on it)
      continue;
    }
    const double want = std::exp(a);
    if (want > 1e38 || want < std::numeric_limits<float>::min()) continue;
    worst = std::max(worst, std::fabs(y[i] - want) / want);
  }
  std::printf("ExpScaled: worst relative error %.3g (float's ulp: 1.19e-07)\n", worst);
  EXPECT_LT(worst, 5e-7);
  EXPECT_EQ(y[1], 1.0f);  // exp(0): the sampler's largest numerator is exactly 1
}

TEST(Rope, YarnFrequenciesOfTheTinyPreset) {
  // dim 16, theta 1e4, original length 128, factor 4, beta 32/1: low = max(floor(-0.39), 0) = 0,
  // high = min(ceil(2.62), 15) = 3, so ramp_j = min(j / 3, 1).
  const RopeParams c = TinyRope();
  const std::vector<double> f = RopeInverseFrequencies(c);
  ASSERT_EQ(f.size(), 8u);
  for (int j = 0; j < 8; ++j) {
    const double base = std::pow(10000.0, -2.0 * j / 16);
    const double ramp = std::min(j / 3.0, 1.0);
    EXPECT_NEAR(f[j], base / 4 * ramp + base * (1 - ramp), 1e-12) << j;
  }
}

TEST(Rope, DeinterleavedRotationKeepsPairwiseDotProducts) {
  // q.k after RoPE must equal the sum over checkpoint pairs rotated by p * f_j.
  const RopeParams c = TinyRope();
  RopeTable table(c);
  const std::vector<double> f = RopeInverseFrequencies(c);
  const auto q = Random(16, 5), k = Random(16, 6);
  for (int pq : {0, 3, 200}) {
    for (int pk : {0, 1, 150}) {
      std::vector<float> rq(16), rk(16);
      table.Apply(q.data(), pq, rq.data());
      table.Apply(k.data(), pk, rk.data());
      double got = 0, want = 0;
      for (int i = 0; i < 16; ++i) got += double(rq[i]) * rk[i];
      for (int j = 0; j < 8; ++j) {
        const double aq = pq * f[j], ak = pk * f[j];
        const double q0 = q[2 * j] * std::cos(aq) - q[2 * j + 1] * std::sin(aq);
        const double q1 = q[2 * j + 1] * std::cos(aq) + q[2 * j] * std::sin(aq);
        const double k0 = k[2 * j] * std::cos(ak) - k[2 * j + 1] * std::sin(ak);
        const double k1 = k[2 * j + 1] * std::cos(ak) + k[2 * j] * std::sin(ak);
        want += q0 * k0 + q1 * k1;
      }
      EXPECT_NEAR(got, want, 1e-3) << pq << " " << pk;
    }
  }
}

TEST(Mla, AbsorbedEqualsNaiveContiguousAndPaged) {
  MlaParams p;
  p.num_heads = 3;
  p.nope_dim = 8;
  p.rope_dim = 4;
  p.v_dim = 6;
  p.latent_rank = 10;
  p.softmax_scale = 0.3f;
  const auto kv_b = Random(3 * (8 + 6) * 10, 7);
  p.kv_b = kv_b.data();
  const int64_t ctx = 9, t = 4, pos0 = ctx - t;
  const auto cache = Random(ctx * 14, 8);
  const auto q = Random(t * 3 * 12, 9);
  // The same rows contiguous (one block) and paged in blocks of 2 rows scattered in memory.
  const float* whole = cache.data();
  const LatentRows contiguous{&whole, 1 << 20};
  std::vector<std::vector<float>> block_store;
  std::vector<const float*> block_ptrs;
  for (int64_t first = 0; first < ctx; first += 2) {
    block_store.emplace_back(cache.begin() + first * 14,
                             cache.begin() + std::min(ctx, first + 2) * 14);
    block_store.back().resize(2 * 14);
  }
  for (const auto& b : block_store) block_ptrs.push_back(b.data());
  const LatentRows paged{block_ptrs.data(), 2};
  std::vector<float> a(t * 3 * 6), b(t * 3 * 6), c(t * 3 * 6), d(t * 3 * 6), scratch;
  MlaAttentionNaive(p, q.data(), t, contiguous, ctx, pos0, a.data(), &scratch);
  MlaAttentionAbsorbed(p, q.data(), t, contiguous, ctx, pos0, b.data(), &scratch);
  MlaAttentionNaive(p, q.data(), t, paged, ctx, pos0, c.data(), &scratch);
  MlaAttentionAbsorbed(p, q.data(), t, paged, ctx, pos0, d.data(), &scratch);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_NEAR(a[i], b[i], 1e-4) << i;
    EXPECT_NEAR(a[i], c[i], 1e-5) << i;
    EXPECT_NEAR(a[i], d[i], 1e-4) << i;
  }
}

// kv_b held as bf16 bits (as a bf16 checkpoint stores it) gives exactly the outputs of its fp32
// upcast in every form: naive, absorbed (invariant spans and BLAS), batched decode; at every ISA
// level of the invariant products, with r and dv off every tile width (the column and row tails).
TEST(Mla, Bf16KvBGivesTheBitsOfItsFp32Upcast) {
  MlaParams p;
  const int64_t h = 4, dn = 16, dr = 8, dv = 20, r = 70, lc = r + dr, ctx = 300, t = 3;
  p.num_heads = h;
  p.nope_dim = dn;
  p.rope_dim = dr;
  p.v_dim = dv;
  p.latent_rank = r;
  p.softmax_scale = 0.2f;
  const auto wf = Random(h * (dn + dv) * r, 17);
  std::vector<uint16_t> kv_b_bf16(wf.size());
  FloatToBf16N(wf.data(), wf.size(), kv_b_bf16.data());
  std::vector<float> up(wf.size());
  Bf16ToFloatN(kv_b_bf16.data(), up.size(), up.data());
  MlaParams pb = p;
  p.kv_b = up.data();
  pb.kv_b_bf16 = kv_b_bf16.data();
  const auto cache = Random(ctx * lc, 18);
  const auto q = Random(t * h * (dn + dr), 19);
  const float* whole = cache.data();
  const LatentRows rows{&whole, 1 << 20};
  const int64_t ctxs[t] = {ctx, ctx - 100, 1};
  const LatentRows caches[t] = {rows, rows, rows};
  std::vector<float> want(t * h * dv), got(want.size()), scratch;
  MlaAttentionNaive(p, q.data(), t, rows, ctx, ctx - t, want.data(), &scratch);
  MlaAttentionNaive(pb, q.data(), t, rows, ctx, ctx - t, got.data(), &scratch);
  EXPECT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size())) << "naive";
  for (int level : {2, 1, 0, -1}) {
    const int used = SetGemmIsaForTesting(level);
    for (KernelMode mode : {KernelMode::kInvariant, KernelMode::kBlas}) {
      SetKernelMode(mode);
      const std::string what = std::string(KernelModeName(mode)) + " isa " + std::to_string(used);
      MlaAttentionAbsorbed(p, q.data(), t, rows, ctx, ctx - t, want.data(), &scratch);
      MlaAttentionAbsorbed(pb, q.data(), t, rows, ctx, ctx - t, got.data(), &scratch);
      EXPECT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size())) << "absorbed " << what;
      MlaDecodeAbsorbedBatch(p, q.data(), t, caches, ctxs, want.data(), &scratch);
      MlaDecodeAbsorbedBatch(pb, q.data(), t, caches, ctxs, got.data(), &scratch);
      EXPECT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size()))
          << "batched decode " << what;
    }
  }
  SetKernelMode(KernelMode::kInvariant);
}

// Calls of at most 4 queries read each head's kv_b rows with plain loads before its products
// (PullKvBRows). That must change no bit: every output memcmp'd with and without it, for fp32 and
// bf16 kv_b, 1 to 4 queries, in one pass per head group (attend mode 3) and in separate passes
// (mode 2); 37 kv_b rows of 70 values per head (bf16 heads start 5180 bytes apart: not 8-byte
// aligned; rows not multiples of the pull's 32-byte step). The pull of the last head ends at
// kv_b's last byte, so under ASan a pull one step too long fails here.
TEST(Mla, PullingKvBRowsBeforeTheProductsChangesNoBit) {
  MlaParams p;
  const int64_t h = 5, dn = 16, dr = 8, dv = 21, r = 70, lc = r + dr, ctx = 300;
  p.num_heads = h;
  p.nope_dim = dn;
  p.rope_dim = dr;
  p.v_dim = dv;
  p.latent_rank = r;
  p.softmax_scale = 0.2f;
  const auto wf = Random(h * (dn + dv) * r, 31);
  std::vector<uint16_t> kv_b_bf16(wf.size());
  FloatToBf16N(wf.data(), wf.size(), kv_b_bf16.data());
  MlaParams pb = p;
  p.kv_b = wf.data();
  pb.kv_b_bf16 = kv_b_bf16.data();
  const auto cache = Random(ctx * lc, 32);
  const auto q = Random(4 * h * (dn + dr), 33);
  const float* whole = cache.data();
  const LatentRows rows{&whole, 1 << 20};
  const std::vector<LatentRows> caches(4, rows);
  const int64_t ctxs[4] = {200, 17, 1, 256};  // one span each
  std::vector<float> off(4 * h * dv), on(off.size()), scratch;
  for (int mode : {3, 2}) {
    SetMlaAttendModeForTesting(mode);
    for (const MlaParams* kvb : {&p, &pb}) {
      for (int64_t t = 1; t <= 4; ++t) {
        SetMlaPullForTesting(false);
        MlaDecodeAbsorbedBatch(*kvb, q.data(), t, caches.data(), ctxs, off.data(), &scratch);
        SetMlaPullForTesting(true);
        MlaDecodeAbsorbedBatch(*kvb, q.data(), t, caches.data(), ctxs, on.data(), &scratch);
        EXPECT_EQ(0, std::memcmp(off.data(), on.data(), 4 * static_cast<size_t>(t * h * dv)))
            << (kvb == &pb ? "bf16" : "fp32") << " kv_b, " << t << " queries, mode " << mode;
      }
    }
  }
  SetMlaAttendModeForTesting(0);
}

// The absorbed form against MLA computed in double from its definition (k_nope and v expanded
// through kv_b, softmax over rows 0..pos), at contexts that cross many spans (span length 256,
// and 7), paged in blocks of 5 rows, with every split of the work. 10 heads: with 2 threads the
// call's own choice cuts 3 spans into 2 head groups, and 3 groups asked are 4 + 4 + 2 heads.
TEST(Mla, AbsorbedSpansMatchTheDefinitionInDouble) {
  MlaParams p;
  const int64_t h = 10, dn = 16, dr = 8, dv = 12, r = 32, qd = dn + dr, lc = r + dr, bt = 5;
  p.num_heads = h;
  p.nope_dim = dn;
  p.rope_dim = dr;
  p.v_dim = dv;
  p.latent_rank = r;
  p.softmax_scale = 0.25f;
  const auto kv_b = Random(static_cast<size_t>(h * (dn + dv) * r), 21);
  p.kv_b = kv_b.data();
  const int64_t ctx = 600, t = 3, pos0 = ctx - t;
  const auto rows = Random(static_cast<size_t>(ctx * lc), 22);
  const auto q = Random(static_cast<size_t>(t * h * qd), 23);
  std::vector<double> want(static_cast<size_t>(t * h * dv));
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t hd = 0; hd < h; ++hd) {
      const float* qi = q.data() + (i * h + hd) * qd;
      const float* wk = kv_b.data() + hd * (dn + dv) * r;
      const float* wv = wk + dn * r;
      std::vector<double> s(static_cast<size_t>(pos0 + i + 1));
      double mx = -1e300;
      for (int64_t u = 0; u <= pos0 + i; ++u) {
        const float* c = rows.data() + u * lc;
        double dot = 0;
        for (int64_t d = 0; d < dn; ++d) {
          double k = 0;
          for (int64_t j = 0; j < r; ++j) k += double(wk[d * r + j]) * c[j];
          dot += qi[d] * k;
        }
        for (int64_t d = 0; d < dr; ++d) dot += double(qi[dn + d]) * c[r + d];
        s[static_cast<size_t>(u)] = dot * p.softmax_scale;
        mx = std::max(mx, s[static_cast<size_t>(u)]);
      }
      double sum = 0;
      for (double& v : s) sum += (v = std::exp(v - mx));
      for (int64_t d = 0; d < dv; ++d) {
        double o = 0;
        for (int64_t u = 0; u <= pos0 + i; ++u) {
          double v = 0;
          for (int64_t j = 0; j < r; ++j) v += double(wv[d * r + j]) * rows[u * lc + j];
          o += s[static_cast<size_t>(u)] / sum * v;
        }
        want[static_cast<size_t>((i * h + hd) * dv + d)] = o;
      }
    }
  }
  std::vector<std::vector<float>> store;
  std::vector<const float*> ptrs;
  for (int64_t first = 0; first < ctx; first += bt) {
    store.emplace_back(rows.begin() + first * lc, rows.begin() + (first + bt) * lc);
  }
  for (const auto& b : store) ptrs.push_back(b.data());
  const LatentRows paged{ptrs.data(), bt};
  double scale = 0;
  for (double v : want) scale = std::max(scale, std::fabs(v));
  for (int64_t span : {256, 7}) {
    SetMlaSpanForTesting(span);
    // 3: spans side by side, in 3 head groups; 4: a task per head group in one pass (3 groups)
    for (int mode : {0, 1, 2, 3, 4}) {
      SetMlaAttendModeForTesting(mode == 4 ? 3 : std::min(mode, 2));
      SetMlaHeadGroupsForTesting(mode >= 3 ? 3 : 0);
      std::vector<float> got(want.size()), scratch;
      MlaAttentionAbsorbed(p, q.data(), t, paged, ctx, pos0, got.data(), &scratch);
      for (size_t i = 0; i < want.size(); ++i) {
        EXPECT_NEAR(got[i], want[i], 2e-5 * scale)
            << "span " << span << " mode " << mode << " " << i;
      }
    }
  }
  SetMlaSpanForTesting(0);
  SetMlaAttendModeForTesting(0);
  SetMlaHeadGroupsForTesting(0);
  // No queries: nothing to do (and no division by the query count).
  std::vector<float> scratch;
  MlaDecodeAbsorbedBatch(p, nullptr, 0, nullptr, nullptr, nullptr, &scratch);
  MlaAttentionAbsorbed(p, nullptr, 0, paged, 0, 0, nullptr, &scratch);
  // A query with no rows (ctx 0; not a valid call): zeros, no crash.
  const int64_t zero = 0;
  std::vector<float> o(static_cast<size_t>(h * dv), 1.0f);
  MlaDecodeAbsorbedBatch(p, q.data(), 1, &paged, &zero, o.data(), &scratch);
  for (float v : o) EXPECT_EQ(v, 0.0f);
}

}  // namespace
}  // namespace dmoe::cpu

namespace dmoe::cpu {
namespace {

TEST(SmallMLinear, MatchesSgemmPathAndDoubleLoops) {
  for (int64_t m : {1, 2, 3, 8}) {
    for (int64_t k : {8, 13, 64}) {
      const int64_t n = 7;  // not a multiple of the 4-row block
      const auto x = Random(m * k, m * 100 + k), w = Random(n * k, k);
      std::vector<float> y(m * n, 1.0f), acc(m * n, 1.0f);
      SmallMLinear(x.data(), m, k, w.data(), n, y.data(), false);
      SmallMLinear(x.data(), m, k, w.data(), n, acc.data(), true);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t o = 0; o < n; ++o) {
          double s = 0;
          for (int64_t j = 0; j < k; ++j) s += double(x[i * k + j]) * w[o * k + j];
          EXPECT_NEAR(y[i * n + o], s, 1e-4) << m << " " << k;
          EXPECT_NEAR(acc[i * n + o], s + 1.0, 1e-4) << m << " " << k;
        }
      }
    }
  }
}

}  // namespace
}  // namespace dmoe::cpu

namespace dmoe::cpu {
namespace {

// The pool's counters (engine_bench's "kernel pool per step" line): passes and chunks of the calls
// that ran over the workers, none while off; a call with one chunk runs inline, uncounted.
TEST(KernelPool, CountsPassesAndChunksOnlyWhileAsked) {
  KernelPool& pool = ThePool();
  std::atomic<int> ran{0};
  pool.RunEach(4, [&](int) { ran.fetch_add(1); });  // not counting yet
  pool.CountStats(true);
  for (int i = 0; i < 3; ++i) pool.RunEach(4, [&](int) { ran.fetch_add(1); });
  pool.RunEach(1, [&](int) { ran.fetch_add(1); });
  const PoolStats s = pool.stats();
  pool.CountStats(false);
  EXPECT_EQ(ran.load(), 17);
  const uint64_t pooled = pool.size() > 1 ? 3 : 0;  // one thread: every call runs inline
  EXPECT_EQ(s.passes, pooled);
  EXPECT_EQ(s.chunks, 4 * pooled);
  pool.RunEach(4, [&](int) { ran.fetch_add(1); });
  EXPECT_EQ(pool.stats().passes, 0u);  // zeroed by CountStats(false), and nothing counted since
}

}  // namespace
}  // namespace dmoe::cpu
