#include "attention_service/shard_client.h"

#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/cluster_token.h"
#include "common/internal_tls.h"
#include "common/logging.h"
#include "common/mutex.h"
#include "common/status_macros.h"
#include "proto/expert_control.grpc.pb.h"
#include "transport/ucx.h"

namespace dmoe {

ExpertShardSet::~ExpertShardSet() {
  stop_ = true;
  if (member_) member_->Stop();
  if (reporter_.joinable()) reporter_.join();
  if (reviver_.joinable()) reviver_.join();
}

absl::StatusOr<std::unique_ptr<ExpertShardSet>> ExpertShardSet::Connect(
    const ModelConfig& config, const std::vector<std::string>& control_addresses,
    const ShardClientOptions& options) {
  if (control_addresses.empty()) return absl::InvalidArgumentError("no expert shard addresses");
  auto set = std::unique_ptr<ExpertShardSet>(new ExpertShardSet());
  set->config_ = config;
  set->options_ = options;
  auto client = transport::NewUcxClient(options.cluster_token);
  if (!client.ok()) return client.status();
  set->client_ = std::move(client).value();
  auto routing = std::make_shared<ExpertRouting>();
  routing->placement = ExpertPlacement(config.num_expert_layers(), config.n_routed_experts);
  for (size_t i = 0; i < control_addresses.size(); ++i) {
    const std::string& addr = control_addresses[i];
    std::vector<std::pair<int64_t, int64_t>> experts;
    auto peer = set->ConnectStatic(addr, options.control_deadline, &experts);
    if (!peer.ok()) return peer.status();
    routing->placement.Add(static_cast<int>(i), experts);
    routing->peers.push_back(*peer);
    routing->names.push_back(addr);
  }
  if (auto st = routing->placement.CheckCovers(config); !st.ok()) return st;
  set->experts_b_ = std::make_unique<RemoteRoutedExperts>(config, set->client_.get(), routing,
                                                          set->health_, options.remote);
  set->experts_ = std::make_unique<RemoteRoutedExperts>(config, set->client_.get(), routing,
                                                        set->health_, options.remote);
  {
    MutexLock l(&set->mu_);
    set->static_routing_ = routing;
  }
  ExpertShardSet* raw = set.get();
  set->reviver_ = std::thread([raw] { raw->ReviveStatic(); });
  return set;
}

absl::StatusOr<int> ExpertShardSet::ConnectStatic(
    const std::string& addr, std::chrono::milliseconds deadline,
    std::vector<std::pair<int64_t, int64_t>>* experts) {
  auto channel = InternalChannel(addr);
  auto stub = internal::ExpertControl::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + deadline);
  AddClusterToken(&ctx, options_.cluster_token);
  internal::GetInfoReply info;
  const grpc::Status st = stub->GetInfo(&ctx, internal::GetInfoRequest(), &info);
  if (!st.ok()) {
    return absl::UnavailableError(
        absl::StrCat("expert shard ", addr, ": control API: ", st.error_message()));
  }
  if (info.hidden_size() != config_.hidden_size ||
      info.num_hidden_layers() != config_.num_hidden_layers ||
      info.n_routed_experts() != config_.n_routed_experts) {
    return absl::FailedPreconditionError(absl::StrCat(
        "expert shard ", addr, " serves a different model shape (hidden_size ", info.hidden_size(),
        ", layers ", info.num_hidden_layers(), ", experts ", info.n_routed_experts(), ")"));
  }
  RETURN_IF_ERROR(CheckAlike(addr, info));
  const std::string data = options_.connect == UcxConnectMode::kListener
                               ? info.ucx_address()
                               : info.ucx_worker_address();
  auto peer = client_->Connect(data);
  if (!peer.ok()) {
    return absl::UnavailableError(
        absl::StrCat("expert shard ", addr, ": data plane ", data, ": ", peer.status().message()));
  }
  experts->clear();
  for (const auto& e : info.experts()) experts->emplace_back(e.layer(), e.expert());
  return *peer;
}

absl::Status ExpertShardSet::CheckAlike(const std::string& addr,
                                        const internal::GetInfoReply& info) {
  if (!info.model_fingerprint().empty() && info.model_fingerprint() != ModelFingerprint(config_)) {
    return absl::FailedPreconditionError(
        absl::StrCat("expert shard ", addr, " serves a model whose config.json differs from this ",
                     "node's --model (fingerprint ", info.model_fingerprint(), ", this node's ",
                     ModelFingerprint(config_), ")"));
  }
  if (numerics_of_.empty()) {  // the first shard (Connect runs before the reviver starts)
    numerics_ = info.numerics();
    numerics_of_ = addr;
  } else if (info.numerics() != numerics_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "expert shard ", addr, " computes as \"", info.numerics(), "\" but expert shard ",
        numerics_of_, " computes as \"", numerics_, "\"; a request's output would depend on ",
        "which of them serves it. Start every expert shard with the same --expert-dtype, ",
        "--bf16-activations and --device"));
  }
  return absl::OkStatus();
}

