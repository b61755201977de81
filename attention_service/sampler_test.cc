#include "attention_service/sampler.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/invariant_gemm.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

// Draws n tokens; returns their frequencies.
std::vector<double> Frequencies(SamplingParams p, const std::vector<float>& logits, int n) {
  Sampler s(p, {});
  std::vector<double> f(logits.size(), 0);
  for (int i = 0; i < n; ++i) f[s.Sample(logits.data(), logits.size()).token] += 1.0 / n;
  return f;
}

// Softmax(logits / t) in double, restricted to `keep` (others 0) and renormalized.
std::vector<double> Expected(const std::vector<float>& logits, double t, std::vector<bool> keep) {
  std::vector<double> p(logits.size());
  double z = 0;
  for (size_t i = 0; i < p.size(); ++i) z += p[i] = keep[i] ? std::exp(logits[i] / t) : 0;
  for (double& v : p) v /= z;
  return p;
}

void ExpectClose(const std::vector<double>& got, const std::vector<double>& want, int n) {
  for (size_t i = 0; i < got.size(); ++i) {
    const double sigma = std::sqrt(std::max(want[i] * (1 - want[i]), 1e-12) / n);
    EXPECT_NEAR(got[i], want[i], 5 * sigma + 1e-9) << "token " << i;
  }
}

// ln of [0.5, 0.3, 0.15, 0.05]: at temperature 1 these are the probabilities.
const std::vector<float> kLogits = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                    std::log(0.05f)};

TEST(Sampler, GreedyTakesTheLowestIdAmongTies) {
  Sampler s(SamplingParams{}, {});
  const std::vector<float> l = {1.0f, 3.0f, 2.0f, 3.0f};
  EXPECT_EQ(s.Sample(l.data(), 4).token, 1);
  SamplingParams k1;
  k1.temperature = 5;
  k1.top_k = 1;
  EXPECT_EQ(Sampler(k1, {}).Sample(l.data(), 4).token, 1);
}

// Greedy takes ArgMax; top logprobs come from their own pass (a short ranked list): the same token
// and logprob bits with and without them, the token first among them, over random logits with
// many ties, with and without a logit bias and penalties, over 64 steps of one request.
TEST(Sampler, GreedyTokensDoNotDependOnTopLogprobs) {
  std::mt19937 rng(8);
  const int64_t vocab = 300;
  for (const bool penalties : {false, true}) {
    SamplingParams fast;
    fast.logprobs = true;
    if (penalties) {
      fast.logit_bias = {{5, 2.0f}, {17, -1.0f}};
      fast.repetition_penalty = 1.3;
      fast.frequency_penalty = 0.5;
    }
    SamplingParams sorting = fast;
    sorting.top_logprobs = 1;
    Sampler a(fast, {1, 2, 3}), b(sorting, {1, 2, 3});
    for (int step = 0; step < 64; ++step) {
      std::vector<float> l(static_cast<size_t>(vocab));
      for (float& x : l) x = static_cast<float>(static_cast<int>(rng() % 7)) * 0.5f;
      const SampledToken x = a.Sample(l.data(), vocab), y = b.Sample(l.data(), vocab);
      ASSERT_EQ(x.token, y.token) << "step " << step;
      ASSERT_EQ(std::memcmp(&x.logprob, &y.logprob, 4), 0) << "step " << step;
      EXPECT_TRUE(x.top.empty());
      ASSERT_EQ(y.top.size(), 1u);
      EXPECT_EQ(y.top[0].first, y.token);
      EXPECT_EQ(std::memcmp(&y.top[0].second, &y.logprob, 4), 0);
    }
  }
}

