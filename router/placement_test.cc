// Property tests of the placement over many random model shapes, shard sets and loads (fixed
// seeds): coverage, capacity, distinct replicas, groups kept together, determinism, and EPLB
// lowering the max/mean shard load on skewed loads.
#include "router/placement.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <set>

#include "gtest/gtest.h"

namespace dmoe::router {
namespace {

// max / mean of the per-shard load, each expert's load split evenly over its replicas: written
// here from the definition, independently of placement.cc (whose Imbalance is checked against
// it and against a hand computation below).
double ExpectedImbalance(const PlacementMap& m, const std::map<ExpertKey, double>& load) {
  std::map<int, double> per;
  for (size_t s = 0; s < m.shards.size(); ++s) per[static_cast<int>(s)] = 0;
  for (const auto& [key, value] : load) {
    auto it = m.replicas.find(key);
    if (it == m.replicas.end() || it->second.empty()) continue;
    for (int s : it->second) per[s] += value / static_cast<double>(it->second.size());
  }
  double sum = 0, mx = 0;
  for (const auto& [s, v] : per) {
    sum += v;
    mx = std::max(mx, v);
  }
  return sum > 0 ? mx * static_cast<double>(per.size()) / sum : 1.0;
}

TEST(Placement, ImbalanceByHand) {
  PlacementMap m;
  m.shards = {"a", "b", "c"};
  m.replicas[{1, 0}] = {0};     // 90 on a
  m.replicas[{1, 1}] = {0, 1};  // 30 + 30 on a and b
  m.replicas[{1, 2}] = {2};     // 30 on c
  const std::map<ExpertKey, double> load = {{{1, 0}, 90}, {{1, 1}, 60}, {{1, 2}, 30}};
  // Shards: a 120, b 30, c 30; mean 60; max/mean 2.
  EXPECT_DOUBLE_EQ(Imbalance(m, load), 2.0);
  EXPECT_DOUBLE_EQ(ExpectedImbalance(m, load), 2.0);
}

struct Case {
  ModelConfig config;
  std::vector<ShardSlot> shards;
  std::map<ExpertKey, double> load;
};

Case RandomCase(std::mt19937& rng, bool roomy) {
  Case k;
  ModelConfig& c = k.config;
  const int64_t groups[] = {1, 2, 4, 8};
  c.num_hidden_layers = 2 + rng() % 6;
  c.first_k_dense_replace = rng() % 2;
  c.n_group = groups[rng() % 4];
  c.n_routed_experts = c.n_group * (2 + rng() % 8);
  c.topk_group = 1 + rng() % c.n_group;
  c.num_experts_per_tok = 2;
  int64_t moe = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe += c.IsMoeLayer(l);
  const int64_t needed = moe * c.n_routed_experts;
  const int nshards = 1 + rng() % 7;
  // Enough room for everything (x1.0 - x2.5 of what is needed), spread unevenly.
  const double room = roomy ? 1.5 + (rng() % 100) / 100.0 : 1.0;
  int64_t left = static_cast<int64_t>(std::ceil(needed * room));
  for (int i = 0; i < nshards; ++i) {
    const int64_t cap =
        i + 1 == nshards ? left : std::max<int64_t>(1, left / (nshards - i) + (rng() % 5) - 2);
    k.shards.push_back({"s" + std::to_string(i), std::max<int64_t>(1, cap)});
    left -= k.shards.back().capacity;
  }
  if (left > 0) k.shards.back().capacity += left;
  // Zipf-skewed load over experts, per layer.
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.IsMoeLayer(l)) continue;
    std::vector<int64_t> order(static_cast<size_t>(c.n_routed_experts));
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
    std::shuffle(order.begin(), order.end(), rng);
    for (size_t r = 0; r < order.size(); ++r) k.load[{l, order[r]}] = 1000.0 / (r + 1);
  }
  return k;
}

void CheckInvariants(const Case& k, const PlacementMap& m) {
  const ModelConfig& c = k.config;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      auto it = m.replicas.find({l, e});
      if (!c.IsMoeLayer(l)) {
        EXPECT_EQ(it, m.replicas.end());
        continue;
      }
      ASSERT_NE(it, m.replicas.end()) << "layer " << l << " expert " << e << " has no replica";
      std::set<int> distinct(it->second.begin(), it->second.end());
      EXPECT_EQ(distinct.size(), it->second.size()) << "two replicas on one shard";
    }
  }
  const std::vector<int64_t> hosted = m.Hosted();
  for (size_t s = 0; s < k.shards.size(); ++s) {
    EXPECT_LE(hosted[s], k.shards[s].capacity) << "shard " << s << " over capacity";
  }
}

