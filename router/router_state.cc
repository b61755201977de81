#include "router/router_state.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "common/status_macros.h"

namespace dmoe::router {

RouterState::RouterState(ModelConfig config, std::chrono::milliseconds lease,
                         PlacementOptions options, Clock clock,
                         std::chrono::milliseconds startup_grace)
    : config_(std::move(config)),
      fingerprint_(ModelFingerprint(config_)),
      lease_(lease),
      options_(options),
      clock_(std::move(clock)),
      started_at_(clock_()),
      grace_(startup_grace),
      planning_(startup_grace.count() <= 0) {
  problem_ = planning_ ? "no expert shard has registered"
                       : "waiting for nodes to register (startup grace)";
}

absl::Status RouterState::Register(Node node, uint64_t known_version) {
  if (node.id.empty()) return absl::InvalidArgumentError("node_id: empty");
  if (node.grpc_address.empty()) return absl::InvalidArgumentError("grpc_address: empty");
  if (node.role == NodeRole::kExpert && node.capacity <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("capacity_experts: ", node.capacity, " must be positive for an expert shard"));
  }
  MutexLock l(&mu_);
  RETURN_IF_ERROR(CheckAlikeLocked(node));
  next_version_ = std::max(next_version_, known_version + 1);
  node.lease_until = clock_() + lease_;
  auto it = nodes_.find(node.id);
  const bool expert_change = node.role == NodeRole::kExpert &&
                             (it == nodes_.end() || it->second.capacity != node.capacity ||
                              it->second.role != NodeRole::kExpert || it->second.draining);
  if (it != nodes_.end()) node.ready_version = it->second.ready_version;
  nodes_[node.id] = std::move(node);
  if (expert_change) ReplanLocked();
  return absl::OkStatus();
}

absl::Status RouterState::CheckAlikeLocked(const Node& node) const {
  if (!node.model.empty() && node.model != fingerprint_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model_fingerprint: node ", node.id, " serves a model whose config.json differs from the ",
        "router's --model (fingerprint ", node.model, ", the router's ", fingerprint_, ")"));
  }
  if (node.role == NodeRole::kGateway) return absl::OkStatus();
  const char* role = node.role == NodeRole::kExpert ? "expert shard" : "attention node";
  for (const auto& [id, other] : nodes_) {
    // Empty: a node that does not say (an older build); not compared.
    if (id == node.id || other.role != node.role || other.numerics == node.numerics ||
        other.numerics.empty() || node.numerics.empty()) {
      continue;
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "numerics: ", role, " ", node.id, " computes as \"", node.numerics, "\" but ", role, " ",
        id, " computes as \"", other.numerics, "\"; a request's output would depend on which of ",
        "them serves it. Start every ", role, " with the same ",
        node.role == NodeRole::kExpert ? "--expert-dtype" : "--weight-dtype, --kv-cache-dtype",
        ", --bf16-activations and --device"));
  }
  return absl::OkStatus();
}

absl::Status RouterState::Heartbeat(const std::string& id, uint64_t ready_version) {
  MutexLock l(&mu_);
  auto it = nodes_.find(id);
  if (it == nodes_.end()) {
    return absl::NotFoundError(absl::StrCat("node ", id, " is not registered (lease lapsed?)"));
  }
  it->second.lease_until = clock_() + lease_;
  if (ready_version > it->second.ready_version) {
    it->second.ready_version = ready_version;
    TryActivateLocked();
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> RouterState::Deregister(const std::string& id) {
  MutexLock l(&mu_);
  auto it = nodes_.find(id);
  if (it == nodes_.end())
    return absl::NotFoundError(absl::StrCat("node ", id, " is not registered"));
  if (!it->second.draining) {
    it->second.draining = true;
    if (it->second.role == NodeRole::kExpert) ReplanLocked();
  }
  const auto& shards = maps_.target.shards;
  return std::find(shards.begin(), shards.end(), id) == shards.end();
}

std::vector<std::string> RouterState::ExpireLeases() {
  MutexLock l(&mu_);
  const auto now = clock_();
  std::vector<std::string> gone;
  bool expert_gone = false;
  for (auto it = nodes_.begin(); it != nodes_.end();) {
    if (it->second.lease_until <= now) {
      gone.push_back(it->first);
      expert_gone |= it->second.role == NodeRole::kExpert && !it->second.draining;
      it = nodes_.erase(it);
    } else {
      ++it;
    }
  }
  if (!planning_ && now - started_at_ >= grace_) {
    planning_ = true;
    ReplanLocked();
  } else if (expert_gone) {
    ReplanLocked();
  }
  // A target waiting for a shard that is gone now may be superseded above; one whose shards are
  // all ready (a departed shard no longer blocks it) activates here.
  TryActivateLocked();
  return gone;
}

void RouterState::ReportLoad(const std::map<ExpertKey, double>& tokens) {
  MutexLock l(&mu_);
  for (const auto& [key, t] : tokens) load_[key] += t;
}

void RouterState::Rebalance() {
  MutexLock l(&mu_);
  ReplanLocked();
}

void RouterState::ReplanLocked() {
  if (!planning_) return;
  std::vector<ShardSlot> shards;
  for (const auto& [id, n] : nodes_) {
    if (n.role == NodeRole::kExpert && !n.draining) shards.push_back({id, n.capacity});
  }
  if (!planned_once_ && static_cast<int64_t>(shards.size()) < min_shards_) {
    problem_ = absl::StrCat("waiting for ", min_shards_, " expert shards (", shards.size(),
                            " registered)");
    return;
  }
  PlacementMap next;
  if (shards.empty()) {
    problem_ = "no expert shard is alive";
  } else {
    auto m = ComputePlacement(config_, shards, load_, options_, 0);
    if (!m.ok()) {
      problem_ = std::string(m.status().message());
    } else {
      next = std::move(m).value();
      problem_.clear();
    }
  }
  // Nothing to change, or no map that covers every expert: keep what is planned.
  if (next.replicas.empty()) return;
  if (next.replicas == maps_.target.replicas && next.shards == maps_.target.shards) return;
  next.version = next_version_++;
  planned_once_ = true;
  maps_.target = std::move(next);
  ++maps_.generation;
  TryActivateLocked();
  changed_.SignalAll();
}

void RouterState::TryActivateLocked() {
  if (maps_.target.version == 0 || maps_.target.version == maps_.active.version) return;
  for (const std::string& id : maps_.target.shards) {
    auto it = nodes_.find(id);
    if (it == nodes_.end() || it->second.ready_version < maps_.target.version) return;
  }
  maps_.active = maps_.target;
  ++maps_.generation;
  changed_.SignalAll();
}

PlacementMap RouterState::placement() const {
  MutexLock l(&mu_);
  return maps_.active;
}

PlacementMap RouterState::target() const {
  MutexLock l(&mu_);
  return maps_.target;
}

PlacementState RouterState::state() const {
  MutexLock l(&mu_);
  return maps_;
}

std::vector<Node> RouterState::nodes() const {
  MutexLock l(&mu_);
  std::vector<Node> out;
  for (const auto& [id, n] : nodes_) out.push_back(n);
  return out;
}

std::map<ExpertKey, double> RouterState::load() const {
  MutexLock l(&mu_);
  return load_;
}

PlacementState RouterState::WaitForChange(uint64_t seen, std::chrono::milliseconds timeout) const {
  MutexLock l(&mu_);
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (maps_.generation == seen && changed_.WaitUntil(&mu_, until)) {
  }
  return maps_;
}

std::string RouterState::problem() const {
  MutexLock l(&mu_);
  return problem_;
}

}  // namespace dmoe::router