// ArgMax (vectorized where the CPU has AVX2) is the first index of the largest value, as the
// plain loop defines it: ties, -0 beside +0, -inf, NaNs anywhere (never chosen; a NaN first
// keeps index 0), every length from 1 to 70 and a vocabulary's.
TEST(Sampler, ArgMaxIsTheFirstLargestValue) {
  auto plain = [](const std::vector<float>& v) {
    size_t best = 0;
    for (size_t i = 1; i < v.size(); ++i) {
      if (v[i] > v[best]) best = i;
    }
    return static_cast<int32_t>(best);
  };
  std::mt19937 rng(3);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> specials = {nan, -inf, inf, -0.0f, 0.0f, 1.0f, 1.0f, -1.0f};
  for (int64_t n : {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 64, 70, 32000}) {
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<float> v(static_cast<size_t>(n));
      // few distinct values, so that ties are common
      for (float& x : v) x = static_cast<float>(static_cast<int>(rng() % 5)) - 2.0f;
      const int sprinkle = static_cast<int>(rng() % 4);
      for (int j = 0; j < sprinkle; ++j) {
        v[rng() % v.size()] = specials[rng() % specials.size()];
      }
      if (trial % 10 == 0) v[0] = nan;
      if (trial % 10 == 1) std::fill(v.begin(), v.end(), -inf);
      if (trial % 10 == 2) {
        std::fill(v.begin(), v.end(), -0.0f);
        v.back() = 0.0f;
      }
      ASSERT_EQ(ArgMax(v.data(), n), plain(v)) << "n " << n << " trial " << trial;
    }
  }
}

TEST(Sampler, TemperatureFollowsTheSoftmax) {
  SamplingParams p;
  p.temperature = 0.7;
  p.seed = 1;
  const int n = 200000;
  ExpectClose(Frequencies(p, kLogits, n), Expected(kLogits, 0.7, {true, true, true, true}), n);
}

TEST(Sampler, TopKTopPAndMinPTruncate) {
  const int n = 100000;
  SamplingParams k;
  k.temperature = 1;
  k.top_k = 2;
  ExpectClose(Frequencies(k, kLogits, n), Expected(kLogits, 1, {true, true, false, false}), n);
  SamplingParams tp;
  tp.temperature = 1;
  tp.top_p = 0.6;  // 0.5 < 0.6 <= 0.5 + 0.3: the first two
  ExpectClose(Frequencies(tp, kLogits, n), Expected(kLogits, 1, {true, true, false, false}), n);
  tp.top_p = 0.85;  // 0.8 < 0.85 <= 0.95: the first three
  ExpectClose(Frequencies(tp, kLogits, n), Expected(kLogits, 1, {true, true, true, false}), n);
  SamplingParams mp;
  mp.temperature = 1;
  mp.min_p = 0.5;  // keep p >= 0.25
  ExpectClose(Frequencies(mp, kLogits, n), Expected(kLogits, 1, {true, true, false, false}), n);
}

// The kept set by the documented rules, from a full ranking in double: the first top_k tokens by
// (logit descending, id ascending), of those the shortest prefix whose mass reaches top_p of
// theirs, of those the ones with p >= min_p * p(max). *ambiguous when a rule's edge is within
// 1e-5 (relative) of a token, where float and double may part.
std::vector<bool> ReferenceKept(const std::vector<float>& l, const SamplingParams& p,
                                std::vector<double>* prob, bool* ambiguous) {
  const int64_t v = static_cast<int64_t>(l.size());
  std::vector<int32_t> order(static_cast<size_t>(v));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](int32_t a, int32_t b) { return l[a] != l[b] ? l[a] > l[b] : a < b; });
  const double mx = l[order[0]];
  std::vector<double> w(static_cast<size_t>(v));
  for (int64_t i = 0; i < v; ++i) w[i] = std::exp((l[i] - mx) / p.temperature);
  int64_t n = p.top_k > 0 ? std::min(v, p.top_k) : v;
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += w[order[j]];
  *ambiguous = false;
  if (p.top_p < 1.0) {
    double acc = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double before = acc;
      acc += w[order[j]];
      if (acc >= p.top_p * s) {
        *ambiguous =
            std::fabs(acc - p.top_p * s) < 1e-5 * s || std::fabs(before - p.top_p * s) < 1e-5 * s;
        n = j + 1;
        break;
      }
    }
  }
  std::vector<bool> kept(static_cast<size_t>(v), false);
  double z = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double x = w[order[j]];
    if (p.min_p > 0 && std::fabs(x - p.min_p) < 1e-5) *ambiguous = true;
    if (x >= p.min_p) {
      kept[order[j]] = true;
      z += x;
    }
  }
  prob->assign(static_cast<size_t>(v), 0.0);
  for (int64_t i = 0; i < v; ++i) (*prob)[i] = kept[i] ? w[i] / z : 0.0;
  return kept;
}

