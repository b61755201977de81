#include "attention_service/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <future>
#include <map>
#include <memory>
#include <random>
#include <regex>
#include <thread>
#include <vector>

#include "attention_service/local_model.h"
#include "common/clock.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

class SchedulerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string dir = std::string(tmp ? tmp : "/tmp") + "/sched_model";
    TinyModelOptions o;
    o.seed = 12;
    ASSERT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), o).ok());
    model_ = std::move(LocalModel::Load(dir)).value().release();
  }
  static void TearDownTestSuite() { delete model_; }

  struct Result {
    std::vector<int32_t> tokens;
    FinishReason reason = FinishReason::kError;
    bool finished = false;
  };

  // Submits every request, steps until all finish (bounded), returns the results by index.
  static std::vector<Result> RunAll(Scheduler& s, const std::vector<std::vector<int32_t>>& prompts,
                                    const std::vector<SamplingParams>& params) {
    std::vector<Result> results(prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      RequestCallbacks cb;
      cb.on_token = [&results, i](const SampledToken& t) { results[i].tokens.push_back(t.token); };
      cb.on_finish = [&results, i](FinishReason r, const absl::Status&) {
        results[i].reason = r;
        results[i].finished = true;
      };
      EXPECT_TRUE(s.Submit(prompts[i], params[i], cb).ok());
    }
    for (int step = 0; step < 20000; ++step) {
      auto more = s.Step();
      EXPECT_TRUE(more.ok()) << more.status();
      if (!more.ok() || !*more) break;
    }
    return results;
  }

  static std::vector<int32_t> Alone(const std::vector<int32_t>& prompt, const SamplingParams& p) {
    GenerateOptions g;
    g.max_tokens = p.max_tokens;
    g.ignore_eos = p.ignore_eos;
    g.temperature = p.temperature;
    g.seed = p.seed;
    g.top_p = p.top_p;
    auto out = Generate(model_->engine(), prompt, g);
    EXPECT_TRUE(out.ok());
    return *out;
  }

  static LocalModel* model_;
};
LocalModel* SchedulerTest::model_ = nullptr;

std::vector<int32_t> RandomPrompt(std::mt19937& rng, int n) {
  std::vector<int32_t> p;
  for (int i = 0; i < n; ++i) p.push_back(std::uniform_int_distribution<int>(0, 511)(rng));
  return p;
}

TEST_F(SchedulerTest, SixtyFourConcurrentRequestsEachEqualToAlone) {
  LatentKvCache cache(model_->config(), 16, 2048);
  SchedulerOptions o;
  o.max_running = 64;
  o.step_token_budget = 512;
  o.prefill_chunk = 128;
  Scheduler s(&model_->engine(), &cache, o);
  std::mt19937 rng(4);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SamplingParams> params;
  for (int i = 0; i < 64; ++i) {
    prompts.push_back(RandomPrompt(rng, 1 + (i * 37) % 300));
    SamplingParams p;
    p.ignore_eos = true;  // the tiny model may emit its eos (1); these tests count tokens
    p.max_tokens = 4 + (i * 11) % 29;
    params.push_back(p);
  }
  const std::vector<Result> got = RunAll(s, prompts, params);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].finished) << i;
    EXPECT_EQ(got[i].reason, FinishReason::kLength);
    EXPECT_EQ(got[i].tokens, Alone(prompts[i], params[i]))
        << "request " << i << " prompt " << prompts[i].size() << " tokens";
  }
  EXPECT_EQ(cache.free_blocks(), cache.total_blocks());
  std::printf("64 requests: %llu steps, %llu prefilled tokens, %llu generated\n",
              static_cast<unsigned long long>(s.stats().steps),
              static_cast<unsigned long long>(s.stats().prefilled_tokens),
              static_cast<unsigned long long>(s.stats().generated_tokens));
}

