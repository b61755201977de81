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

absl::Status CheckNodeId(const std::string& id, const std::string& field) {
  if (id.empty()) return absl::InvalidArgumentError(field + ": empty");
  if (id.size() > kMaxNodeIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": ", id.size(), " bytes; at most ", kMaxNodeIdBytes));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    const unsigned char ch = static_cast<unsigned char>(id[i]);
    if (ch < 0x21 || ch > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": byte ", static_cast<int>(ch),
                                                     " at offset ", i,
                                                     " is not printable ASCII (no spaces)"));
    }
  }
  return absl::OkStatus();
}

namespace {

// Every field of a registration is copied into each watcher's map (ids once per hosted expert):
// they are bounded, so that one registration cannot make every update gigabytes.
absl::Status CheckFieldSizes(const Node& node) {
  RETURN_IF_ERROR(CheckNodeId(node.id, "node_id"));
  if (node.grpc_address.empty()) return absl::InvalidArgumentError("grpc_address: empty");
  const struct {
    const char* name;
    const std::string& value;
    size_t max;
  } fields[] = {{"grpc_address", node.grpc_address, kMaxAddressBytes},
                {"ucx_address", node.ucx_address, kMaxAddressBytes},
                {"ucx_worker_address", node.ucx_worker_address, kMaxWorkerAddressBytes},
                {"model_fingerprint", node.model, kMaxAddressBytes},
                {"numerics", node.numerics, kMaxAddressBytes}};
  for (const auto& f : fields) {
    if (f.value.size() > f.max) {
      return absl::InvalidArgumentError(
          absl::StrCat(f.name, ": ", f.value.size(), " bytes; at most ", f.max));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RouterState::Register(Node node, uint64_t known_version) {
  RETURN_IF_ERROR(CheckFieldSizes(node));
  if (node.role == NodeRole::kExpert && node.capacity <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("capacity_experts: ", node.capacity, " must be positive for an expert shard"));
  }
  if (known_version > kMaxVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement_version: ", known_version, " is over 2^62"));
  }
  // A shard holds each (layer, expert) at most once: more capacity than there are pairs is the
  // same as that many (and sums of huge values would overflow).
  int64_t pairs = 0;
  for (int64_t l = 0; l < config_.num_expert_layers(); ++l) {
    if (config_.IsExpertLayer(l)) pairs += config_.n_routed_experts;
  }
  node.capacity = std::min(node.capacity, std::max<int64_t>(pairs, 1));
  MutexLock l(&mu_);
  RETURN_IF_ERROR(CheckAlikeLocked(node));
  auto it = nodes_.find(node.id);
  if (it != nodes_.end() && it->second.role != node.role) {
    return absl::FailedPreconditionError(
        absl::StrCat("role: node ", node.id, " is registered with another role; a node keeps ",
                     "its role (use another node_id, or wait for its lease to lapse)"));
  }
  next_version_ = std::max(next_version_, known_version + 1);
  node.lease_until = clock_() + lease_;
  const bool expert_change =
      node.role == NodeRole::kExpert &&
      (it == nodes_.end() || it->second.capacity != node.capacity || it->second.draining);
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
  // Ready for no more than the newest planned map: a claim beyond it (a version not yet numbered)
  // would let that version go live before the shard loads it.
  ready_version = std::min(ready_version, maps_.target.version);
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

absl::Status RouterState::ReportLoad(const std::map<ExpertKey, double>& tokens) {
  for (const auto& [key, t] : tokens) {
    if (!config_.IsExpertLayer(key.first) || key.second < 0 ||
        key.second >= config_.n_routed_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat("loads: layer ", key.first, " expert ", key.second, " is no routed expert"));
    }
    if (!(t >= 0 && t <= kMaxReportedTokens)) {
      return absl::InvalidArgumentError(absl::StrCat("loads.tokens: ", t, " is not in [0, 2^40]"));
    }
  }
  MutexLock l(&mu_);
  for (const auto& [key, t] : tokens) load_[key] += t;
  return absl::OkStatus();
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