TEST(Placement, RandomCasesHoldEveryInvariant) {
  std::mt19937 rng(2026);
  int grouped = 0, improved = 0, skewed = 0;
  for (int i = 0; i < 300; ++i) {
    const Case k = RandomCase(rng, i % 3 != 0);
    PlacementOptions o;
    o.max_extra_replicas = 64;
    auto base = ComputePlacement(k.config, k.shards, k.load, PlacementOptions(), 1);
    auto eplb = ComputePlacement(k.config, k.shards, k.load, o, 2);
    ASSERT_TRUE(base.ok() && eplb.ok()) << base.status() << eplb.status();
    CheckInvariants(k, *base);
    CheckInvariants(k, *eplb);
    // Deterministic.
    auto again = ComputePlacement(k.config, k.shards, k.load, o, 2);
    EXPECT_EQ(again->replicas, eplb->replicas);
    // Base layout: every expert has one replica; with room, groups stay on one shard, so a token
    // reaches at most topk_group shards.
    bool together = true;
    for (const auto& [key, rs] : base->replicas) {
      EXPECT_EQ(rs.size(), 1u);
      if (k.config.n_group > 1) {
        const int64_t per = k.config.n_routed_experts / k.config.n_group;
        const int64_t first = key.second / per * per;
        together &= base->replicas.at({key.first, first})[0] == rs[0];
      }
    }
    if (k.config.n_group > 1 && together) ++grouped;
    // EPLB never makes the balance worse, and helps when there is room.
    const double before = ExpectedImbalance(*base, k.load),
                 after = ExpectedImbalance(*eplb, k.load);
    EXPECT_NEAR(Imbalance(*base, k.load), before, 1e-9);
    EXPECT_NEAR(Imbalance(*eplb, k.load), after, 1e-9);
    EXPECT_LE(after, before + 1e-9);
    int64_t free_slots = 0;
    for (size_t s = 0; s < k.shards.size(); ++s)
      free_slots += k.shards[s].capacity - base->Hosted()[s];
    if (before > 1.2 && k.shards.size() > 1 && free_slots > 0) {
      ++skewed;
      improved += after < before - 1e-9;
    }
  }
  std::printf(
      "300 cases: groups kept together in %d grouped cases; EPLB lowered max/mean in %d of %d "
      "imbalanced cases\n",
      grouped, improved, skewed);
  EXPECT_GT(grouped, 0);
  EXPECT_GT(improved, skewed / 2);
}

TEST(Placement, ReplicationPlacesDistinctCopiesWithinCapacity) {
  std::mt19937 rng(7);
  int full = 0;
  for (int i = 0; i < 200; ++i) {
    Case k = RandomCase(rng, true);
    int64_t needed = 0;
    for (int64_t l = 0; l < k.config.num_hidden_layers; ++l)
      needed += k.config.IsMoeLayer(l) ? k.config.n_routed_experts : 0;
    // Half the cases: every shard could hold a whole copy, so 2 copies must always fit.
    const bool room = i % 2 == 0;
    if (room) {
      for (auto& sh : k.shards) sh.capacity = needed + static_cast<int64_t>(rng() % 8);
    }
    PlacementOptions o;
    o.replication = 2;
    auto m = ComputePlacement(k.config, k.shards, k.load, o, 1);
    ASSERT_TRUE(m.ok()) << m.status();
    CheckInvariants(k, *m);
    if (room && k.shards.size() >= 2) {
      ++full;
      for (const auto& [key, rs] : m->replicas) EXPECT_EQ(rs.size(), 2u) << "case " << i;
    }
  }
  EXPECT_GT(full, 20);
  // The tiny shape on 3 shards with room for 2 copies: losing any one shard leaves every expert.
  ModelConfig c;
  c.num_hidden_layers = 4;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 16;
  c.n_group = 4;
  c.topk_group = 2;
  PlacementOptions o;
  o.replication = 2;
  auto m = ComputePlacement(c, {{"a", 32}, {"b", 32}, {"c", 32}}, {}, o, 1);
  ASSERT_TRUE(m.ok());
  for (int dead = 0; dead < 3; ++dead) {
    for (const auto& [key, rs] : m->replicas) {
      bool alive = false;
      for (int r : rs) alive |= r != dead;
      EXPECT_TRUE(alive) << "expert " << key.second << " of layer " << key.first;
    }
  }
}

TEST(Placement, TooLittleCapacityIsAClearError) {
  ModelConfig c;
  c.num_hidden_layers = 2;
  c.first_k_dense_replace = 0;
  c.n_routed_experts = 8;
  auto m = ComputePlacement(c, {{"a", 5}, {"b", 5}}, {}, PlacementOptions(), 1);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("16 (layer, expert) pairs but the shards hold 10"),
            absl::string_view::npos)
      << m.status();
  EXPECT_FALSE(ComputePlacement(c, {}, {}, PlacementOptions(), 1).ok());
  EXPECT_FALSE(ComputePlacement(c, {{"a", 0}}, {}, PlacementOptions(), 1).ok());
}

TEST(Placement, SkewedLoadOnTheTinyShape) {
  // The tiny preset's MoE shape on 4 shards with room for one extra replica each of a few experts.
  ModelConfig c;
  c.num_hidden_layers = 4;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 16;
  c.n_group = 4;
  c.topk_group = 2;
  std::vector<ShardSlot> shards = {{"a", 16}, {"b", 16}, {"c", 16}, {"d", 16}};
  std::map<ExpertKey, double> load;
  for (int64_t l = 1; l < 4; ++l) {
    for (int64_t e = 0; e < 16; ++e) load[{l, e}] = e < 2 ? 1000 : 10;  // experts 0, 1 are hot
  }
  auto base = ComputePlacement(c, shards, load, PlacementOptions(), 1);
  PlacementOptions o;
  o.max_extra_replicas = 16;
  auto eplb = ComputePlacement(c, shards, load, o, 2);
  ASSERT_TRUE(base.ok() && eplb.ok());
  std::printf("tiny shape, 2 hot experts per layer: max/mean shard load %.2f -> %.2f with EPLB\n",
              ExpectedImbalance(*base, load), ExpectedImbalance(*eplb, load));
  EXPECT_LT(ExpectedImbalance(*eplb, load), ExpectedImbalance(*base, load));
  EXPECT_GT(eplb->replicas.at({1, 0}).size(), 1u);
}

}  // namespace
}  // namespace dmoe::router
