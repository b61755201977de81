// Speculative decoding with DeepSeek-V3's MTP layer (tiny-v3): a request's output is the same
// with and without speculation, token for token and logprob bit for bit (greedy, and seeded
// sampling), whatever the drafts are (the MTP layer's own, or a test hook's mix of right and
// wrong ones), under continuous batching with chunked prefill and prefix caching, and alone.
// Sampling's distribution is checked against the model's exact one (chi-square).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "attention_service/scheduler.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

struct Output {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;  // chosen token's, then its top 3 (id, logprob), per token
  bool finished = false;
};

struct Request {
  std::vector<int32_t> prompt;
  SamplingParams params;
};

class Speculative : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string dir = std::string(tmp ? tmp : "/tmp") + "/speculative_model";
    TinyModelOptions o;
    o.seed = 12;
    ASSERT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny-v3"), o).ok());
    auto m = LocalModel::Load(dir);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(m).value().release();
  }
  static void TearDownTestSuite() { delete model_; }

  // 64 mixed requests: prompts of 1..90 tokens, a third of them sharing a 40-token prefix
  // (prefix-cache hits), max_tokens 1..40, some with a stop token, some with top logprobs, a
  // third sampled (temperature 0.8, top-p 0.9, seeded).
  static std::vector<Request> Mixed(uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int32_t> tok(2, 511);
    std::vector<int32_t> shared(40);
    for (int32_t& t : shared) t = tok(rng);
    std::vector<Request> out(64);
    for (size_t i = 0; i < out.size(); ++i) {
      Request& r = out[i];
      const int n = std::uniform_int_distribution<int>(1, 90)(rng);
      if (i % 3 == 0) r.prompt = shared;
      while (static_cast<int>(r.prompt.size()) < n + (i % 3 == 0 ? 40 : 0)) {
        r.prompt.push_back(tok(rng));
      }
      r.params.max_tokens = std::uniform_int_distribution<int>(1, 40)(rng);
      r.params.ignore_eos = i % 4 != 0;
      if (i % 5 == 0) r.params.stop_token_ids = {tok(rng), tok(rng)};
      r.params.logprobs = true;
      r.params.top_logprobs = i % 2 == 0 ? 3 : 0;
      if (i % 3 == 1) {  // sampled, seeded: the same bits too (Sampler::Verify)
        r.params.temperature = 0.8;
        r.params.top_p = 0.9;
        r.params.seed = 100 + i;
      }
    }
    return out;
  }

  // Runs every request through one scheduler (they share steps), returns their outputs. `engine`
  // (default: the model's) and `failed_steps`: when set, steps may fail with UNAVAILABLE (counted;
  // the scheduler retries them), otherwise every step must succeed.
  static std::vector<Output> Run(const std::vector<Request>& requests, SchedulerOptions so,
                                 SchedulerStats* stats = nullptr, Engine* engine = nullptr,
                                 int* failed_steps = nullptr) {
    const ModelConfig& c = model_->config();
    LatentKvCache cache(c, 16, 1024);
    LatentKvCache mtp_cache(Engine::MtpCacheConfig(c), 16, MtpCacheBlocks(1024, 16, so));
    so.mtp_cache = &mtp_cache;
    Scheduler s(engine != nullptr ? engine : &model_->engine(), &cache, so);
    std::vector<Output> out(requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      RequestCallbacks cb;
      Output* o = &out[i];
      cb.on_token = [o](const SampledToken& t) {
        o->tokens.push_back(t.token);
        o->logprobs.push_back(t.logprob);
        for (const auto& [id, lp] : t.top) {
          o->logprobs.push_back(static_cast<float>(id));
          o->logprobs.push_back(lp);
        }
      };
      cb.on_finish = [o](FinishReason, const absl::Status& st) { o->finished = st.ok(); };
      EXPECT_TRUE(s.Submit(requests[i].prompt, requests[i].params, cb).ok());
    }
    for (int step = 0; step < 100000; ++step) {
      auto more = s.Step();
      if (!more.ok() && failed_steps != nullptr) {
        EXPECT_EQ(more.status().code(), absl::StatusCode::kUnavailable) << more.status();
        ++*failed_steps;
        continue;
      }
      EXPECT_TRUE(more.ok()) << more.status();
      if (!more.ok() || !*more) break;
    }
    if (stats != nullptr) *stats = s.stats();
    return out;
  }

  static void ExpectSame(const std::vector<Output>& got, const std::vector<Output>& want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(got[i].finished) << "request " << i;
      EXPECT_EQ(got[i].tokens, want[i].tokens) << "request " << i;
      EXPECT_TRUE(got[i].logprobs.size() == want[i].logprobs.size() &&
                  std::memcmp(got[i].logprobs.data(), want[i].logprobs.data(),
                              4 * got[i].logprobs.size()) == 0)
          << "request " << i << ": logprob bits differ";
    }
  }

  static LocalModel* model_;
};

