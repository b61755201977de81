// Speculative decoding through the local cluster: dmoe-router, dmoe-expert shards (which host the
// MTP layer's routed experts like any other layer's) and a dmoe-attention node with
// --speculative-tokens, over real gRPC and real UCX (tcp on loopback). 64 mixed greedy requests
// give the in-process engine's plain greedy tokens, also while a shard with replicas is killed.
#include <signal.h>

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/cluster_harness.h"

namespace dmoe {
namespace {

using testing::Cluster;

constexpr int kRequests = 64;
constexpr int kMaxTokens = 20;

TEST(SpeculativeCluster, GreedyOutputEqualsThePlainInProcessEngine) {
  const std::string model = testing::TmpDir() + "/speculative_cluster_model";
  testing::Prompts prompts, expected;
  for (int i = 0; i < kRequests; ++i) {
    std::vector<int32_t> p;
    const int len = 1 + (i * 37) % 70;
    for (int j = 0; j < len; ++j) p.push_back((i * 97 + j * 13 + 5) % 512);
    prompts.push_back(p);
  }
  ASSERT_TRUE(testing::PrepareWorkload(model, 23, prompts, kMaxTokens, &expected, "tiny-v3").ok());
  for (bool kill : {false, true}) {
    // tiny-v3: MoE layers 1-3 and the MTP layer 4, x 16 experts = 64 (layer, expert) pairs.
    Cluster c(kill ? "spec_kill" : "spec", model);
    c.StartRouter({"--replication", "2"});
    for (int i = 0; i < 3; ++i) c.AddShard(64);
    ASSERT_GT(c.WaitForActive(0), 0u);
    c.StartAttention(
        {"--speculative-tokens", "2", "--token-budget", "128", "--prefill-chunk", "32"});
    const auto results = c.Run(prompts, kMaxTokens, 100, [&] {
      if (kill) c.shard(1).Kill(SIGKILL);
    });
    const testing::Summary s = testing::Summarize(results, expected);
    const internal::GetLoadReply load = c.AttentionLoad();
    std::printf(
        "%s: %d/%d identical to plain greedy; %llu drafted, %llu accepted, %llu verifying "
        "steps\n",
        kill ? "a shard killed mid-run" : "all shards up", s.identical, kRequests,
        static_cast<unsigned long long>(load.drafted_tokens()),
        static_cast<unsigned long long>(load.accepted_tokens()),
        static_cast<unsigned long long>(load.speculative_steps()));
    EXPECT_EQ(s.identical, kRequests);
    EXPECT_GT(load.drafted_tokens(), 0u);
    EXPECT_GT(load.speculative_steps(), 0u);
  }
}

}  // namespace
}  // namespace dmoe