void ExpertShardSet::ReviveStatic() {
  // Off the engine's thread: asking an unreachable shard waits out a deadline.
  while (!stop_) {
    for (int i = 0; i < 10 && !stop_; ++i) {
      std::this_thread::sleep_for(options_.revive_interval / 10);
    }
    std::shared_ptr<const ExpertRouting> current;
    {
      MutexLock l(&mu_);
      current = static_routing_;
    }
    std::shared_ptr<ExpertRouting> next;
    for (size_t s = 0; s < current->peers.size() && !stop_; ++s) {
      if (!health_->Dead(current->peers[s])) continue;
      std::vector<std::pair<int64_t, int64_t>> experts;
      auto peer = ConnectStatic(current->names[s], std::chrono::milliseconds(1000), &experts);
      if (!peer.ok()) continue;
      if (!next) next = std::make_shared<ExpertRouting>(*current);
      // What it hosts is fixed (--experts): only its connection is new. The old one is ended (a
      // hung shard's connection would keep its requests' slots).
      client_->Disconnect(next->peers[s]);
      next->peers[s] = *peer;
      spdlog::info("expert shard {} answers again", current->names[s]);
    }
    if (!next) continue;
    MutexLock l(&mu_);
    static_routing_ = next;
    pending_static_ = next;
  }
}

