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

#include "gtest/gtest.h"
#include "tests/cluster_harness.h"

namespace dmoe {
namespace {

using testing::Cluster;
using testing::Delta;
using testing::MaxOverMean;
using testing::Result;
using testing::Summary;
using Clock = std::chrono::steady_clock;

constexpr int kRequests = 32;
constexpr int kMaxTokens = 24;

std::string* g_model = nullptr;
testing::Prompts* g_prompts = nullptr;
testing::Prompts* g_expected = nullptr;

// The model and the expected outputs (the in-process engine, each request alone), made once for
// all tests. Returns what failed, "" when ready. No ASSERT here: a failure must fail every test
// (a failing global gtest Environment would list the tests as passed without running them).
std::string SharedSetUp() {
  g_model = new std::string(testing::TmpDir() + "/router_model");
  g_prompts = new testing::Prompts();
  g_expected = new testing::Prompts();
  for (int i = 0; i < kRequests; ++i) {
    std::vector<int32_t> p;
    const int len = 2 + (i * 37) % 60;
    for (int j = 0; j < len; ++j) p.push_back((i * 97 + j * 13 + 5) % 512);
    g_prompts->push_back(p);
  }
  const absl::Status st =
      testing::PrepareWorkload(*g_model, 57, *g_prompts, kMaxTokens, g_expected);
  return st.ok() ? "" : std::string(st.message());
}

class RouterCluster : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { setup_error_ = new std::string(SharedSetUp()); }
  void SetUp() override { ASSERT_EQ(*setup_error_, "") << "shared set-up failed"; }
  static std::string* setup_error_;
};
std::string* RouterCluster::setup_error_ = nullptr;

// The 32 requests (or `prompts`), concurrently; `during` runs after `trigger` streamed tokens.
std::vector<Result> Workload(Cluster& c, int trigger, const std::function<void()>& during,
                             const testing::Prompts& prompts = *g_prompts,
                             int max_tokens = kMaxTokens) {
  return c.Run(prompts, max_tokens, trigger, during);
}

Summary Summarize(const std::vector<Result>& results) {
  return testing::Summarize(results, *g_expected);
}

// tiny: 3 MoE layers x 16 experts = 48 (layer, expert) pairs.
TEST_F(RouterCluster, KillOneOfThreeShardsWithReplicas) {
  Cluster c("replicas", *g_model);
  c.StartRouter({"--replication", "2"});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  ASSERT_GT(c.WaitForActive(0), 0u);
  c.StartAttention();
  const auto results = Workload(c, kRequests * 4, [&] { c.shard(1).Kill(SIGKILL); });
  const Summary s = Summarize(results);
  std::printf(
      "kill -9 1 of 3 shards, 2 replicas of every expert: %d/%d ok, %d identical to the fault-free "
      "output, %d failed; longest stall of any stream %.3f s\n",
      s.ok, kRequests, s.identical, kRequests - s.ok, s.longest_gap);
  EXPECT_EQ(s.ok, kRequests);
  EXPECT_EQ(s.identical, kRequests);
}

// A shard that stops answering (SIGSTOP) is routed around (its calls are hedged to the other
// replica); when it comes back (SIGCONT) it serves again.
TEST_F(RouterCluster, PausedShardIsRoutedAroundAndComesBackIntoUse) {
  Cluster c("paused", *g_model);
  c.StartRouter({"--replication", "2"});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  ASSERT_GT(c.WaitForActive(0), 0u);
  c.StartAttention();
  auto results = Workload(c, kRequests * 4, [&] { ::kill(c.shard(1).pid(), SIGSTOP); });
  Summary s = Summarize(results);
  std::printf(
      "SIGSTOP of 1 of 3 shards (2 replicas, expert deadline 2 s): %d/%d ok, %d identical, longest "
      "stall %.3f s\n",
      s.ok, kRequests, s.identical, s.longest_gap);
  EXPECT_EQ(s.identical, kRequests);
  ::kill(c.shard(1).pid(), SIGCONT);
  // It serves again: as soon as its late reply (the hedging probe) arrives, or -- when it was
  // stopped long enough for the router's lease to drop it -- once it has registered again and a
  // map with it is active (a fresh connection).
  std::vector<double> after;
  for (int round = 0; round < 10; ++round) {
    const auto before = c.ShardTokens();
    s = Summarize(Workload(c, 0, nullptr));
    after = Delta(c.ShardTokens(), before);
    EXPECT_EQ(s.identical, kRequests);
    if (after[1] > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  std::printf("after SIGCONT: pairs per shard %.0f %.0f %.0f, %d identical\n", after[0], after[1],
              after[2], s.identical);
  EXPECT_GT(after[1], 0) << "the resumed shard got no traffic";
}

TEST_F(RouterCluster, KillOneOfThreeShardsWithoutReplicas) {
  Cluster c("noreplicas", *g_model);
  c.StartRouter({});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  const uint64_t v = c.WaitForActive(0);
  ASSERT_GT(v, 0u);
  c.StartAttention();
  const auto t0 = Clock::now();
  const auto results = Workload(c, kRequests * 4, [&] { c.shard(1).Kill(SIGKILL); });
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
  Cluster c("scaleout", *g_model);
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
  Summary s = Summarize(Workload(c, 0, nullptr, shifted(1)));
  EXPECT_EQ(s.ok, kRequests);
  const auto before = Delta(c.ShardTokens(), before0);
  // Scale out while the test workload runs.
  uint64_t v2 = 0;
  const auto results = Workload(c, kRequests * 4, [&] {
    c.AddShard(48);
    v2 = c.WaitForActive(v);
  });
  s = Summarize(results);
  EXPECT_EQ(s.ok, kRequests);
  EXPECT_EQ(s.identical, kRequests);
  ASSERT_GT(v2, v) << "no map with the 4th shard became active";
  // After: the same kind of workload on 4 shards.
  const auto after0 = c.ShardTokens();
  const Summary s2 = Summarize(Workload(c, 0, nullptr, shifted(2)));
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
  Cluster c("sigterm", *g_model);
  c.StartRouter({});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  const uint64_t v = c.WaitForActive(0);
  ASSERT_GT(v, 0u);
  c.StartAttention();
  int exit_code = -2;
  double exit_seconds = 0;
  std::thread stopper;
  const auto results = Workload(c, kRequests * 4, [&] {
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
  Cluster c("restart", *g_model);
  c.StartRouter({});
  for (int i = 0; i < 3; ++i) c.AddShard(48);
  const uint64_t v = c.WaitForActive(0);
  ASSERT_GT(v, 0u);
  c.StartAttention();
  uint64_t v2 = 0;
  const auto results = Workload(c, kRequests * 4, [&] {
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

// Replicas must compute alike (a request's output must not depend on which serves it): a shard
// with another --expert-dtype, and an attention node with another --kv-cache-dtype, are refused by
// the router and exit with status 2 saying why; the cluster serves on with the nodes that agree.
TEST_F(RouterCluster, NodesThatComputeOtherwiseAreRefusedAndExit) {
  Cluster c("unlike", *g_model);
  c.StartRouter({});
  c.AddShard(48);
  ASSERT_GT(c.WaitForActive(0), 0u);
  c.AddShard(48, {"--expert-dtype", "int8"});
  EXPECT_EQ(c.shard(1).Wait(std::chrono::seconds(20)), 2) << c.shard(1).Log();
  const std::string shard_log = c.shard(1).Log();
  EXPECT_NE(shard_log.find("experts=int8 stored=F32 device=cpu"), std::string::npos) << shard_log;
  EXPECT_NE(shard_log.find("experts=f32 stored=F32 device=cpu"), std::string::npos) << shard_log;
  c.StartAttention();
  c.AddAttention({"--kv-cache-dtype", "bf16"});
  EXPECT_EQ(c.attention(1).Wait(std::chrono::seconds(20)), 2) << c.attention(1).Log();
  EXPECT_NE(c.attention(1).Log().find("kv=bf16"), std::string::npos) << c.attention(1).Log();
  EXPECT_TRUE(ProcessAlive(c.shard(0).pid()));
  EXPECT_TRUE(ProcessAlive(c.attention(0).pid()));
  const Summary s = Summarize(Workload(c, 0, nullptr));
  EXPECT_EQ(s.ok, kRequests);
  EXPECT_EQ(s.identical, kRequests);
}

TEST_F(RouterCluster, EplbReplicasEvenASkewedLoad) {
  Cluster c("eplb", *g_model);
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
  Summary s = Summarize(Workload(c, 0, nullptr, skewed, 8));
  EXPECT_EQ(s.ok, kRequests);
  const auto before = Delta(c.ShardTokens(), t0);
  // Load reports (every 1 s) reach the router, which rebalances (every 1 s).
  const uint64_t v2 = c.WaitForActive(v, std::chrono::seconds(15));
  ASSERT_GT(v2, v) << "no rebalanced map became active";
  const auto t1 = c.ShardTokens();
  s = Summarize(Workload(c, 0, nullptr, skewed, 8));
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
