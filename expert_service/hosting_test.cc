#include "expert_service/hosting.h"

#include <chrono>
#include <cstdlib>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "model/routed_experts.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

using Key = HostingAgent::Key;

internal::PlacementUpdate Update(uint64_t version, const std::set<Key>& mine) {
  internal::PlacementUpdate u;
  u.set_version(version);
  for (const Key& k : mine) {
    auto* r = u.add_replicas();
    r->set_layer(static_cast<uint32_t>(k.first));
    r->set_expert(static_cast<uint32_t>(k.second));
    r->add_node_ids("shard-a");
  }
  return u;
}

std::set<Key> Hosted(const ExpertShard& shard) {
  std::set<Key> keys;
  for (const Key& k : shard.store()->Keys()) keys.insert(k);
  return keys;
}

template <class F>
bool WaitFor(F done) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!done() && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return done();
}

// A shard loads the experts a new map gives it and reports the version ready; once it is leaving
// (StopLoading: SIGTERM), a map's load is given up: not ready, nothing added, no load error. The
// load used to run to its end, however long, before the shard could exit.
TEST(HostingAgent, LoadsWhatAMapGivesItUntilItStopsLoading) {
  const ModelConfig c = *PresetConfig("tiny");
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/hosting_model";
  ASSERT_TRUE(WriteTinyModel(dir, c, TinyModelOptions()).ok());
  const std::vector<Key> all = ExpertStore::AllExperts(c);
  ASSERT_GE(all.size(), 3u);
  ExpertShard shard(c, std::make_shared<ExpertStore>());
  HostingAgent agent(c, dir, "shard-a", &shard, std::chrono::milliseconds(0), WeightDType::kF32);
  agent.Start();
  const std::set<Key> first = {all[0], all[1]};
  agent.OnUpdate(Update(1, first));
  ASSERT_TRUE(WaitFor([&] { return agent.ready_version() == 1; }));
  EXPECT_EQ(Hosted(shard), first);

  agent.StopLoading();
  agent.OnUpdate(Update(2, {all[0], all[1], all[2]}));
  ASSERT_TRUE(WaitFor([&] { return agent.loads_given_up() == 1; }));
  EXPECT_EQ(agent.ready_version(), 1u);
  EXPECT_EQ(agent.load_errors(), 0u);
  EXPECT_EQ(Hosted(shard), first);
  agent.Stop();
}

}  // namespace
}  // namespace dmoe