absl::StatusOr<std::unique_ptr<ExpertShardSet>> ExpertShardSet::ConnectRouter(
    const ModelConfig& config, const ShardClientOptions& options) {
  auto set = std::unique_ptr<ExpertShardSet>(new ExpertShardSet());
  set->config_ = config;
  set->options_ = options;
  auto client = transport::NewUcxClient(options.cluster_token);
  if (!client.ok()) return client.status();
  set->client_ = std::move(client).value();
  router::MemberOptions mo;
  mo.router_address = options.router;
  mo.cluster_token = options.cluster_token;
  set->member_ = std::make_unique<router::RouterMember>(mo);
  ExpertShardSet* raw = set.get();
  set->member_->StartWatch(/*targets=*/false, [raw](const internal::PlacementUpdate& u) {
    if (u.version() == 0) return;  // no active map yet
    MutexLock l(&raw->mu_);
    raw->pending_ = u;
  });
  // The first map.
  const auto until = std::chrono::steady_clock::now() + options.first_map_timeout;
  while (std::chrono::steady_clock::now() < until) {
    {
      MutexLock l(&set->mu_);
      if (set->pending_.has_value()) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::optional<internal::PlacementUpdate> first;
  {
    MutexLock l(&set->mu_);
    first.swap(set->pending_);
  }
  if (!first.has_value()) {
    return absl::UnavailableError(absl::StrCat(
        "router ", options.router, ": no active placement map within ",
        options.first_map_timeout.count(), " ms (are enough expert shards registered?)"));
  }
  std::shared_ptr<const ExpertRouting> routing = set->Prepare(*first);
  set->experts_b_ = std::make_unique<RemoteRoutedExperts>(config, set->client_.get(), routing,
                                                          set->health_, options.remote);
  set->experts_ = std::make_unique<RemoteRoutedExperts>(config, set->client_.get(), routing,
                                                        set->health_, options.remote);
  set->version_ = first->version();
  set->connected_ = std::move(first);
  set->connected_routing_ = std::move(routing);
  set->reviver_ = std::thread([raw] { raw->ConnectRouterMaps(); });
  // Load reports for EPLB: tokens per (layer, expert) sent since the last report.
  set->reporter_ = std::thread([raw] {
    const ModelConfig& c = raw->config_;
    std::vector<uint64_t> last(static_cast<size_t>(c.num_expert_layers() * c.n_routed_experts), 0);
    auto next = std::chrono::steady_clock::now();
    while (!raw->stop_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (std::chrono::steady_clock::now() < next) continue;
      next = std::chrono::steady_clock::now() + raw->options_.load_report_interval;
      internal::LoadReport report;
      report.set_node_id(raw->member_->node_id());
      for (int64_t l = 0; l < c.num_expert_layers(); ++l) {
        if (!c.IsMoeLayer(l)) continue;
        for (int64_t e = 0; e < c.n_routed_experts; ++e) {
          const uint64_t now =
              raw->experts_->expert_tokens(l, e) + raw->experts_b_->expert_tokens(l, e);
          uint64_t& prev = last[static_cast<size_t>(l * c.n_routed_experts + e)];
          if (now == prev) continue;
          auto* x = report.add_loads();
          x->set_layer(static_cast<uint32_t>(l));
          x->set_expert(static_cast<uint32_t>(e));
          x->set_tokens(static_cast<double>(now - prev));
          prev = now;
        }
      }
      if (report.loads_size() > 0) raw->member_->ReportLoad(report).IgnoreError();
    }
  });
  return set;
}

std::shared_ptr<const ExpertRouting> ExpertShardSet::Prepare(const internal::PlacementUpdate& u) {
  auto routing = std::make_shared<ExpertRouting>();
  routing->version = u.version();
  routing->placement = ExpertPlacement(config_.num_expert_layers(), config_.n_routed_experts);
  std::map<std::string, int> shard_of;  // node id -> shard index (-1: unreachable)
  for (const auto& r : u.replicas()) {
    for (const std::string& id : r.node_ids()) {
      if (shard_of.count(id)) continue;
      const auto& addresses = options_.connect == UcxConnectMode::kListener
                                  ? u.ucx_addresses()
                                  : u.ucx_worker_addresses();
      auto it = addresses.find(id);
      int peer = -1;
      if (it != addresses.end() && !it->second.empty()) {
        auto known = peer_of_address_.find(it->second);
        // A peer that failed is connected again when a map (or a revival) names it: the shard
        // may have been only slow, or paused, and the router says it is alive.
        if (known != peer_of_address_.end() && !health_->Dead(known->second)) {
          peer = known->second;
        } else {
          auto p = client_->Connect(it->second);
          if (p.ok()) {
            // The failed connection it replaces is ended (a hung shard's would keep its
            // requests' slots).
            if (known != peer_of_address_.end()) client_->Disconnect(known->second);
            peer = *p;
            peer_of_address_[it->second] = peer;
          } else {
            spdlog::warn("placement {}: cannot reach expert shard {} at {}: {}", u.version(), id,
                         it->second, std::string(p.status().message()));
          }
        }
      }
      if (peer < 0) {
        shard_of[id] = -1;
        continue;
      }
      shard_of[id] = static_cast<int>(routing->peers.size());
      routing->peers.push_back(peer);
      auto g = u.grpc_addresses().find(id);
      routing->names.push_back(g == u.grpc_addresses().end() ? id
                                                             : absl::StrCat(id, "@", g->second));
    }
    std::vector<std::pair<int64_t, int64_t>> one = {{r.layer(), r.expert()}};
    for (const std::string& id : r.node_ids()) {
      if (shard_of[id] >= 0) routing->placement.Add(shard_of[id], one);
    }
  }
  // Failed shards the map no longer names (a stopped shard's lease lapsed, or it came back at
  // another address): their connections are ended, as a reconnect ends the one it replaces.
  const std::set<int> named(routing->peers.begin(), routing->peers.end());
  for (auto it = peer_of_address_.begin(); it != peer_of_address_.end();) {
    if (!named.count(it->second) && health_->Dead(it->second)) {
      client_->Disconnect(it->second);
      it = peer_of_address_.erase(it);
    } else {
      ++it;
    }
  }
  // The map's failed shards were just connected again: the next try is a revive_interval away.
  last_revival_ = std::chrono::steady_clock::now();
  return routing;
}

void ExpertShardSet::ConnectRouterMaps() {
  while (!stop_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::optional<internal::PlacementUpdate> u;
    {
      MutexLock l(&mu_);
      u.swap(pending_);
    }
    if (u.has_value() && u->version() == connected_->version()) u.reset();
    if (!u.has_value()) {
      // Now and then, try again the shards of the current map that failed.
      const auto now = std::chrono::steady_clock::now();
      if (now - last_revival_ <= options_.revive_interval) continue;
      last_revival_ = now;
      bool dead = false;
      for (int p : connected_routing_->peers) dead |= health_->Dead(p);
      if (!dead) continue;
      u = connected_;
    }
    std::shared_ptr<const ExpertRouting> routing = Prepare(*u);
    connected_ = u;
    connected_routing_ = routing;
    MutexLock l(&mu_);
    prepared_ = std::move(routing);  // (a newer one replaces one not yet taken)
  }
}

bool ExpertShardSet::SwitchIfChanged() {
  if (member_ == nullptr) {
    // Static: shards that failed and answer again, connected anew by ReviveStatic.
    std::shared_ptr<const ExpertRouting> r;
    {
      MutexLock l(&mu_);
      r.swap(pending_static_);
    }
    if (!r) return false;
    experts_->SetRouting(r);
    experts_b_->SetRouting(r);
    ++revivals_;
    return true;
  }
  // Router mode: a routing ConnectRouterMaps made (its connects done off this thread).
  std::shared_ptr<const ExpertRouting> r;
  {
    MutexLock l(&mu_);
    r.swap(prepared_);
  }
  if (!r) return false;
  experts_->SetRouting(r);
  experts_b_->SetRouting(r);
  if (r->version == version_) {
    ++revivals_;
  } else {
    version_ = r->version;
    ++switches_;
    spdlog::info("switched to placement {}", r->version);
  }
  return true;
}

}  // namespace dmoe