TEST_F(SchedulerTest, SeededSamplingIsReproducibleAcrossBatchCompositions) {
  SamplingParams p;
  p.ignore_eos = true;  // the tiny model may emit its eos (1); these tests count tokens
  p.temperature = 0.9;
  p.top_p = 0.95;
  p.seed = 77;
  p.max_tokens = 24;
  const std::vector<int32_t> prompt = {3, 1, 4, 1, 5, 9, 2, 6};
  const std::vector<int32_t> alone = Alone(prompt, p);
  std::mt19937 rng(9);
  for (int others : {0, 5, 17}) {
    LatentKvCache cache(model_->config(), 8, 512);
    Scheduler s(&model_->engine(), &cache, SchedulerOptions());
    std::vector<std::vector<int32_t>> prompts = {prompt};
    std::vector<SamplingParams> params = {p};
    for (int i = 0; i < others; ++i) {
      prompts.push_back(RandomPrompt(rng, 5 + i * 7));
      SamplingParams q;
      q.ignore_eos = true;  // the tiny model may emit its eos (1); these tests count tokens
      q.temperature = 1.0;
      q.seed = static_cast<uint64_t>(i);
      q.max_tokens = 10 + i;
      params.push_back(q);
    }
    EXPECT_EQ(RunAll(s, prompts, params)[0].tokens, alone) << others << " other requests";
  }
}

TEST_F(SchedulerTest, CacheTooSmallForAllStillCompletesEveryRequest) {
  // 24 blocks of 4 tokens: room for about two of these requests at a time.
  LatentKvCache cache(model_->config(), 4, 24);
  SchedulerOptions o;
  o.prefill_chunk = 16;
  Scheduler s(&model_->engine(), &cache, o);
  std::mt19937 rng(2);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SamplingParams> params;
  for (int i = 0; i < 8; ++i) {
    prompts.push_back(RandomPrompt(rng, 20 + 3 * i));
    SamplingParams p;
    p.ignore_eos = true;  // the tiny model may emit its eos (1); these tests count tokens
    p.max_tokens = 20;
    params.push_back(p);
  }
  const std::vector<Result> got = RunAll(s, prompts, params);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].finished) << i;
    EXPECT_EQ(got[i].tokens, Alone(prompts[i], params[i])) << i;
  }
  EXPECT_EQ(cache.free_blocks(), cache.total_blocks());
  std::printf("cache of 24 blocks, 8 requests: %llu preemptions\n",
              static_cast<unsigned long long>(s.stats().preemptions));
}

