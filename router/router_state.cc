#include "router/router_state.h"

#include "absl/strings/str_cat.h"

namespace dmoe::router {

RouterState::RouterState(ModelConfig config, std::chrono::milliseconds lease,
                         PlacementOptions options, Clock clock)
    : config_(std::move(config)), lease_(lease), options_(options), clock_(std::move(clock)) {
  problem_ = "no expert shard has registered";
}

absl::Status RouterState::Register(Node node) {
  if (node.id.empty()) return absl::InvalidArgumentError("node_id: empty");
  if (node.grpc_address.empty()) return absl::InvalidArgumentError("grpc_address: empty");
  if (node.role == NodeRole::kExpert && node.capacity <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("capacity_experts: ", node.capacity, " must be positive for an expert shard"));
  }
  std::lock_guard<std::mutex> l(mu_);
  node.lease_until = clock_() + lease_;
  auto it = nodes_.find(node.id);
  const bool expert_change = node.role == NodeRole::kExpert &&
                             (it == nodes_.end() || it->second.capacity != node.capacity ||
                              it->second.role != NodeRole::kExpert);
  nodes_[node.id] = std::move(node);
  if (expert_change) ReplanLocked();
  return absl::OkStatus();
}

absl::Status RouterState::Heartbeat(const std::string& id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = nodes_.find(id);
  if (it == nodes_.end()) {
    return absl::NotFoundError(absl::StrCat("node ", id, " is not registered (lease lapsed?)"));
  }
  it->second.lease_until = clock_() + lease_;
  return absl::OkStatus();
}

std::vector<std::string> RouterState::ExpireLeases() {
  std::lock_guard<std::mutex> l(mu_);
  const auto now = clock_();
  std::vector<std::string> gone;
  bool expert_gone = false;
  for (auto it = nodes_.begin(); it != nodes_.end();) {
    if (it->second.lease_until <= now) {
      gone.push_back(it->first);
      expert_gone |= it->second.role == NodeRole::kExpert;
      it = nodes_.erase(it);
    } else {
      ++it;
    }
  }
  if (expert_gone) ReplanLocked();
  return gone;
}

void RouterState::ReportLoad(const std::map<ExpertKey, double>& tokens) {
  std::lock_guard<std::mutex> l(mu_);
  for (const auto& [key, t] : tokens) load_[key] += t;
}

void RouterState::Rebalance() {
  std::lock_guard<std::mutex> l(mu_);
  ReplanLocked();
}

void RouterState::ReplanLocked() {
  std::vector<ShardSlot> shards;
  for (const auto& [id, n] : nodes_) {
    if (n.role == NodeRole::kExpert) shards.push_back({id, n.capacity});
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
  if (next.replicas == map_.replicas && next.shards == map_.shards) return;
  next.version = next.replicas.empty() ? 0 : next_version_++;
  map_ = std::move(next);
  changed_.notify_all();
}

PlacementMap RouterState::placement() const {
  std::lock_guard<std::mutex> l(mu_);
  return map_;
}

std::vector<Node> RouterState::nodes() const {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<Node> out;
  for (const auto& [id, n] : nodes_) out.push_back(n);
  return out;
}

PlacementMap RouterState::WaitForChange(uint64_t seen, std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> l(mu_);
  changed_.wait_for(l, timeout, [&] { return map_.version != seen; });
  return map_;
}

std::string RouterState::problem() const {
  std::lock_guard<std::mutex> l(mu_);
  return problem_;
}

}  // namespace dmoe::router