// Temperature with top_k / top_p / min_p over vocabularies up to V2's, logits with many ties and
// peaked ones: every drawn token is in the reference's kept set, every kept token of p >= 0.03
// is drawn (a prefix cut short would miss it), and small sets follow the truncated softmax.
TEST(Sampler, TruncationKeepsTheReferencePrefix) {
  std::mt19937 rng(21);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  int checked = 0, frequencies = 0;
  for (const int64_t vocab : {7, 300, 5000, 102400}) {
    for (int shape = 0; shape < 2; ++shape) {
      std::vector<float> l(static_cast<size_t>(vocab));
      for (float& x : l) x = shape == 0 ? std::round(nd(rng) * 2.0f) / 2.0f : nd(rng);
      if (shape == 1) {  // a few dozen tokens well above the body, some of them tied
        for (int j = 0; j < 30; ++j) l[rng() % vocab] = 9.0f + static_cast<float>(j % 10) * 0.25f;
      }
      for (const double t : {0.6, 1.5}) {
        for (const int64_t k : {0, 3, 40}) {
          for (const double top_p : {1.0, 0.9, 0.5}) {
            for (const double min_p : {0.0, 0.1}) {
              // (V2's vocabulary: the cases where the candidate list matters, fewer draws)
              if (vocab > 5000 && (k == 3 || top_p == 0.5 || t < 1)) continue;
              SamplingParams p;
              p.temperature = t;
              p.top_k = k;
              p.top_p = top_p;
              p.min_p = min_p;
              p.seed = rng();
              std::vector<double> prob;
              bool ambiguous = false;
              const std::vector<bool> kept = ReferenceKept(l, p, &prob, &ambiguous);
              if (ambiguous) continue;
              ++checked;
              Sampler s(p, {});
              const int n = vocab <= 300 ? 3000 : 300;
              std::vector<double> got(static_cast<size_t>(vocab), 0.0);
              for (int i = 0; i < n; ++i) {
                const int32_t id = s.Sample(l.data(), vocab).token;
                ASSERT_TRUE(kept[id])
                    << "vocab " << vocab << " shape " << shape << " t " << t << " k " << k
                    << " top_p " << top_p << " min_p " << min_p << ": drew " << id;
                got[id] += 1.0 / n;
              }
              for (int64_t i = 0; i < vocab; ++i) {
                if (prob[i] >= 0.03) {
                  EXPECT_GT(got[i], 0.0)
                      << "vocab " << vocab << " t " << t << " k " << k << " top_p " << top_p
                      << " min_p " << min_p << ": never drew " << i << " (p " << prob[i] << ")";
                }
              }
              if (vocab <= 300) {  // each token of p >= 1e-3, and the rest pooled
                ++frequencies;
                double rest_got = 0, rest_want = 0;
                for (int64_t i = 0; i < vocab; ++i) {
                  if (prob[i] >= 1e-3) {
                    const double sigma = std::sqrt(prob[i] * (1 - prob[i]) / n);
                    EXPECT_NEAR(got[i], prob[i], 5 * sigma + 1e-9) << "token " << i;
                  } else {
                    rest_got += got[i];
                    rest_want += prob[i];
                  }
                }
                EXPECT_NEAR(rest_got, rest_want, 5 * std::sqrt(rest_want / n) + 2.0 / n);
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 120);  // (few cases sit on an edge)
  EXPECT_GT(frequencies, 70);
}

// The vector helpers (sums, thresholds, top logprobs, ArgMax) give their scalar forms' results:
// the same tokens and logprob bits with the kernels' ISA level capped at portable, over settings
// that take every path (untruncated blocks, top-k, top-p, min-p, logprobs, greedy).
TEST(Sampler, SameTokensAtEveryIsaLevel) {
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.0f, 2.5f);
  std::vector<float> l(5003);
  for (float& x : l) x = nd(rng);
  for (int j = 0; j < 20; ++j) l[rng() % l.size()] = 8.0f + 0.3f * static_cast<float>(j);
  std::vector<SamplingParams> settings(5);
  settings[0].temperature = 1.0;
  settings[1].temperature = 0.8;
  settings[1].top_k = 40;
  settings[2].temperature = 0.7;
  settings[2].top_p = 0.9;
  settings[3].temperature = 1.2;
  settings[3].min_p = 0.05;
  settings[4].logprobs = true;  // greedy
  for (SamplingParams& p : settings) {
    p.seed = 11;
    p.top_logprobs = 5;
  }
  auto draw = [&](const SamplingParams& p) {
    Sampler s(p, {});
    std::vector<SampledToken> out;
    for (int i = 0; i < 200; ++i) out.push_back(s.Sample(l.data(), static_cast<int64_t>(l.size())));
    return out;
  };
  const int top = cpu::SetGemmIsaForTesting(-1);
  for (const SamplingParams& p : settings) {
    const std::vector<SampledToken> best = draw(p);
    ASSERT_EQ(cpu::SetGemmIsaForTesting(0), 0);
    const std::vector<SampledToken> portable = draw(p);
    cpu::SetGemmIsaForTesting(-1);
    for (size_t i = 0; i < best.size(); ++i) {
      ASSERT_EQ(best[i].token, portable[i].token) << "draw " << i << " (ISA level " << top << ")";
      ASSERT_EQ(std::memcmp(&best[i].logprob, &portable[i].logprob, 4), 0) << i;
      ASSERT_EQ(best[i].top, portable[i].top) << i;
    }
  }
}

// Without truncation the draw walks block sums (1024 ids each) and then one block: over 5000
// tokens the frequencies follow the softmax; and degenerate logits never crash or pick an
// impossible token: all equal (top_k / top_p keep the lowest ids), one +inf, NaNs beside finite
// values, temperatures of 1e-4 and 100.
TEST(Sampler, UntruncatedBlocksAndDegenerateLogits) {
  std::mt19937 rng(6);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> l(5000);
  for (float& x : l) x = nd(rng);
  for (int j = 0; j < 12; ++j) l[(j * 997 + 500) % l.size()] = 6.0f + 0.2f * static_cast<float>(j);
  SamplingParams p;
  p.temperature = 1.0;
  p.seed = 3;
  const int n = 20000;
  const std::vector<double> got = Frequencies(p, l, n);
  const std::vector<double> want = Expected(l, 1.0, std::vector<bool>(l.size(), true));
  double rest_got = 0, rest_want = 0;
  for (size_t i = 0; i < l.size(); ++i) {
    if (want[i] >= 1e-3) {
      EXPECT_NEAR(got[i], want[i], 5 * std::sqrt(want[i] * (1 - want[i]) / n)) << "token " << i;
    } else {
      rest_got += got[i];
      rest_want += want[i];
    }
  }
  EXPECT_NEAR(rest_got, rest_want, 5 * std::sqrt(rest_want / n) + 2.0 / n);

  const std::vector<float> equal(1000, 0.5f);
  SamplingParams k;
  k.temperature = 1.0;
  k.top_k = 10;
  Sampler sk(k, {});
  SamplingParams tp;
  tp.temperature = 1.0;
  tp.top_p = 0.5;
  Sampler sp(tp, {});
  for (int i = 0; i < 300; ++i) {
    EXPECT_LT(sk.Sample(equal.data(), 1000).token, 10);
    EXPECT_LT(sp.Sample(equal.data(), 1000).token, 500);
  }
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> odd = {0.0f, 1.0f, nan, 2.0f, nan, -inf, 1.5f, 0.5f, nan, 3.0f};
  for (const double t : {1e-4, 1.0, 100.0}) {
    SamplingParams q;
    q.temperature = t;
    q.top_p = 0.9;
    Sampler s(q, {});
    for (int i = 0; i < 200; ++i) {
      const int32_t id = s.Sample(odd.data(), static_cast<int64_t>(odd.size())).token;
      EXPECT_TRUE(id != 2 && id != 4 && id != 8 && id != 5) << "t " << t << ": drew " << id;
      if (t == 1e-4) {
        EXPECT_EQ(id, 9);
      }
    }
  }
  std::vector<float> with_inf = odd;
  with_inf[7] = inf;
  SamplingParams q;
  q.temperature = 1.0;
  EXPECT_EQ(Sampler(q, {}).Sample(with_inf.data(), 10).token, 7);
}

TEST(Sampler, SeedsAreReproducible) {
  std::vector<float> logits(512);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(i * 0.37f) * 3;
  auto draw = [&](uint64_t seed) {
    SamplingParams p;
    p.temperature = 1.0;
    p.top_p = 0.95;
    p.seed = seed;
    Sampler s(p, {});
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) out.push_back(s.Sample(logits.data(), 512).token);
    return out;
  };
  EXPECT_EQ(draw(7), draw(7));
  EXPECT_NE(draw(7), draw(8));
}

TEST(Sampler, LogprobsAreTheLogSoftmaxOfTheLogits) {
  const std::vector<float> l = {0.5f, -1.0f, 2.0f, 2.0f, 0.0f};
  double z = 0;
  for (float v : l) z += std::exp(double(v));
  SamplingParams p;
  p.logprobs = true;
  p.top_logprobs = 3;
  const SampledToken t = Sampler(p, {}).Sample(l.data(), 5);
  EXPECT_EQ(t.token, 2);
  EXPECT_NEAR(t.logprob, 2.0 - std::log(z), 1e-6);
  ASSERT_EQ(t.top.size(), 3u);
  EXPECT_EQ(t.top[0].first, 2);
  EXPECT_EQ(t.top[1].first, 3);
  EXPECT_EQ(t.top[2].first, 0);
  EXPECT_NEAR(t.top[2].second, 0.5 - std::log(z), 1e-6);
}

TEST(ValidateRequest, NamesTheField) {
  const ModelConfig c = *PresetConfig("tiny");
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  constexpr double kInf = std::numeric_limits<double>::infinity();
  struct Case {
    std::vector<int32_t> prompt;
    SamplingParams p;
    const char* field;
  };
  auto with = [](auto f) {
    SamplingParams p;
    f(p);
    return p;
  };
  const Case cases[] = {
      {{}, SamplingParams{}, "prompt: is empty"},
      {{1, 512}, SamplingParams{}, "prompt[1]: token id 512"},
      {{1},
       with([](SamplingParams& p) { p.max_tokens = 512; }),
       "max_tokens: prompt (1) + max_tokens (512)"},
      {{1}, with([](SamplingParams& p) { p.max_tokens = 0; }), "max_tokens: 0 is not positive"},
      {{1},  // (the sum with the prompt would overflow)
       with([](SamplingParams& p) { p.max_tokens = std::numeric_limits<int64_t>::max(); }),
       "max_tokens: prompt (1) + max_tokens (9223372036854775807)"},
      {{1}, with([](SamplingParams& p) { p.temperature = -0.5; }), "temperature:"},
      {{1}, with([](SamplingParams& p) { p.top_p = 0; }), "top_p: 0 is not in (0, 1]"},
      {{1}, with([](SamplingParams& p) { p.top_p = 1.5; }), "top_p:"},
      {{1}, with([](SamplingParams& p) { p.top_k = -1; }), "top_k: -1 is negative"},
      {{1}, with([](SamplingParams& p) { p.min_p = 2; }), "min_p:"},
      {{1},
       with([](SamplingParams& p) {
         p.stop_token_ids = {3, 900};
       }),
       "stop_token_ids[1]"},
      {{1},
       with([](SamplingParams& p) { p.stop_token_ids.assign(kMaxStopTokenIds + 1, 3); }),
       "stop_token_ids: 1025 ids; at most 1024"},
      {{1},
       with([](SamplingParams& p) { p.presence_penalty = 2.5; }),
       "presence_penalty: 2.5 is not in [-2, 2]"},
      {{1}, with([](SamplingParams& p) { p.frequency_penalty = -3; }), "frequency_penalty: -3"},
      {{1}, with([](SamplingParams& p) { p.frequency_penalty = kNaN; }), "frequency_penalty:"},
      {{1}, with([](SamplingParams& p) { p.presence_penalty = kInf; }), "presence_penalty:"},
      {{1}, with([](SamplingParams& p) { p.repetition_penalty = 0; }), "repetition_penalty: 0"},
      {{1}, with([](SamplingParams& p) { p.repetition_penalty = kInf; }), "repetition_penalty:"},
      {{1}, with([](SamplingParams& p) { p.repetition_penalty = kNaN; }), "repetition_penalty:"},
      {{1},
       with([](SamplingParams& p) {
         p.logit_bias = {{3, 1.0f}, {512, 1.0f}};
       }),
       "logit_bias: token id 512 is outside the vocabulary"},
      {{1},
       with([](SamplingParams& p) {
         p.logit_bias = {{-1, 1.0f}};
       }),
       "logit_bias: token id -1 is outside the vocabulary"},
      {{1},
       with([](SamplingParams& p) {
         p.logit_bias = {{3, 100.5f}};
       }),
       "logit_bias[3]: 100.5 is not in [-100, 100]"},
      {{1},
       with([](SamplingParams& p) {
         p.logit_bias = {{3, float(kNaN)}};
       }),
       "logit_bias[3]"},
  };
  for (const Case& k : cases) {
    const absl::Status st = ValidateRequest(k.prompt, k.p, c);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << k.field;
    EXPECT_NE(st.message().find(k.field), absl::string_view::npos) << st;
  }
  EXPECT_TRUE(ValidateRequest({1, 2, 3}, SamplingParams{}, c).ok());
  SamplingParams edges;
  edges.presence_penalty = -2;
  edges.frequency_penalty = 2;
  edges.repetition_penalty = 0.5;
  edges.logit_bias = {{0, -100.0f}, {511, 100.0f}};
  EXPECT_TRUE(ValidateRequest({1, 2, 3}, edges, c).ok());
}

// log-softmax of `x` at `id`, in double: the golden logprob of processed logits.
double LogSoftmax(const std::vector<double>& x, int id) {
  double z = 0;
  for (double v : x) z += std::exp(v);
  return x[static_cast<size_t>(id)] - std::log(z);
}

SamplingParams Greedy() {
  SamplingParams p;
  p.logprobs = true;
  p.top_logprobs = 4;
  return p;
}

// Every top logprob (all 4 tokens) matches the log-softmax of `want`.
void ExpectProcessed(const SampledToken& t, const std::vector<double>& want) {
  ASSERT_EQ(t.top.size(), want.size());
  EXPECT_NEAR(t.logprob, LogSoftmax(want, t.token), 1e-5);
  for (const auto& [id, lp] : t.top) EXPECT_NEAR(lp, LogSoftmax(want, id), 1e-5) << "token " << id;
}

TEST(Sampler, LogitBiasForcesAndExcludesTokens) {
  const std::vector<float> l = {1.0f, 3.0f, 2.0f, 0.5f};
  SamplingParams force = Greedy();
  force.logit_bias = {{0, 2.5f}};  // 1 + 2.5 = 3.5 > 3
  const SampledToken forced = Sampler(force, {}).Sample(l.data(), 4);
  EXPECT_EQ(forced.token, 0);
  ExpectProcessed(forced, {3.5, 3.0, 2.0, 0.5});

  SamplingParams ban = Greedy();
  ban.logit_bias = {{1, -100.0f}};
  const SampledToken banned = Sampler(ban, {}).Sample(l.data(), 4);
  EXPECT_EQ(banned.token, 2);
  ExpectProcessed(banned, {1.0, -97.0, 2.0, 0.5});

  // Sampled: a -100 bias leaves the token a probability of about e^-100.
  SamplingParams t;
  t.temperature = 1;
  t.seed = 5;
  t.logit_bias = {{0, -100.0f}};
  const std::vector<double> f = Frequencies(t, kLogits, 20000);
  EXPECT_EQ(f[0], 0.0);
  ExpectClose(f, Expected(kLogits, 1, {false, true, true, true}), 20000);
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogits) {
  // Prompt tokens 0 (positive logit) and 2 (negative), r = 2.
  const std::vector<float> l = {2.0f, 1.5f, -1.0f, -0.5f};
  SamplingParams p = Greedy();
  p.repetition_penalty = 2;
  Sampler s(p, {0, 2, 0});
  const SampledToken first = s.Sample(l.data(), 4);
  EXPECT_EQ(first.token, 1);  // 2 / 2 = 1 < 1.5: the unpenalized greedy choice (0) flips
  ExpectProcessed(first, {1.0, 1.5, -2.0, -0.5});
  const SampledToken second = s.Sample(l.data(), 4);  // 1 was generated: penalized too
  EXPECT_EQ(second.token, 0);
  ExpectProcessed(second, {1.0, 0.75, -2.0, -0.5});

  // Negative logits move away from zero: -1 * 2 = -2 < -1.2.
  const std::vector<float> neg = {-1.0f, -1.2f, -3.0f, -4.0f};
  const SampledToken t = Sampler(p, {0}).Sample(neg.data(), 4);
  EXPECT_EQ(t.token, 1);
  ExpectProcessed(t, {-2.0, -1.2, -3.0, -4.0});
}

TEST(Sampler, FrequencyCountsRepeatsAndPresenceCountsOnce) {
  // f = 1, p = 0.5: a token generated n > 0 times loses n * f + p. The prompt (all token 0)
  // does not count.
  const std::vector<float> l = {5.0f, 4.0f, 0.0f, 0.0f};
  SamplingParams p = Greedy();
  p.frequency_penalty = 1;
  p.presence_penalty = 0.5;
  Sampler s(p, {0, 0, 0});
  const std::vector<std::pair<int32_t, std::vector<double>>> steps = {
      {0, {5.0, 4.0, 0, 0}}, {1, {3.5, 4.0, 0, 0}},  // 0 once: 5 - 1 - 0.5
      {0, {3.5, 2.5, 0, 0}},                         // 1 once
      {0, {2.5, 2.5, 0, 0}},  // 0 twice: 5 - 2 - 0.5; a tie goes to the lower id
      {1, {1.5, 2.5, 0, 0}},  // 0 three times
  };
  for (size_t i = 0; i < steps.size(); ++i) {
    SCOPED_TRACE(i);
    const SampledToken t = s.Sample(l.data(), 4);
    EXPECT_EQ(t.token, steps[i].first);
    ExpectProcessed(t, steps[i].second);
  }
}

TEST(Sampler, PenaltiesOffChangeNothing) {
  std::vector<float> logits(512);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(i * 0.37f) * 3;
  SamplingParams base;
  base.temperature = 1.0;
  base.seed = 11;
  base.logprobs = true;
  base.top_logprobs = 5;
  SamplingParams off = base;  // every penalty at its "off" value, with a prompt to repeat
  off.repetition_penalty = 1;
  off.frequency_penalty = 0;
  off.presence_penalty = 0;
  SamplingParams zero_bias = base;  // takes the copying path; adding 0 changes no logit
  zero_bias.logit_bias = {{7, 0.0f}, {300, 0.0f}};
  Sampler want(base, {});
  Sampler got_off(off, {1, 2, 3, 1});
  Sampler got_bias(zero_bias, {});
  for (int i = 0; i < 300; ++i) {
    SCOPED_TRACE(i);
    const SampledToken w = want.Sample(logits.data(), 512);
    for (Sampler* s : {&got_off, &got_bias}) {
      const SampledToken g = s->Sample(logits.data(), 512);
      EXPECT_EQ(g.token, w.token);
      EXPECT_EQ(g.logprob, w.logprob);
      EXPECT_EQ(g.top, w.top);
    }
  }
}

// Logits masked to -infinity (JSON mode) are never listed among top_logprobs (they read as null
// in JSON): fewer alternatives than asked for when fewer tokens are allowed.
TEST(Sampler, TopLogprobsListNoMaskedToken) {
  std::vector<float> logits(64, -std::numeric_limits<float>::infinity());
  logits[5] = 1.0f;
  logits[9] = 2.0f;
  SamplingParams p;
  p.logprobs = true;
  p.top_logprobs = 5;
  Sampler s(p);
  const SampledToken t = s.Sample(logits.data(), 64);
  EXPECT_EQ(t.token, 9);
  ASSERT_EQ(t.top.size(), 2u);
  EXPECT_EQ(t.top[0].first, 9);
  EXPECT_EQ(t.top[1].first, 5);
  for (const auto& [id, lp] : t.top) EXPECT_TRUE(std::isfinite(lp)) << id;
}

}  // namespace
}  // namespace dmoe