LocalModel* Speculative::model_ = nullptr;

SchedulerOptions Small() {
  SchedulerOptions so;
  so.max_running = 24;
  so.step_token_budget = 96;  // prefills are chunked and share steps with decodes
  so.prefill_chunk = 32;
  return so;
}

TEST_F(Speculative, GreedyOutputEqualsPlainGreedyWithTheMtpDrafts) {
  const std::vector<Request> requests = Mixed(1);
  const std::vector<Output> plain = Run(requests, Small());
  for (int64_t n : {1, 2, 3}) {
    SchedulerOptions so = Small();
    so.speculative_tokens = n;
    SchedulerStats st;
    const std::vector<Output> spec = Run(requests, so, &st);
    std::printf("speculative_tokens %lld: %llu drafted, %llu accepted (%.1f%%), %llu prefix hits\n",
                static_cast<long long>(n), static_cast<unsigned long long>(st.drafted_tokens),
                static_cast<unsigned long long>(st.accepted_tokens),
                100.0 * st.accepted_tokens / std::max<uint64_t>(1, st.drafted_tokens),
                static_cast<unsigned long long>(st.prefix_hit_tokens));
    EXPECT_GT(st.drafted_tokens, 0u);
    EXPECT_GT(st.prefix_hit_tokens, 0u);
    ExpectSame(spec, plain);
  }
  // Each request alone (one running sequence at a time, whole-prompt prefill): the same again.
  SchedulerOptions alone;
  alone.max_running = 1;
  alone.speculative_tokens = 2;
  ExpectSame(Run(requests, alone), plain);
}

// Drafts from a hook that knows the plain output: right at some positions, wrong at others
// (accept all, a prefix, or none), so verification, partial acceptance and the rollback of
// rejected rows (main and MTP caches, prefix cache) all run.
TEST_F(Speculative, GreedyOutputEqualsPlainGreedyWhateverTheDrafts) {
  const std::vector<Request> requests = Mixed(2);
  const std::vector<Output> plain = Run(requests, Small());
  for (int64_t n : {1, 3}) {
    SchedulerOptions so = Small();
    so.speculative_tokens = n;
    // Request ids are 1-based in submission order.
    so.draft_hook = [&](uint64_t id, const std::vector<int32_t>& tokens,
                        std::vector<int32_t>* draft) {
      const Request& r = requests[id - 1];
      const std::vector<int32_t>& out = plain[id - 1].tokens;
      // Index in the output of the first draft's position.
      const int64_t g = static_cast<int64_t>(tokens.size() - r.prompt.size());
      draft->assign(static_cast<size_t>(n), 7);
      for (int64_t j = 0; j < n && g + j < static_cast<int64_t>(out.size()); ++j) {
        // Position-dependent: right, except every 5th position and (n > 1) every 7th's last.
        const bool wrong = (g + j) % 5 == 0 || (j == n - 1 && (g + j) % 7 == 0);
        (*draft)[static_cast<size_t>(j)] =
            wrong ? (out[static_cast<size_t>(g + j)] + 1) % 512 : out[static_cast<size_t>(g + j)];
      }
    };
    SchedulerStats st;
    const std::vector<Output> spec = Run(requests, so, &st);
    const double tokens_per_step =
        1.0 + static_cast<double>(st.accepted_tokens) / std::max<uint64_t>(1, st.speculative_steps);
    std::printf(
        "hooked drafts, speculative_tokens %lld: %llu drafted, %llu accepted, %.2f tokens "
        "per verifying step\n",
        static_cast<long long>(n), static_cast<unsigned long long>(st.drafted_tokens),
        static_cast<unsigned long long>(st.accepted_tokens), tokens_per_step);
    EXPECT_GT(st.accepted_tokens, st.drafted_tokens / 2);
    EXPECT_LT(st.accepted_tokens, st.drafted_tokens);
    ExpectSame(spec, plain);
  }
}

