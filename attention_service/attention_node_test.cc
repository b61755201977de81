// An attention node whose KV caches the machine cannot hold is an error naming the flag, not an
// abort on std::bad_alloc. The allocations are made to fail for real: a death-test child lowers
// its address-space limit (RLIMIT_AS) to a few MiB above what it uses, then makes the cache.
#include "attention_service/attention_node.h"

#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <memory>
#include <string>

#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "attention_service/scheduler.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

// tiny-v3 (it has an MTP layer), loaded once.
LocalModel* Model() {
  static LocalModel* const model = [] {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string dir = std::string(tmp ? tmp : "/tmp") + "/attention_node_test_v3";
    TinyModelOptions o;
    o.seed = 5;
    const absl::Status st = WriteTinyModel(dir, *PresetConfig("tiny-v3"), o);
    auto m = st.ok() ? LocalModel::Load(dir) : st;
    if (!m.ok()) {
      std::fprintf(stderr, "tiny-v3: %s\n", m.status().ToString().c_str());
      std::abort();
    }
    return m->release();
  }();
  return model;
}

// Lets this process map only `headroom` more bytes than it has mapped now.
void LimitAddressSpace(uint64_t headroom) {
  std::ifstream statm("/proc/self/statm");
  uint64_t pages = 0;
  statm >> pages;
  const uint64_t now = pages * 4096;
  struct rlimit r;
  r.rlim_cur = r.rlim_max = now + headroom;
  if (setrlimit(RLIMIT_AS, &r) != 0) std::_Exit(3);
}

// Exits 0 when `st` has `code` and mentions `flag` (printing it), 1 otherwise.
void ExitWith(const absl::Status& st, absl::StatusCode code, const std::string& flag) {
  std::fprintf(stderr, "%s\n", st.ToString().c_str());
  std::_Exit(st.code() == code && st.message().find(flag) != absl::string_view::npos ? 0 : 1);
}

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)  // their own allocators
TEST(AttentionNodeMemory, MainCacheTheMachineCannotHoldIsResourceExhausted) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  KvCacheOptions o;
  o.blocks = std::numeric_limits<int32_t>::max();
  EXPECT_EXIT(
      {
        LimitAddressSpace(uint64_t{64} << 20);
        auto cache = MakeKvCache(Model()->config(), o);
        ExitWith(cache.status(), absl::StatusCode::kResourceExhausted, "--kv-blocks");
      },
      ::testing::ExitedWithCode(0), "RESOURCE_EXHAUSTED: --kv-cache-mib/--kv-blocks");
}

// The main cache fits; the MTP layer's, made with the node, does not.
TEST(AttentionNodeMemory, MtpCacheTheMachineCannotHoldIsResourceExhausted) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  SchedulerOptions so;
  so.speculative_tokens = 2;
  EXPECT_EXIT(
      {
        // 64 MiB of main cache (f32, 4 layers): the MTP cache is over 16 MiB.
        KvCacheOptions o;
        o.mib = 64;
        auto cache = MakeKvCache(Model()->config(), o);
        if (!cache.ok()) std::_Exit(2);
        LimitAddressSpace(uint64_t{4} << 20);
        auto node = AttentionNode::Create(Model(), std::move(*cache), so);
        ExitWith(node.status(), absl::StatusCode::kResourceExhausted, "--speculative-tokens");
      },
      ::testing::ExitedWithCode(0), "RESOURCE_EXHAUSTED: --speculative-tokens");
}
#endif

TEST(AttentionNodeMemory, MtpCacheOverInt32BlocksIsInvalidArgument) {
  SchedulerOptions so;
  so.speculative_tokens = 2;
  so.max_running = int64_t{1} << 30;  // 3 spare MTP blocks each: over 2^31-1
  auto node =
      AttentionNode::Create(Model(), std::make_unique<LatentKvCache>(Model()->config(), 16, 8), so);
  EXPECT_EQ(node.status().code(), absl::StatusCode::kInvalidArgument) << node.status();
  EXPECT_NE(node.status().message().find("--speculative-tokens"), absl::string_view::npos);
}

TEST(AttentionNodeMemory, NodeThatFitsIsMade) {
  SchedulerOptions so;
  so.speculative_tokens = 2;
  auto node = AttentionNode::Create(Model(),
                                    std::make_unique<LatentKvCache>(Model()->config(), 16, 64), so);
  ASSERT_TRUE(node.ok()) << node.status();
  EXPECT_EQ((*node)->scheduler().load().total_blocks, 64);
}

}  // namespace
}  // namespace dmoe
