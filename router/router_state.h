// The router's state, free of RPC: members with leases, reported expert load, and the versioned
// placement map recomputed when the set of expert shards changes (or on Rebalance). Time comes
// from an injected clock. Thread-safe.
#ifndef DMOE_ROUTER_ROUTER_STATE_H_
#define DMOE_ROUTER_ROUTER_STATE_H_

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "router/placement.h"

namespace dmoe::router {

enum class NodeRole { kExpert, kAttention, kGateway };

struct Node {
  std::string id;
  NodeRole role = NodeRole::kExpert;
  std::string grpc_address;
  std::string ucx_address;
  int64_t capacity = 0;
  std::chrono::steady_clock::time_point lease_until;
};

class RouterState {
 public:
  using Clock = std::function<std::chrono::steady_clock::time_point()>;
  RouterState(
      ModelConfig config, std::chrono::milliseconds lease, PlacementOptions options,
      Clock clock = [] { return std::chrono::steady_clock::now(); });

  // Adds or refreshes a node (INVALID_ARGUMENT naming the field for an empty id or address, or an
  // expert shard without capacity). Changes to the expert shards make a new placement version.
  absl::Status Register(Node node);
  // NOT_FOUND when the node is unknown (its lease lapsed: it must register again).
  absl::Status Heartbeat(const std::string& id);
  // Removes nodes whose lease lapsed; returns their ids.
  std::vector<std::string> ExpireLeases();
  void ReportLoad(const std::map<ExpertKey, double>& tokens);
  // A new placement from the current load (EPLB), if it differs.
  void Rebalance();

  // The current map (version 0 and no replicas while it cannot cover every expert).
  PlacementMap placement() const;
  std::vector<Node> nodes() const;
  // Waits until the version differs from `seen` or `timeout` passes; returns the current map.
  PlacementMap WaitForChange(uint64_t seen, std::chrono::milliseconds timeout) const;
  std::chrono::milliseconds lease() const { return lease_; }
  // Why the current map is empty, if it is.
  std::string problem() const;

 private:
  void ReplanLocked();

  ModelConfig config_;
  std::chrono::milliseconds lease_;
  PlacementOptions options_;
  Clock clock_;
  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  std::map<std::string, Node> nodes_;
  std::map<ExpertKey, double> load_;
  PlacementMap map_;
  uint64_t next_version_ = 1;
  std::string problem_;
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_ROUTER_STATE_H_