// P(chi-square with `df` degrees of freedom >= x): the regularized upper incomplete gamma
// Q(df/2, x/2), by its series below a + 1 and its continued fraction above.
double ChiSquarePValue(double x, int df) {
  const double a = df / 2.0, z = x / 2.0;
  if (z <= 0) return 1.0;
  const double log_front = a * std::log(z) - z - std::lgamma(a);
  if (z < a + 1) {
    double term = 1.0 / a, sum = term;
    for (int n = 1; n < 1000 && term > sum * 1e-15; ++n) sum += term *= z / (a + n);
    return 1.0 - sum * std::exp(log_front);
  }
  // Lentz's method for the continued fraction of Q.
  double b = z + 1 - a, c = 1e300, d = 1 / b, h = d;
  for (int i = 1; i < 1000; ++i) {
    const double an = -i * (i - a);
    b += 2;
    d = an * d + b;
    d = std::fabs(d) < 1e-300 ? 1e-300 : d;
    c = b + an / c;
    c = std::fabs(c) < 1e-300 ? 1e-300 : c;
    d = 1 / d;
    h *= d * c;
    if (std::fabs(d * c - 1) < 1e-15) break;
  }
  return std::exp(log_front) * h;
}

// The blocks a request fills are registered for later requests even when it finishes in the
// step that fills them (max_tokens 1), and the MTP layer's prefix cache lets the main cache
// attach all of them (a prompt of 33 tokens: 32 attached, with or without speculation).
TEST_F(Speculative, PromptBlocksOfAOneTokenRequestAreReused) {
  for (int64_t n : {0, 2}) {
    const ModelConfig& c = model_->config();
    SchedulerOptions so;
    so.speculative_tokens = n;
    LatentKvCache cache(c, 16, 64);
    LatentKvCache mtp_cache(Engine::MtpCacheConfig(c), 16, MtpCacheBlocks(64, 16, so));
    so.mtp_cache = &mtp_cache;
    Scheduler s(&model_->engine(), &cache, so);
    std::vector<int32_t> prompt;
    for (int i = 0; i < 33; ++i) prompt.push_back(3 + i * 5);
    SamplingParams p;
    p.max_tokens = 1;
    for (int round = 0; round < 2; ++round) {
      ASSERT_TRUE(s.Submit(prompt, p, RequestCallbacks()).ok());
      for (int step = 0; step < 100; ++step) {
        auto more = s.Step();
        ASSERT_TRUE(more.ok());
        if (!*more) break;
      }
    }
    EXPECT_EQ(s.stats().prefix_hit_tokens, 32u) << "speculative_tokens " << n;
  }
}

// Routed experts that fail (UNAVAILABLE, before any work) on chosen calls: the MTP layer's and
// the main layers'.
class FlakyExperts : public RoutedExperts {
 public:
  FlakyExperts(const ModelConfig& c, const ExpertStore* store)
      : inner_(c, store), mtp_(c.num_hidden_layers) {}
  absl::Status Begin(int64_t layer, const float* x, int64_t t, const int32_t* ids, const float* w,
                     int64_t k) override {
    ++calls_;
    const bool fail = layer == mtp_ ? calls_ % 7 == 3 : calls_ % 53 == 11;
    if (fail) {
      ++failures_;
      return absl::UnavailableError("flaky shard");
    }
    return inner_.Begin(layer, x, t, ids, w, k);
  }
  absl::Status Finish(float* out) override { return inner_.Finish(out); }
  int failures() const { return failures_; }

 private:
  LocalRoutedExperts inner_;
  int64_t mtp_;
  int calls_ = 0, failures_ = 0;
};

// Expert failures in main steps and in MTP steps stall the sequences and retry (KV and drafts
// kept consistent, all or nothing): the output is still plain greedy's and sampling's.
TEST_F(Speculative, FailedExpertCallsStallAndChangeNothing) {
  const std::vector<Request> requests = Mixed(3);
  const std::vector<Output> plain = Run(requests, Small());
  FlakyExperts flaky(model_->config(), &model_->experts());
  Engine engine(model_->config(), &model_->dense(), &flaky);
  SchedulerOptions so = Small();
  so.speculative_tokens = 2;
  so.expert_wait = std::chrono::hours(1);
  SchedulerStats st;
  int errors = 0;
  const std::vector<Output> out = Run(requests, so, &st, &engine, &errors);
  std::printf("%d expert calls failed, %d steps failed and were retried, %llu stalled steps\n",
              flaky.failures(), errors, static_cast<unsigned long long>(st.stalled_steps));
  EXPECT_GT(errors, 5);
  ExpectSame(out, plain);
}

TEST(ChiSquare, PValuesOfKnownQuantiles) {
  EXPECT_NEAR(ChiSquarePValue(3.841, 1), 0.05, 1e-4);
  EXPECT_NEAR(ChiSquarePValue(18.307, 10), 0.05, 1e-4);
  EXPECT_NEAR(ChiSquarePValue(37.566, 20), 0.01, 1e-4);
  EXPECT_NEAR(ChiSquarePValue(0.1148, 3), 0.99, 1e-4);
}

