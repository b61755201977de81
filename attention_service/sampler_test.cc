#include "attention_service/sampler.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

// Draws n tokens; returns their frequencies.
std::vector<double> Frequencies(SamplingParams p, const std::vector<float>& logits, int n) {
  Sampler s(p);
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
  Sampler s(SamplingParams{});
  const std::vector<float> l = {1.0f, 3.0f, 2.0f, 3.0f};
  EXPECT_EQ(s.Sample(l.data(), 4).token, 1);
  SamplingParams k1;
  k1.temperature = 5;
  k1.top_k = 1;
  EXPECT_EQ(Sampler(k1).Sample(l.data(), 4).token, 1);
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

TEST(Sampler, SeedsAreReproducible) {
  std::vector<float> logits(512);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(i * 0.37f) * 3;
  auto draw = [&](uint64_t seed) {
    SamplingParams p;
    p.temperature = 1.0;
    p.top_p = 0.95;
    p.seed = seed;
    Sampler s(p);
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
  const SampledToken t = Sampler(p).Sample(l.data(), 5);
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
  };
  for (const Case& k : cases) {
    const absl::Status st = ValidateRequest(k.prompt, k.p, c);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << k.field;
    EXPECT_NE(st.message().find(k.field), absl::string_view::npos) << st;
  }
  EXPECT_TRUE(ValidateRequest({1, 2, 3}, SamplingParams{}, c).ok());
}

}  // namespace
}  // namespace dmoe
