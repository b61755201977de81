// Speculative decoding with DeepSeek-V3's MTP layer (tiny-v3): a request's output is the same
// with and without speculation, token for token and logprob bit for bit, whatever the drafts
// are (the MTP layer's own, or a test hook's mix of right and wrong ones), under continuous
// batching with chunked prefill and prefix caching.
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
  // (prefix-cache hits), max_tokens 1..40, some with a stop token, some with top logprobs.
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
    }
    return out;
  }

  // Runs every request through one scheduler (they share steps), returns their outputs.
  static std::vector<Output> Run(const std::vector<Request>& requests, SchedulerOptions so,
                                 SchedulerStats* stats = nullptr) {
    const ModelConfig& c = model_->config();
    LatentKvCache cache(c, 16, 1024);
    LatentKvCache mtp_cache(Engine::MtpCacheConfig(c), 16, MtpCacheBlocks(1024, 16, so));
    so.mtp_cache = &mtp_cache;
    Scheduler s(&model_->engine(), &cache, so);
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
    // Request ids are 1-based in submission order; `pos` is the first draft's position.
    so.draft_hook = [&](uint64_t id, int64_t pos, std::vector<int32_t>* draft) {
      const Request& r = requests[id - 1];
      const std::vector<int32_t>& out = plain[id - 1].tokens;
      const int64_t g = pos - static_cast<int64_t>(r.prompt.size());  // index in the output
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

}  // namespace
}  // namespace dmoe