// Top-4 sampling at temperature 1. The exact joint distribution of the first two generated
// tokens, p(t1) p(t2 | t1), comes from the engine's logits (5 forward passes); 4000 seeded runs
// with speculation (a draft for t2, right for some runs and wrong for others) must fit it: a
// chi-square goodness-of-fit test at significance 0.001. So must plain sampling (the control);
// accepting every draft (a wrong rule) must not.
TEST_F(Speculative, SamplingKeepsTheModelsDistribution) {
  const ModelConfig& c = model_->config();
  const int64_t v = c.vocab_size;
  const std::vector<int32_t> prompt = {5, 77, 301, 9, 42, 250, 13, 480, 66, 123, 7, 300};
  SamplingParams p;
  p.temperature = 1.0;
  p.top_k = 4;
  p.max_tokens = 3;
  p.ignore_eos = true;
  // The top 4 of logits and their renormalized probabilities.
  auto top4 = [&](const float* logits) {
    std::vector<std::pair<double, int32_t>> o;
    for (int64_t i = 0; i < v; ++i) o.push_back({logits[i], static_cast<int32_t>(i)});
    std::partial_sort(o.begin(), o.begin() + 4, o.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first; });
    o.resize(4);
    const double mx = o[0].first;
    double z = 0;
    for (auto& [l, id] : o) z += std::exp(l - mx);
    for (auto& [l, id] : o) l = std::exp(l - mx) / z;
    return o;
  };
  auto last_logits = [&](const std::vector<int32_t>& t) {
    auto l = model_->engine().Forward(t);
    EXPECT_TRUE(l.ok());
    return std::vector<float>(l->end() - v, l->end());
  };
  const auto first = top4(last_logits(prompt).data());
  std::map<std::pair<int32_t, int32_t>, double> expected;
  std::map<int32_t, std::vector<std::pair<double, int32_t>>> second;
  for (const auto& [p1, t1] : first) {
    std::vector<int32_t> t = prompt;
    t.push_back(t1);
    second[t1] = top4(last_logits(t).data());
    for (const auto& [p2, t2] : second[t1]) expected[{t1, t2}] = p1 * p2;
  }
  constexpr int kRuns = 4000;
  std::vector<Request> requests(kRuns);
  for (int i = 0; i < kRuns; ++i) {
    requests[static_cast<size_t>(i)].prompt = prompt;
    requests[static_cast<size_t>(i)].params = p;
    requests[static_cast<size_t>(i)].params.seed = 1000 + static_cast<uint64_t>(i);
  }
  auto fit = [&](const std::vector<Output>& out, const char* what) {
    std::map<std::pair<int32_t, int32_t>, int> counts;
    for (const Output& o : out) {
      EXPECT_EQ(o.tokens.size(), 3u);
      if (o.tokens.size() >= 2) ++counts[{o.tokens[0], o.tokens[1]}];
    }
    double chi2 = 0;
    for (const auto& [cell, prob] : expected) {
      const double e = prob * kRuns, d = counts[cell] - e;
      chi2 += d * d / e;
    }
    int outside = 0;
    for (const auto& [cell, n] : counts) outside += expected.count(cell) ? 0 : n;
    const double pv =
        outside > 0 ? 0.0 : ChiSquarePValue(chi2, static_cast<int>(expected.size()) - 1);
    std::printf("%s: chi2 = %.2f over %zu cells (%d runs outside the top-4 cells), p = %.3g\n",
                what, chi2, expected.size(), outside, pv);
    return pv;
  };
  SchedulerOptions so;
  so.max_running = 64;
  EXPECT_GT(fit(Run(requests, so), "plain sampling"), 0.001);
  so.speculative_tokens = 1;
  // Drafts for t2: the most likely token after t1 for even seeds, the 3rd most likely for odd
  // ones (so drafts are accepted often and rejected often).
  so.draft_hook = [&](uint64_t id, const std::vector<int32_t>& tokens,
                      std::vector<int32_t>* draft) {
    auto it = second.find(tokens.back());
    if (tokens.size() != prompt.size() + 1 || it == second.end()) return;
    (*draft)[0] = it->second[id % 2 == 0 ? 0 : 2].second;
  };
  SchedulerStats st;
  const double pv = fit(Run(requests, so, &st), "speculative sampling");
  std::printf("  %llu drafted, %llu accepted\n", static_cast<unsigned long long>(st.drafted_tokens),
              static_cast<unsigned long long>(st.accepted_tokens));
  EXPECT_GT(pv, 0.001);
  EXPECT_GT(st.accepted_tokens, st.drafted_tokens / 5);
  EXPECT_LT(st.accepted_tokens, st.drafted_tokens * 4 / 5);
  so.force_accept = 1.0;  // the wrong rule: every draft accepted
  EXPECT_LT(fit(Run(requests, so), "accepting every draft (wrong)"), 1e-6);
}

}  // namespace
}  // namespace dmoe
