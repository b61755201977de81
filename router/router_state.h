// The router's state, free of RPC: members with leases, reported expert load, and the versioned
// placement map. Time comes from an injected clock. Thread-safe.
//
// Activation (DESIGN.md §4): a change to the expert shards (or Rebalance) plans a new *target*
// map; shards watch targets, load what they gained and report the version as ready in their
// heartbeats. When every shard of the target is ready, the target becomes the *active* map that
// attention nodes use. Shards drop what they lost only after the active map no longer needs it.
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
#include "common/mutex.h"
#include "model/config.h"
#include "router/placement.h"

namespace dmoe::router {

enum class NodeRole { kExpert, kAttention, kGateway };

struct Node {
  std::string id;
  NodeRole role = NodeRole::kExpert;
  std::string grpc_address;
  std::string ucx_address;
  std::string ucx_worker_address;
  int64_t capacity = 0;
  std::chrono::steady_clock::time_point lease_until;
  uint64_t ready_version = 0;  // expert shards: newest target fully loaded
  bool draining = false;       // deregistered: planned out, still serving until it exits
  std::string model;           // ModelFingerprint of its config.json ("": not checked)
  std::string numerics;        // how it computes (RegisterRequest.numerics)
};

// Limits on what a node registers (RouterState::Register), far above real values.
inline constexpr size_t kMaxNodeIdBytes = 253;           // a DNS name, e.g. a pod's
inline constexpr size_t kMaxAddressBytes = 1024;         // HOST:PORT, fingerprints, numerics
inline constexpr size_t kMaxWorkerAddressBytes = 65536;  // a UCX worker address, in hex
inline constexpr uint64_t kMaxVersion = uint64_t{1} << 62;
inline constexpr double kMaxReportedTokens = 1099511627776.0;  // 2^40 per report entry

// A node id: 1 to kMaxNodeIdBytes printable ASCII bytes, no spaces; the error names `field`.
absl::Status CheckNodeId(const std::string& id, const std::string& field);

struct PlacementState {
  uint64_t generation = 0;  // bumps on every change of either map
  PlacementMap active;
  PlacementMap target;
};

class RouterState {
 public:
  using Clock = std::function<std::chrono::steady_clock::time_point()>;
  // No placement is planned during `startup_grace` after construction, so that after a router
  // restart every live node can register again before the first map.
  RouterState(
      ModelConfig config, std::chrono::milliseconds lease, PlacementOptions options,
      Clock clock = [] { return std::chrono::steady_clock::now(); },
      std::chrono::milliseconds startup_grace = std::chrono::milliseconds(0));

  // Adds or refreshes a node (INVALID_ARGUMENT naming the field for an empty id or address, or an
  // expert shard without capacity). FAILED_PRECONDITION when its model is not the router's, or
  // its numerics differ from another registered node of its role (expert shards, attention nodes):
  // replicas must compute alike. Changes to the expert shards plan a new target.
  // `known_version`: the newest version the node has seen; later versions are numbered above it.
  absl::Status Register(Node node, uint64_t known_version = 0);
  // NOT_FOUND when the node is unknown (its lease lapsed: it must register again).
  // `ready_version` (expert shards): the newest target it has fully loaded.
  absl::Status Heartbeat(const std::string& id, uint64_t ready_version = 0);
  // The node leaves: planned out at once (NOT_FOUND when unknown). Returns whether the newest
  // target does without it.
  absl::StatusOr<bool> Deregister(const std::string& id);
  // Removes nodes whose lease lapsed (returns their ids); ends the startup grace when it is over.
  std::vector<std::string> ExpireLeases();
  // INVALID_ARGUMENT (nothing added) for a key that is not a routed expert of a MoE layer, or
  // tokens not in [0, kMaxReportedTokens].
  absl::Status ReportLoad(const std::map<ExpertKey, double>& tokens);
  // A new target from the current load (EPLB), if it differs.
  void Rebalance();

  // The active map (version 0 and no replicas until a first map is active).
  PlacementMap placement() const;
  PlacementMap target() const;
  PlacementState state() const;
  std::vector<Node> nodes() const;
  std::map<ExpertKey, double> load() const;
  // Waits until the generation differs from `seen` or `timeout` passes.
  PlacementState WaitForChange(uint64_t seen, std::chrono::milliseconds timeout) const;
  std::chrono::milliseconds lease() const { return lease_; }
  // Why the target map is empty, if it is.
  std::string problem() const;
  // No first map until this many expert shards have registered (default 1), so that a cluster
  // coming up does not put every expert on the first shard and move them again as the others
  // arrive. Later maps (failover) may use fewer. Call before nodes register.
  void set_min_shards(int64_t n) { min_shards_ = n; }

 private:
  void ReplanLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckAlikeLocked(const Node& node) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TryActivateLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  ModelConfig config_;
  std::string fingerprint_;  // ModelFingerprint(config_)
  std::chrono::milliseconds lease_;
  PlacementOptions options_;
  Clock clock_;
  std::chrono::steady_clock::time_point started_at_;
  std::chrono::milliseconds grace_;
  bool planning_ ABSL_GUARDED_BY(mu_) = false;  // false during the startup grace
  bool planned_once_ ABSL_GUARDED_BY(mu_) = false;
  int64_t min_shards_ = 1;
  mutable Mutex mu_;
  mutable CondVar changed_;
  std::map<std::string, Node> nodes_ ABSL_GUARDED_BY(mu_);
  std::map<ExpertKey, double> load_ ABSL_GUARDED_BY(mu_);
  PlacementState maps_ ABSL_GUARDED_BY(mu_);
  uint64_t next_version_ ABSL_GUARDED_BY(mu_) = 1;
  std::string problem_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_ROUTER_STATE_H_
