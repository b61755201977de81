// Expert placement: which expert shards host which (layer, expert) of the MoE layers. Pure and
// deterministic (the same inputs give the same map), for the router (DESIGN.md §4).
//
// Base layout: expert groups (n_group consecutive experts; without groups, blocks of about
// E / shards) stay together on one shard, so a token's fan-out is at most topk_group shards;
// each unit goes to the shard with the most free capacity. EPLB then adds replicas of the hottest
// experts (by reported load, split evenly among replicas) on the least-loaded shards with room.
#ifndef DMOE_ROUTER_PLACEMENT_H_
#define DMOE_ROUTER_PLACEMENT_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"

namespace dmoe::router {

using ExpertKey = std::pair<int64_t, int64_t>;  // (layer, expert)

struct ShardSlot {
  std::string id;
  int64_t capacity = 0;  // (layer, expert) pairs it can hold
};

struct PlacementMap {
  uint64_t version = 0;
  std::vector<std::string> shards;
  std::map<ExpertKey, std::vector<int>> replicas;  // shard indices, base replica first

  // Pairs hosted per shard.
  std::vector<int64_t> Hosted() const;
};

struct PlacementOptions {
  // Copies of every (layer, expert) on distinct shards, as far as shards and capacity allow (the
  // first copy is always placed; further ones only within capacity). Survives the loss of
  // replication - 1 shards without waiting for re-hosting.
  int64_t replication = 1;
  // Replicas EPLB may add in all (0: none). Replicas are only added within capacity.
  int64_t max_extra_replicas = 0;
};

// FAILED_PRECONDITION when the shards cannot hold every (layer, expert) once; INVALID_ARGUMENT for
// no shards or a non-positive capacity.
absl::StatusOr<PlacementMap> ComputePlacement(const ModelConfig& c,
                                              const std::vector<ShardSlot>& shards,
                                              const std::map<ExpertKey, double>& load,
                                              const PlacementOptions& options, uint64_t version);

// Per-shard load when each expert's load is split evenly among its replicas.
std::vector<double> ShardLoads(const PlacementMap& m, const std::map<ExpertKey, double>& load);
// max / mean of ShardLoads (1 = perfectly even).
double Imbalance(const PlacementMap& m, const std::map<ExpertKey, double>& load);

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_PLACEMENT_H_
