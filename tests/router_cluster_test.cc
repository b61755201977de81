// The router with real processes (DESIGN.md §4): dmoe-router, dmoe-expert shards that take their
// experts from it, and a dmoe-attention node that follows its placement maps, all over real
// gRPC and real UCX (tcp on loopback). A 32-request greedy workload runs while a shard is killed
// (with and without replicas), a shard is added, a shard is stopped with SIGTERM, and the router
// itself is killed and restarted; every output is compared with the in-process engine run alone.
// Skewed load shows EPLB replicas evening the per-shard load.
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"
#include "proto/attention.grpc.pb.h"
#include "proto/expert_control.grpc.pb.h"
#include "proto/router.grpc.pb.h"
#include "tests/process_util.h"

namespace dmoe {
namespace {

using testing::ChildProcess;
using testing::Runfile;
using testing::TmpDir;
using Clock = std::chrono::steady_clock;

constexpr int kRequests = 32;
constexpr int kMaxTokens = 24;

std::string* g_model = nullptr;
std::vector<std::vector<int32_t>>* g_prompts = nullptr;
std::vector<std::vector<int32_t>>* g_expected = nullptr;

// The model and the expected outputs (the in-process engine, each request alone), made once for
// all tests. Returns what failed, "" when ready. No ASSERT here: a failure must fail every test
// (a failing global gtest Environment would list the tests as passed without running them).
std::string SharedSetUp() {
  setenv("UCX_NET_DEVICES", "lo", 1);
  setenv("UCX_TLS", "tcp,self", 1);
  g_model = new std::string(TmpDir() + "/router_model");
  TinyModelOptions o;
  o.seed = 57;
  if (auto st = WriteTinyModel(*g_model, *PresetConfig("tiny"), o); !st.ok()) {
    return std::string(st.message());
  }
  g_prompts = new std::vector<std::vector<int32_t>>();
  g_expected = new std::vector<std::vector<int32_t>>();
  auto local = LocalModel::Load(*g_model);
  if (!local.ok()) return std::string(local.status().message());
  for (int i = 0; i < kRequests; ++i) {
    std::vector<int32_t> p;
    const int len = 2 + (i * 37) % 60;
    for (int j = 0; j < len; ++j) p.push_back((i * 97 + j * 13 + 5) % 512);
    GenerateOptions g;
    g.max_tokens = kMaxTokens;
    g.ignore_eos = true;
    auto want = Generate((*local)->engine(), p, g);  // the in-process engine, alone
    if (!want.ok()) return std::string(want.status().message());
    g_prompts->push_back(p);
    g_expected->push_back(*want);
  }
  return "";
}

class RouterCluster : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { setup_error_ = new std::string(SharedSetUp()); }
  void SetUp() override { ASSERT_EQ(*setup_error_, "") << "shared set-up failed"; }
  static std::string* setup_error_;
};
std::string* RouterCluster::setup_error_ = nullptr;

struct Result {
  std::vector<int32_t> tokens;
  grpc::Status status;
  double longest_gap = 0;  // seconds between consecutive streamed tokens (or start -> first)
};

// A router, expert shards and one attention node, each a child process.
class Cluster {
 public:
  explicit Cluster(std::string name) : name_(std::move(name)) {}

