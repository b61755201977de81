#include "attention_service/attention_metrics.h"

#include <chrono>
#include <set>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

// The shard label values of every exported series.
std::set<std::string> ShardLabels(Metrics& m) {
  std::set<std::string> shards;
  for (const auto& family : m.registry().Collect()) {
    for (const auto& metric : family.metric) {
      for (const auto& label : metric.label) {
        if (label.name == "shard") shards.insert(label.value);
      }
    }
  }
  return shards;
}

// Per-shard series of a shard gone quiet for 10 minutes are removed (its label came from a pod
// that restarted or was scaled away); a shard still in use keeps its series. They were kept
// forever, ~22 series per shard that ever existed.
TEST(AttentionMetrics, SeriesOfShardsGoneQuietAreRemoved) {
  Metrics m;
  AttentionMetrics am(&m, *PresetConfig("tiny"));
  RoundTripObserver observe = am.RoundTrips();
  observe("old@10.0.0.1:1", 0.001, 4, 100, 100, true);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto mid = std::chrono::steady_clock::now();  // after old's last round trip, before new's
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  observe("new@10.0.0.2:1", 0.001, 4, 100, 100, false);
  EXPECT_EQ(ShardLabels(m), (std::set<std::string>{"old@10.0.0.1:1", "new@10.0.0.2:1"}));
  am.PruneShards(mid + std::chrono::minutes(9));
  EXPECT_EQ(ShardLabels(m).size(), 2u);
  am.PruneShards(mid + std::chrono::minutes(10));  // old: over 10 min quiet; new: under
  EXPECT_EQ(ShardLabels(m), (std::set<std::string>{"new@10.0.0.2:1"}));
  // A pruned shard that comes back gets fresh series.
  observe("old@10.0.0.1:1", 0.001, 4, 100, 100, true);
  EXPECT_EQ(ShardLabels(m).size(), 2u);
}

}  // namespace
}  // namespace dmoe