TEST_F(SchedulerTest, CancellationFreesBlocksWithinOneStep) {
  LatentKvCache cache(model_->config(), 4, 64);
  Scheduler s(&model_->engine(), &cache, SchedulerOptions());
  SamplingParams p;
  p.ignore_eos = true;  // the tiny model may emit its eos (1); these tests count tokens
  p.max_tokens = 100;
  int tokens = 0;
  bool cancelled = false;
  RequestCallbacks cb;
  cb.on_token = [&](const SampledToken&) { ++tokens; };
  cb.on_finish = [&](FinishReason r, const absl::Status&) {
    cancelled = r == FinishReason::kCancelled;
  };
  auto id = s.Submit({1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, p, cb);
  ASSERT_TRUE(id.ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(*s.Step());
  EXPECT_EQ(tokens, 5);
  EXPECT_LT(cache.free_blocks(), cache.total_blocks());
  s.Cancel(*id);
  ASSERT_TRUE(s.Step().ok());
  EXPECT_TRUE(cancelled);
  EXPECT_EQ(tokens, 5);
  EXPECT_EQ(cache.free_blocks(), cache.total_blocks());
  EXPECT_EQ(s.load().running, 0);
}

// The idle scheduler thread sleeps in WaitForWork; a Submit (or Cancel) from another thread
// must end that wait at once, not at its timeout.
TEST_F(SchedulerTest, SubmitAndCancelWakeTheIdleWait) {
  LatentKvCache cache(model_->config(), 4, 64);
  Scheduler s(&model_->engine(), &cache, SchedulerOptions());
  ASSERT_FALSE(*s.Step());  // nothing to do
  for (int round = 0; round < 2; ++round) {
    auto waited = std::async(std::launch::async,
                             [&] { return s.WaitForWork(std::chrono::milliseconds(60000)); });
    // Submit/Cancel only once the waiter sleeps, so that it must be woken (not find work queued).
    for (int i = 0; i < 30000 && s.idle_waiters() == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_EQ(s.idle_waiters(), 1) << round;
    if (round == 0) {
      SamplingParams p;
      p.ignore_eos = true;  // the tiny model may emit its eos (1); these tests count tokens
      p.max_tokens = 1;
      ASSERT_TRUE(s.Submit({1, 2, 3}, p, RequestCallbacks()).ok());
    } else {
      s.Cancel(12345);
    }
    ASSERT_EQ(waited.wait_for(std::chrono::seconds(30)), std::future_status::ready) << round;
    EXPECT_TRUE(waited.get()) << "woken by work, not by the timeout";
    while (*s.Step()) {
    }
  }
  // With work queued it does not wait at all: it never becomes an idle waiter.
  s.Cancel(777);
  EXPECT_TRUE(s.WaitForWork(std::chrono::milliseconds(60000)));
  EXPECT_EQ(s.idle_waiters(), 0);
  // Without work it returns false at the timeout.
  while (*s.Step()) {
  }
  EXPECT_FALSE(s.WaitForWork(std::chrono::milliseconds(1)));
}

TEST_F(SchedulerTest, SharedPrefixIsComputedOnce) {
  LatentKvCache cache(model_->config(), 16, 256);
  Scheduler s(&model_->engine(), &cache, SchedulerOptions());
  std::mt19937 rng(21);
  const std::vector<int32_t> prefix = RandomPrompt(rng, 256);
  std::vector<int32_t> a = prefix, b = prefix;
  for (int32_t t : RandomPrompt(rng, 20)) a.push_back(t);
  for (int32_t t : RandomPrompt(rng, 37)) b.push_back(t);
  SamplingParams p;
  p.ignore_eos = true;  // the tiny model may emit its eos (1); these tests count tokens
  p.max_tokens = 12;
  const Result ra = RunAll(s, {a}, {p})[0];
  const uint64_t before = s.stats().prefilled_tokens;
  EXPECT_EQ(before, a.size() + p.max_tokens - 1);
  const Result rb = RunAll(s, {b}, {p})[0];
  const uint64_t b_computed = s.stats().prefilled_tokens - before;
  std::printf("second request: %zu prompt tokens, %llu computed, %llu from the prefix cache\n",
              b.size(), static_cast<unsigned long long>(b_computed),
              static_cast<unsigned long long>(s.stats().prefix_hit_tokens));
  EXPECT_EQ(s.stats().prefix_hit_tokens, 256u);
  EXPECT_EQ(b_computed, b.size() - 256 + p.max_tokens - 1);
  EXPECT_EQ(ra.tokens, Alone(a, p));
  EXPECT_EQ(rb.tokens, Alone(b, p));
  EXPECT_EQ(cache.free_blocks(), cache.total_blocks());  // cached blocks count as available
  EXPECT_GT(cache.cached_blocks(), 0);
}

TEST_F(SchedulerTest, PingPongMicroBatchesEqualSequentialSteps) {
  Engine& engine = model_->engine();
  LocalRoutedExperts second(model_->config(), &model_->experts());
  // Prefill then decode, as two micro-batches in ping-pong and as two separate steps.
  std::vector<std::unique_ptr<SequenceKvCache>> caches;
  for (int i = 0; i < 6; ++i) caches.push_back(std::make_unique<SequenceKvCache>(model_->config()));
  std::vector<SequenceStep> a = {{caches[0].get(), {1, 2, 3, 4}, false},
                                 {caches[1].get(), {9, 8}, false}};
  std::vector<SequenceStep> b = {{caches[2].get(), {77, 66, 55}, false}};
  std::vector<SequenceStep> a2 = {{caches[3].get(), {1, 2, 3, 4}, false},
                                  {caches[4].get(), {9, 8}, false}};
  std::vector<SequenceStep> b2 = {{caches[5].get(), {77, 66, 55}, false}};
  for (int step = 0; step < 4; ++step) {
    std::vector<std::vector<float>> la, lb, la2, lb2;
    ASSERT_TRUE(engine.StepPingPong(a, b, &second, &la, &lb).ok());
    ASSERT_TRUE(engine.Step(a2, &la2).ok());
    ASSERT_TRUE(engine.Step(b2, &lb2).ok());
    EXPECT_EQ(la, la2) << "step " << step;
    EXPECT_EQ(lb, lb2) << "step " << step;
    for (auto* batch : {&a, &a2}) {
      for (size_t i = 0; i < batch->size(); ++i) {
        (*batch)[i].tokens = {ArgMax(la[i].data(), model_->config().vocab_size)};
      }
    }
    for (auto* batch : {&b, &b2}) (*batch)[0].tokens = {ArgMax(lb[0].data(), 512)};
  }
  // The scheduler with ping-pong gives every request its output run alone.
  LatentKvCache cache(model_->config(), 16, 512);
  SchedulerOptions o;
  o.experts_b = &second;
  Scheduler s(&engine, &cache, o);
  std::mt19937 rng(5);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SamplingParams> params;
  for (int i = 0; i < 12; ++i) {
    prompts.push_back(RandomPrompt(rng, 3 + i * 13));
    SamplingParams p;
    p.ignore_eos = true;  // the tiny model may emit its eos (1); these tests count tokens
    p.max_tokens = 6 + i;
    params.push_back(p);
  }
  const std::vector<Result> got = RunAll(s, prompts, params);
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(got[i].tokens, Alone(prompts[i], params[i]));
}

TEST_F(SchedulerTest, BadRequestsAreRejectedAtSubmit) {
  LatentKvCache cache(model_->config(), 4, 8);
  Scheduler s(&model_->engine(), &cache, SchedulerOptions());
  SamplingParams p;
  p.ignore_eos = true;  // the tiny model may emit its eos (1); these tests count tokens
  p.top_k = -1;
  EXPECT_EQ(s.Submit({1}, p, {}).status().code(), absl::StatusCode::kInvalidArgument);
  SamplingParams big;
  big.max_tokens = 100;  // needs 26 blocks of 4; the cache has 8
  const auto st = s.Submit({1}, big, {}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("KV blocks"), absl::string_view::npos) << st;
}

// Requests beyond max_waiting are UNAVAILABLE (the gateway retries them elsewhere) instead of
// queueing without bound; once the queue drains, new ones are taken again.
TEST_F(SchedulerTest, RequestsBeyondMaxWaitingAreUnavailable) {
  LatentKvCache cache(model_->config(), 4, 64);
  SchedulerOptions o;
  o.max_waiting = 2;
  Scheduler s(&model_->engine(), &cache, o);
  SamplingParams p;
  p.max_tokens = 2;
  EXPECT_TRUE(s.Submit({1, 2}, p, {}).ok());
  EXPECT_TRUE(s.Submit({3, 4}, p, {}).ok());
  const absl::Status st = s.Submit({5, 6}, p, {}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_NE(st.message().find("--max-waiting"), absl::string_view::npos) << st;
  for (int i = 0; i < 20 && s.load().waiting > 0; ++i) ASSERT_TRUE(s.Step().ok());
  EXPECT_EQ(s.load().waiting, 0);
  EXPECT_TRUE(s.Submit({5, 6}, p, {}).ok());
}

// EndAll (a drain that ran out of time) ends running and waiting requests alike with its status
// at the next step, and frees their blocks.
TEST_F(SchedulerTest, EndAllEndsRunningAndWaitingRequests) {
  LatentKvCache cache(model_->config(), 4, 64);
  SchedulerOptions o;
  o.max_running = 1;
  Scheduler s(&model_->engine(), &cache, o);
  SamplingParams p;
  p.ignore_eos = true;
  p.max_tokens = 50;
  std::vector<absl::Status> ends;
  RequestCallbacks cb;
  cb.on_finish = [&](FinishReason, const absl::Status& st) { ends.push_back(st); };
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(s.Submit({1, 2, 3}, p, cb).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(*s.Step());
  EXPECT_EQ(s.load().running, 1);
  EXPECT_EQ(s.load().waiting, 2);
  s.EndAll(absl::UnavailableError("drain over"));
  EXPECT_FALSE(*s.Step());
  ASSERT_EQ(ends.size(), 3u);
  for (const absl::Status& st : ends) EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_EQ(s.load().running + s.load().waiting, 0);
  EXPECT_EQ(cache.free_blocks(), cache.total_blocks());
}

// Drain: the running request finishes. With hand-back, those still queued end UNAVAILABLE at the
// next step (the gateway retries them on another node at once) instead of waiting out the drain
// behind it; without, they are served here in turn (a lone node: nowhere else to go).
TEST_F(SchedulerTest, DrainHandsBackQueuedRequestsOnlyWhenAsked) {
  for (const bool hand_back : {true, false}) {
    SCOPED_TRACE(hand_back ? "hand back" : "keep");
    LatentKvCache cache(model_->config(), 4, 64);
    SchedulerOptions o;
    o.max_running = 1;
    Scheduler s(&model_->engine(), &cache, o);
    SamplingParams p;
    p.ignore_eos = true;
    p.max_tokens = 6;
    std::map<uint64_t, absl::Status> ends;
    std::map<uint64_t, int> tokens;
    std::vector<uint64_t> ids;
    for (int i = 0; i < 3; ++i) {
      RequestCallbacks cb;
      const size_t n = ids.size();
      cb.on_token = [&, n](const SampledToken&) { ++tokens[ids[n]]; };
      cb.on_finish = [&, n](FinishReason, const absl::Status& st) { ends[ids[n]] = st; };
      ids.push_back(*s.Submit({1, 2, 3}, p, cb));
    }
    ASSERT_TRUE(*s.Step());
    EXPECT_EQ(s.load().running, 1);
    EXPECT_EQ(s.load().waiting, 2);
    s.Drain(hand_back);
    EXPECT_EQ(s.Submit({1, 2}, p, {}).status().code(), absl::StatusCode::kUnavailable);
    ASSERT_TRUE(*s.Step());
    EXPECT_EQ(ends.size(), hand_back ? 2u : 0u) << "queued requests ended at the next step";
    for (int i = 0; i < 40 && s.load().running + s.load().waiting > 0; ++i) {
      ASSERT_TRUE(s.Step().ok());
    }
    ASSERT_EQ(ends.size(), 3u);
    EXPECT_TRUE(ends[ids[0]].ok()) << ends[ids[0]];
    EXPECT_EQ(tokens[ids[0]], 6);
    for (size_t i = 1; i < 3; ++i) {
      if (hand_back) {
        EXPECT_EQ(ends[ids[i]].code(), absl::StatusCode::kUnavailable) << ends[ids[i]];
        EXPECT_EQ(tokens[ids[i]], 0);
      } else {
        EXPECT_TRUE(ends[ids[i]].ok()) << ends[ids[i]];
        EXPECT_EQ(tokens[ids[i]], 6);
      }
    }
    EXPECT_EQ(cache.free_blocks(), cache.total_blocks());
  }
}

// The real in-process experts, made unreachable on demand (as a dead shard answers UNAVAILABLE).
class SwitchableExperts : public RoutedExperts {
 public:
  explicit SwitchableExperts(RoutedExperts* real) : real_(real) {}
  absl::Status Begin(int64_t layer, const float* x, int64_t t, const int32_t* ids, const float* w,
                     int64_t k) override {
    if (down) return absl::UnavailableError("expert shard down (test)");
    return real_->Begin(layer, x, t, ids, w, k);
  }
  absl::Status Finish(float* out) override { return real_->Finish(out); }
  bool down = false;

 private:
  RoutedExperts* real_;
};

// Stalls are measured on the scheduler's clock: with a ManualClock the test steps time instead of
// sleeping. A sequence whose experts are down keeps its KV and resumes with the same tokens when
// they return within expert_wait; past expert_wait (by the clock) it ends UNAVAILABLE.
TEST_F(SchedulerTest, ExpertStallsAreTimedByTheInjectedClock) {
  const ModelConfig& c = model_->config();
  LocalRoutedExperts local(c, &model_->experts());
  SwitchableExperts experts(&local);
  Engine engine(c, &model_->dense(), &experts);
  LatentKvCache cache(c, 16, 64);
  ManualClock clock;
  SchedulerOptions o;
  o.expert_wait = std::chrono::milliseconds(1000);
  o.clock = &clock;
  Scheduler s(&engine, &cache, o);
  SamplingParams p;
  p.ignore_eos = true;
  p.max_tokens = 12;
  const std::vector<int32_t> prompt = {5, 6, 7, 8};
  std::vector<int32_t> got;
  FinishReason reason = FinishReason::kError;
  absl::Status final_status;
  bool finished = false;
  RequestCallbacks cb;
  cb.on_token = [&](const SampledToken& t) { got.push_back(t.token); };
  cb.on_finish = [&](FinishReason r, const absl::Status& st) {
    reason = r;
    final_status = st;
    finished = true;
  };
  ASSERT_TRUE(s.Submit(prompt, p, cb).ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(*s.Step());  // prefill + 3 tokens
  ASSERT_EQ(got.size(), 4u);
  // Down for 999 ms of clock time over many failed steps: still waiting.
  experts.down = true;
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(s.Step().status().code(), absl::StatusCode::kUnavailable);
    // The stall in progress, as the metrics read it: one sequence, waiting i * 99.9 ms so far.
    EXPECT_EQ(s.load().stalled, 1);
    EXPECT_NEAR(s.load().current_stall_seconds, i * 0.0999, 1e-6);
    clock.Advance(std::chrono::microseconds(99900));
  }
  EXPECT_FALSE(finished);
  EXPECT_EQ(got.size(), 4u);
  // Back: the stream resumes and equals the same request alone.
  experts.down = false;
  while (!finished) ASSERT_TRUE(s.Step().ok());
  EXPECT_EQ(reason, FinishReason::kLength);
  EXPECT_EQ(got, Alone(prompt, p));
  EXPECT_GE(s.stats().longest_stall_seconds, 0.999 - 1e-6);
  EXPECT_EQ(s.load().stalled, 0) << "the stall ended";
  EXPECT_EQ(s.load().current_stall_seconds, 0);
  // Down again, past expert_wait: the sequence ends UNAVAILABLE, by the clock alone.
  got.clear();
  finished = false;
  ASSERT_TRUE(s.Submit(prompt, p, cb).ok());
  ASSERT_TRUE(*s.Step());
  experts.down = true;
  EXPECT_EQ(s.Step().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(finished);
  clock.Advance(std::chrono::milliseconds(1001));
  EXPECT_EQ(s.Step().status().code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(finished);
  EXPECT_EQ(reason, FinishReason::kError);
  EXPECT_EQ(final_status.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(final_status.message().find("experts unreachable for 1000 ms"), std::string::npos)
      << final_status;
}

// The token that ends a generation (here one of stop_token_ids) comes marked `stop` (the gateway
// gives it no text), and only that one.
TEST_F(SchedulerTest, TheTokenThatEndsAGenerationIsMarkedStop) {
  SamplingParams p;
  p.ignore_eos = true;
  p.max_tokens = 8;
  const std::vector<int32_t> prompt = {5, 6, 7};
  const std::vector<int32_t> free_run = Alone(prompt, p);
  size_t k = 1;  // the first token not seen before it
  while (k < free_run.size() &&
         std::find(free_run.begin(), free_run.begin() + k, free_run[k]) != free_run.begin() + k) {
    ++k;
  }
  ASSERT_LT(k, free_run.size());
  p.stop_token_ids = {free_run[k]};
  LatentKvCache cache(model_->config(), 16, 64);
  Scheduler s(&model_->engine(), &cache, SchedulerOptions());
  std::vector<SampledToken> got;
  RequestCallbacks cb;
  cb.on_token = [&](const SampledToken& t) { got.push_back(t); };
  ASSERT_TRUE(s.Submit(prompt, p, cb).ok());
  for (int i = 0; i < 100; ++i) {
    auto more = s.Step();
    ASSERT_TRUE(more.ok());
    if (!*more) break;
  }
  ASSERT_EQ(got.size(), k + 1);
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].token, free_run[i]);
    EXPECT_EQ(got[i].stop, i == k) << "token " << i;
  }
}

// JSON mode over a vocabulary of JSON pieces (the tiny model's 512 ids, each given the text of
// one of 24 pieces, some special): sampled answers that end are whole JSON objects by
// nlohmann's parser (independent of the constraint), end where the object closes (finish
// "stop", no stop token), and none takes a special or stop token; the others are cut by
// max_tokens. The constraint keeps a request's tokens independent of its company (rule 1).
TEST_F(SchedulerTest, JsonModeAnswersAreJsonObjects) {
  const char* pieces[] = {"{",   "}",   "[",  "]",   "\"",  "\"k",  "a",    " ",
                          ":",   ",",   "1",  "-",   "0.5", "true", "null", "{\"",
                          "\":", "\",", "e3", "\\n", "x}",  "é",    "",     ""};
  std::vector<std::string> texts(static_cast<size_t>(model_->config().vocab_size));
  for (size_t id = 0; id < texts.size(); ++id) texts[id] = pieces[id % 24];
  LatentKvCache cache(model_->config(), 16, 512);
  SchedulerOptions o;
  o.token_bytes = &texts;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SamplingParams> params;
  for (int i = 0; i < 24; ++i) {
    prompts.push_back({3, 1, 4, static_cast<int32_t>(i)});
    SamplingParams p;
    p.json_object = true;
    p.temperature = 1.0;
    p.seed = static_cast<uint64_t>(i);
    p.max_tokens = 200;
    p.stop_token_ids = {10};  // text "1"; and the model's eos is 1 (text "}"): never taken
    params.push_back(p);
  }
  Scheduler s(&model_->engine(), &cache, o);
  const std::vector<Result> got = RunAll(s, prompts, params);
  int closed = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(got[i].finished) << i;
    std::string text;
    for (int32_t t : got[i].tokens) {
      EXPECT_NE(texts[static_cast<size_t>(t)], "") << "request " << i << ": a special token";
      EXPECT_NE(t, 10) << "request " << i << ": a stop token";
      EXPECT_NE(t, 1) << "request " << i << ": the model's eos";
      text += texts[static_cast<size_t>(t)];
    }
    ASSERT_FALSE(text.empty());
    EXPECT_EQ(text[0], '{') << text;
    if (got[i].reason == FinishReason::kStop) {
      ++closed;
      // (exponents set to 1 first: nlohmann refuses numbers a double cannot hold, which JSON
      // allows and Python and JavaScript read as infinities)
      const auto j = nlohmann::json::parse(
          std::regex_replace(text, std::regex("([eE][+-]?)[0-9]+"), "$011"), nullptr,
          /*allow_exceptions=*/false);
      EXPECT_TRUE(j.is_object()) << "request " << i << ": " << text;
    } else {
      EXPECT_EQ(got[i].reason, FinishReason::kLength) << i;
      EXPECT_EQ(got[i].tokens.size(), 200u) << i;
    }
  }
  std::printf("JSON mode: %d of %zu answers closed their object within 200 tokens\n", closed,
              got.size());
  EXPECT_GT(closed, 0);
  // Alone, request 5 gives the same tokens.
  LatentKvCache alone_cache(model_->config(), 16, 64);
  Scheduler alone(&model_->engine(), &alone_cache, o);
  const std::vector<Result> one = RunAll(alone, {prompts[5]}, {params[5]});
  EXPECT_EQ(one[0].tokens, got[5].tokens);
  // A node without a tokenizer refuses JSON mode, naming the field.
  Scheduler none(&model_->engine(), &alone_cache, SchedulerOptions());
  auto refused = none.Submit(prompts[0], params[0], RequestCallbacks());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(refused.status().message().rfind("response_format:", 0), 0u) << refused.status();
}

}  // namespace
}  // namespace dmoe