  void StartRouter(std::vector<std::string> extra, const std::string& listen = "127.0.0.1:0") {
    const std::string ready = Path("router" + std::to_string(router_starts_) + ".json");
    std::vector<std::string> argv = {Runfile("router/dmoe-router"),
                                     "--model",
                                     *g_model,
                                     "--grpc-listen",
                                     listen,
                                     "--ready-file",
                                     ready,
                                     "--lease-ms",
                                     "1500"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    router_extra_ = extra;
    router_ = ChildProcess(argv, Path("router" + std::to_string(router_starts_++) + ".log"));
    auto info = testing::WaitForReadyFile(ready, std::chrono::seconds(30));
    ASSERT_FALSE(info.empty()) << router_.Log();
    router_addr_ = info["grpc"];
    router_stub_ = internal::RouterService::NewStub(
        grpc::CreateChannel(router_addr_, grpc::InsecureChannelCredentials()));
  }
  // Kills the router and starts it again on the same address.
  void RestartRouter() {
    router_.Kill(SIGKILL);
    std::vector<std::string> extra = router_extra_;
    StartRouter(extra, router_addr_);
  }

  void AddShard(int capacity, std::vector<std::string> extra = {}) {
    const int i = static_cast<int>(shards_.size());
    const std::string ready = Path("shard" + std::to_string(i) + ".json");
    std::vector<std::string> argv = {Runfile("expert_service/dmoe-expert"),
                                     "--model",
                                     *g_model,
                                     "--router",
                                     router_addr_,
                                     "--capacity",
                                     std::to_string(capacity),
                                     "--node-id",
                                     "shard-" + std::to_string(i),
                                     "--drain-ms",
                                     "500",
                                     "--ready-file",
                                     ready};
    argv.insert(argv.end(), extra.begin(), extra.end());
    shards_.emplace_back(argv, Path("shard" + std::to_string(i) + ".log"));
    auto info = testing::WaitForReadyFile(ready, std::chrono::seconds(30));
    ASSERT_FALSE(info.empty()) << shards_.back().Log();
    shard_stubs_.push_back(internal::ExpertControl::NewStub(
        grpc::CreateChannel(info["grpc"], grpc::InsecureChannelCredentials())));
  }

  void StartAttention() {
    const std::string ready = Path("attention.json");
    attention_ = ChildProcess(
        {Runfile("attention_service/dmoe-attention"), "--model", *g_model, "--router", router_addr_,
         "--kv-blocks", "1024", "--block-tokens", "8", "--wire-dtype", "f32",
         "--expert-deadline-ms", "2000", "--expert-wait-ms", "15000", "--ready-file", ready},
        Path("attention.log"));
    auto info = testing::WaitForReadyFile(ready, std::chrono::seconds(60));
    ASSERT_FALSE(info.empty()) << attention_.Log();
    stub_ = internal::AttentionService::NewStub(
        grpc::CreateChannel(info["grpc"], grpc::InsecureChannelCredentials()));
  }

  // Waits until the router's active map has a version > `above` (and every shard of it is ready).
  uint64_t WaitForActive(uint64_t above, std::chrono::seconds timeout = std::chrono::seconds(20)) {
    const auto until = Clock::now() + timeout;
    while (Clock::now() < until) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
      internal::ListNodesReply reply;
      if (router_stub_->ListNodes(&ctx, internal::ListNodesRequest(), &reply).ok() &&
          reply.placement_version() > above) {
        return reply.placement_version();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return 0;
  }

  // Token rows each shard has computed so far (0 for a dead one).
  std::vector<double> ShardTokens() {
    std::vector<double> out;
    for (auto& stub : shard_stubs_) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      internal::GetStatsReply s;
      out.push_back(stub->GetStats(&ctx, internal::GetStatsRequest(), &s).ok()
                        ? static_cast<double>(s.pairs())
                        : 0.0);
    }
    return out;
  }

  // Runs the 32 requests concurrently; `during` runs once `trigger_tokens` tokens have streamed.
  std::vector<Result> Run(int trigger_tokens, const std::function<void()>& during,
                          const std::vector<std::vector<int32_t>>& prompts = *g_prompts,
                          int max_tokens = kMaxTokens) {
    std::vector<Result> results(prompts.size());
    std::atomic<int> streamed{0}, finished{0};
    std::vector<std::thread> clients;
    for (size_t i = 0; i < prompts.size(); ++i) {
      clients.emplace_back([&, i] {
        internal::GenerateRequest req;
        for (int32_t t : prompts[i]) req.add_prompt_token_ids(t);
        req.mutable_sampling()->set_max_tokens(max_tokens);
        req.mutable_sampling()->set_ignore_eos(true);
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(90));
        auto reader = stub_->Generate(&ctx, req);
        internal::GenerateResponse r;
        auto last = Clock::now();
        while (reader->Read(&r)) {
          if (r.tokens_size() == 0) continue;
          const auto now = Clock::now();
          results[i].longest_gap =
              std::max(results[i].longest_gap, std::chrono::duration<double>(now - last).count());
          last = now;
          for (const auto& t : r.tokens()) results[i].tokens.push_back(t.token_id());
          streamed += r.tokens_size();
        }
        results[i].status = reader->Finish();
        ++finished;
      });
    }
    if (during) {
      const auto until = Clock::now() + std::chrono::seconds(60);
      while (streamed < trigger_tokens && finished < static_cast<int>(prompts.size()) &&
             Clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      // The fault must land mid-flight: after the trigger and with requests still streaming.
      const int in_flight = static_cast<int>(prompts.size()) - finished.load();
      EXPECT_GE(streamed.load(), trigger_tokens) << "the trigger was never reached";
      EXPECT_GT(in_flight, 0) << "the fault came after every request had finished";
      std::printf("fault after %d streamed tokens, %d of %zu requests in flight\n", streamed.load(),
                  in_flight, prompts.size());
      during();
    }
    for (auto& t : clients) t.join();
    return results;
  }

  ChildProcess& shard(int i) { return shards_[static_cast<size_t>(i)]; }
  ChildProcess& attention() { return attention_; }
  std::string Path(const std::string& f) const { return TmpDir() + "/" + name_ + "_" + f; }

 private:
  std::string name_;
  ChildProcess router_;
  int router_starts_ = 0;
  std::vector<std::string> router_extra_;
  std::string router_addr_;
  std::unique_ptr<internal::RouterService::Stub> router_stub_;
  std::vector<ChildProcess> shards_;
  std::vector<std::unique_ptr<internal::ExpertControl::Stub>> shard_stubs_;
  ChildProcess attention_;
  std::unique_ptr<internal::AttentionService::Stub> stub_;
};

struct Summary {
  int ok = 0, identical = 0, unavailable = 0, other = 0;
  double longest_gap = 0;
};

Summary Summarize(const std::vector<Result>& results) {
  Summary s;
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    s.longest_gap = std::max(s.longest_gap, r.longest_gap);
    if (r.status.ok()) {
      ++s.ok;
      s.identical += r.tokens == (*g_expected)[i];
    } else if (r.status.error_code() == grpc::StatusCode::UNAVAILABLE) {
      ++s.unavailable;
    } else {
      ++s.other;
      std::printf("request %zu: %d %s\n", i, r.status.error_code(),
                  r.status.error_message().c_str());
    }
  }
  return s;
}

double MaxOverMean(const std::vector<double>& v) {
  double sum = 0, mx = 0;
  for (double x : v) {
    sum += x;
    mx = std::max(mx, x);
  }
  return sum > 0 ? mx / (sum / static_cast<double>(v.size())) : 0;
}

std::vector<double> Delta(const std::vector<double>& after, const std::vector<double>& before) {
  std::vector<double> d(after.size());
  for (size_t i = 0; i < after.size(); ++i) {
    d[i] = after[i] - (i < before.size() ? before[i] : 0.0);
  }
  return d;
}

// tiny: 3 MoE layers x 16 experts = 48 (layer, expert) pairs.
TEST_F(RouterCluster, KillOneOfThreeShardsWithReplicas) {
  Cluster c("replicas");
  c.StartRouter({"--replication", "2"});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  ASSERT_GT(c.WaitForActive(0), 0u);
  c.StartAttention();
  const auto results = c.Run(kRequests * 4, [&] { c.shard(1).Kill(SIGKILL); });
  const Summary s = Summarize(results);
  std::printf(
      "kill -9 1 of 3 shards, 2 replicas of every expert: %d/%d ok, %d identical to the fault-free "
      "output, %d failed; longest stall of any stream %.3f s\n",
      s.ok, kRequests, s.identical, kRequests - s.ok, s.longest_gap);
  EXPECT_EQ(s.ok, kRequests);
  EXPECT_EQ(s.identical, kRequests);
}

// A shard that stops answering (SIGSTOP) is routed around; when it comes back (SIGCONT) it
// registers again and, once a map with it is active, serves again over a fresh connection.
TEST_F(RouterCluster, PausedShardIsRoutedAroundAndComesBackIntoUse) {
  Cluster c("paused");
  c.StartRouter({"--replication", "2"});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  ASSERT_GT(c.WaitForActive(0), 0u);
  c.StartAttention();
  auto results = c.Run(kRequests * 4, [&] { ::kill(c.shard(1).pid(), SIGSTOP); });
  Summary s = Summarize(results);
  std::printf(
      "SIGSTOP of 1 of 3 shards (2 replicas, expert deadline 2 s): %d/%d ok, %d identical, longest "
      "stall %.3f s\n",
      s.ok, kRequests, s.identical, s.longest_gap);
  EXPECT_EQ(s.identical, kRequests);
  const uint64_t without = c.WaitForActive(0);
  ::kill(c.shard(1).pid(), SIGCONT);
  // It re-registers; a map with it again becomes active.
  uint64_t with = c.WaitForActive(without);
  ASSERT_GT(with, without);
  // Within a few workloads (the map without it may still have been the one becoming active), the
  // resumed shard serves again.
  std::vector<double> after;
  for (int round = 0; round < 5; ++round) {
    const auto before = c.ShardTokens();
    s = Summarize(c.Run(0, nullptr));
    after = Delta(c.ShardTokens(), before);
    EXPECT_EQ(s.identical, kRequests);
    if (after[1] > 0) break;
    with = c.WaitForActive(with, std::chrono::seconds(5));
  }
  std::printf("after SIGCONT (placement %llu): pairs per shard %.0f %.0f %.0f, %d identical\n",
              static_cast<unsigned long long>(with), after[0], after[1], after[2], s.identical);
  EXPECT_GT(after[1], 0) << "the resumed shard got no traffic";
}

TEST_F(RouterCluster, KillOneOfThreeShardsWithoutReplicas) {
  Cluster c("noreplicas");
  c.StartRouter({});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  const uint64_t v = c.WaitForActive(0);
  ASSERT_GT(v, 0u);
  c.StartAttention();
  const auto t0 = Clock::now();
  const auto results = c.Run(kRequests * 4, [&] { c.shard(1).Kill(SIGKILL); });
  const double total = std::chrono::duration<double>(Clock::now() - t0).count();
  const Summary s = Summarize(results);
  std::printf(
      "kill -9 1 of 3 shards, no replicas: %d completed (%d identical to the fault-free output), "
      "%d UNAVAILABLE, %d other, 0 hung (all ended within %.2f s); longest stall %.3f s\n",
      s.ok, s.identical, s.unavailable, s.other, total, s.longest_gap);
  EXPECT_EQ(s.ok + s.unavailable, kRequests);
  EXPECT_EQ(s.identical, s.ok);
  EXPECT_EQ(s.other, 0);
  // The survivors took the dead shard's experts: a newer map is active.
  EXPECT_GT(c.WaitForActive(v), v);
}

TEST_F(RouterCluster, ScaleOutToAFourthShardUnderLoad) {
  Cluster c("scaleout");
  c.StartRouter({});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  const uint64_t v = c.WaitForActive(0);
  ASSERT_GT(v, 0u);
  c.StartAttention();
  // Load is measured on prompt sets of their own (shifted tokens), so that the prefix cache does
  // not make one workload cheaper than another.
  auto shifted = [](int by) {
    std::vector<std::vector<int32_t>> p = *g_prompts;
    for (auto& q : p) {
      for (int32_t& t : q) t = (t + by) % 512;
    }
    return p;
  };
  // Before: one workload on 3 shards.
  const auto before0 = c.ShardTokens();
  Summary s = Summarize(c.Run(0, nullptr, shifted(1)));
  EXPECT_EQ(s.ok, kRequests);
  const auto before = Delta(c.ShardTokens(), before0);
  // Scale out while the test workload runs.
  uint64_t v2 = 0;
  const auto results = c.Run(kRequests * 4, [&] {
    c.AddShard(48);
    v2 = c.WaitForActive(v);
  });
  s = Summarize(results);
  EXPECT_EQ(s.ok, kRequests);
  EXPECT_EQ(s.identical, kRequests);
  ASSERT_GT(v2, v) << "no map with the 4th shard became active";
  // After: the same kind of workload on 4 shards.
  const auto after0 = c.ShardTokens();
  const Summary s2 = Summarize(c.Run(0, nullptr, shifted(2)));
  EXPECT_EQ(s2.ok, kRequests);
  const auto after = Delta(c.ShardTokens(), after0);
  auto share = [](const std::vector<double>& v) {
    double sum = 0;
    for (double x : v) sum += x;
    return sum > 0 ? *std::max_element(v.begin(), v.end()) / sum : 0;
  };
  const std::vector<double> before3 = {before[0], before[1], before[2]};
  std::printf(
      "scale-out to 4 shards under load: %d/%d ok, %d identical to the fault-free output, "
      "placement %llu -> %llu, longest stall %.3f s\n",
      s.ok, kRequests, s.identical, static_cast<unsigned long long>(v),
      static_cast<unsigned long long>(v2), s.longest_gap);
  std::printf(
      "  (token, expert) pairs per shard, one workload before: %.0f %.0f %.0f (max/mean %.2f, "
      "busiest shard %.1f%% of all)\n",
      before[0], before[1], before[2], MaxOverMean(before3), 100 * share(before3));
  std::printf("  after: %.0f %.0f %.0f %.0f (max/mean %.2f, busiest shard %.1f%% of all)\n",
              after[0], after[1], after[2], after[3], MaxOverMean(after), 100 * share(after));
  EXPECT_GT(after[3], 0);
  EXPECT_LT(share(after), share(before3));
}

TEST_F(RouterCluster, SigtermToAShardUnderLoadFailsNothing) {
  Cluster c("sigterm");
  c.StartRouter({});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  const uint64_t v = c.WaitForActive(0);
  ASSERT_GT(v, 0u);
  c.StartAttention();
  int exit_code = -2;
  double exit_seconds = 0;
  std::thread stopper;
  const auto results = c.Run(kRequests * 4, [&] {
    stopper = std::thread([&] {
      const auto t0 = Clock::now();
      ::kill(c.shard(2).pid(), SIGTERM);
      exit_code = c.shard(2).Wait(std::chrono::seconds(40));
      exit_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    });
  });
  stopper.join();
  const Summary s = Summarize(results);
  std::printf(
      "SIGTERM to 1 of 3 shards under load: %d/%d ok, %d identical, %d failed; the shard left "
      "after %.2f s (exit %d), longest stall %.3f s\n",
      s.ok, kRequests, s.identical, kRequests - s.ok, exit_seconds, exit_code, s.longest_gap);
  EXPECT_EQ(s.ok, kRequests);
  EXPECT_EQ(s.identical, kRequests);
  EXPECT_EQ(exit_code, 0) << c.shard(2).Log();
  EXPECT_NE(c.shard(2).Log().find("active without this shard"), std::string::npos)
      << c.shard(2).Log();
}

TEST_F(RouterCluster, RouterKilledAndRestartedUnderLoad) {
  Cluster c("restart");
  c.StartRouter({});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  const uint64_t v = c.WaitForActive(0);
  ASSERT_GT(v, 0u);
  c.StartAttention();
  uint64_t v2 = 0;
  const auto results = c.Run(kRequests * 4, [&] {
    c.RestartRouter();
    v2 = c.WaitForActive(0);
  });
  const Summary s = Summarize(results);
  std::printf(
      "router killed (-9) and restarted under load: %d/%d ok, %d identical, %d failed; the new "
      "router's first active map is version %llu (the old one had %llu)\n",
      s.ok, kRequests, s.identical, kRequests - s.ok, static_cast<unsigned long long>(v2),
      static_cast<unsigned long long>(v));
  EXPECT_EQ(s.ok, kRequests);
  EXPECT_EQ(s.identical, kRequests);
  EXPECT_GT(v2, v) << "versions must not go back after a restart";
}

TEST_F(RouterCluster, EplbReplicasEvenASkewedLoad) {
  Cluster c("eplb");
  // 3 shards x 24 = 72 slots for 48 pairs: room for 24 replicas of hot experts.
  c.StartRouter({"--max-extra-replicas", "24", "--rebalance-seconds", "1"});
  for (int i = 0; i < 3; ++i) c.AddShard(24);
  const uint64_t v = c.WaitForActive(0);
  ASSERT_GT(v, 0u);
  c.StartAttention();
  // Skewed: every prompt repeats the same few tokens, so a few experts get most tokens.
  std::vector<std::vector<int32_t>> skewed;
  for (int i = 0; i < kRequests; ++i) skewed.push_back(std::vector<int32_t>(40, 7 + (i % 2)));
  const auto t0 = c.ShardTokens();
  Summary s = Summarize(c.Run(0, nullptr, skewed, 8));
  EXPECT_EQ(s.ok, kRequests);
  const auto before = Delta(c.ShardTokens(), t0);
  // Load reports (every 1 s) reach the router, which rebalances (every 1 s).
  const uint64_t v2 = c.WaitForActive(v, std::chrono::seconds(15));
  ASSERT_GT(v2, v) << "no rebalanced map became active";
  const auto t1 = c.ShardTokens();
  s = Summarize(c.Run(0, nullptr, skewed, 8));
  EXPECT_EQ(s.ok, kRequests);
  const auto after = Delta(c.ShardTokens(), t1);
  std::printf(
      "skewed load, per-shard (token, expert) pairs: before EPLB %.0f %.0f %.0f (max/mean %.2f), "
      "after (placement %llu) %.0f %.0f %.0f (max/mean %.2f)\n",
      before[0], before[1], before[2], MaxOverMean(before), static_cast<unsigned long long>(v2),
      after[0], after[1], after[2], MaxOverMean(after));
  EXPECT_LT(MaxOverMean(after), MaxOverMean(before));
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
