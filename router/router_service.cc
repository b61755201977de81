#include "router/router_service.h"

#include <atomic>
#include <string>
#include <system_error>
#include <thread>

#include "common/cluster_token.h"
#include "common/queued_writer.h"

namespace dmoe::router {
namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* ctx, grpc::Status st) {
  auto* r = ctx->DefaultReactor();
  r->Finish(std::move(st));
  return r;
}

const grpc::Status kUnauthenticated = Unauthenticated();

// Streams the current map, then every change, until the client goes away: active maps, or (for
// expert shards) targets with the active version.
class Watch : public QueuedWriter<internal::PlacementUpdate> {
 public:
  // A non-OK `refuse` ends the stream at once with it. `open` counts the open watches (at most
  // kMaxWatches; each has a thread).
  Watch(RouterState* state, bool targets, grpc::Status refuse, std::atomic<int>* open)
      : state_(state), open_(open) {
    counted_ = refuse.ok();  // (an unauthorized watch is not counted)
    if (counted_ && open_->fetch_add(1) >= RouterServiceImpl::kMaxWatches) {
      refuse = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                            "too many placement watches open on this router");
    }
    if (!refuse.ok()) {
      FinishWith(std::move(refuse));
      return;
    }
    try {
      Start(targets);
    } catch (const std::system_error& e) {  // no thread to be had
      FinishWith(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                              std::string("router: cannot start a watch: ") + e.what()));
    }
  }
  void OnCancel() override { stop_ = true; }

 protected:
  void OnDoneHook() override {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    if (counted_) open_->fetch_sub(1);
  }

 private:
  void Start(bool targets) {
    thread_ = std::thread([this, targets] {
      uint64_t generation = UINT64_MAX, sent = UINT64_MAX, sent_active = UINT64_MAX;
      while (!stop_) {
        const PlacementState m = state_->WaitForChange(generation, std::chrono::milliseconds(200));
        generation = m.generation;
        const PlacementMap& map = targets ? m.target : m.active;
        if (map.version == sent && m.active.version == sent_active) continue;
        sent = map.version;
        sent_active = m.active.version;
        // Each update is the whole map: one the client has not read yet is superseded.
        PushLatest(RouterServiceImpl::ToProto(map, state_->nodes(), m.active.version));
      }
      FinishWith(grpc::Status::OK);
    });
  }

  RouterState* state_;
  std::atomic<int>* open_;
  bool counted_ = false;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace

bool RouterServiceImpl::Authorized(grpc::CallbackServerContext* ctx) const {
  return CallAuthorized(*ctx, token_);
}

internal::PlacementUpdate RouterServiceImpl::ToProto(const PlacementMap& m,
                                                     const std::vector<Node>& nodes,
                                                     uint64_t active_version) {
  internal::PlacementUpdate u;
  u.set_version(m.version);
  u.set_active_version(active_version);
  for (const auto& [key, rs] : m.replicas) {
    auto* r = u.add_replicas();
    r->set_layer(static_cast<uint32_t>(key.first));
    r->set_expert(static_cast<uint32_t>(key.second));
    for (int s : rs) r->add_node_ids(m.shards[static_cast<size_t>(s)]);
  }
  for (const Node& n : nodes) {
    if (n.role != NodeRole::kExpert) continue;
    (*u.mutable_grpc_addresses())[n.id] = n.grpc_address;
    (*u.mutable_ucx_addresses())[n.id] = n.ucx_address;
    (*u.mutable_ucx_worker_addresses())[n.id] = n.ucx_worker_address;
  }
  return u;
}

grpc::ServerUnaryReactor* RouterServiceImpl::Register(grpc::CallbackServerContext* ctx,
                                                      const internal::RegisterRequest* req,
                                                      internal::RegisterReply* reply) {
  if (!Authorized(ctx)) return Done(ctx, kUnauthenticated);
  Node n;
  n.id = req->node_id();
  n.role = req->role() == internal::ATTENTION ? NodeRole::kAttention
           : req->role() == internal::GATEWAY ? NodeRole::kGateway
                                              : NodeRole::kExpert;
  if (req->role() == internal::ROLE_UNSPECIFIED) {
    return Done(ctx, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "role: unspecified"));
  }
  n.grpc_address = req->grpc_address();
  n.ucx_address = req->ucx_address();
  n.ucx_worker_address = req->ucx_worker_address();
  n.capacity = req->capacity_experts();
  n.model = req->model_fingerprint();
  n.numerics = req->numerics();
  if (auto st = state_->Register(std::move(n), req->placement_version()); !st.ok()) {
    return Done(ctx, ToGrpc(st));
  }
  reply->set_lease_ms(state_->lease().count());
  reply->set_placement_version(state_->placement().version);
  return Done(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* RouterServiceImpl::Heartbeat(grpc::CallbackServerContext* ctx,
                                                       const internal::HeartbeatRequest* req,
                                                       internal::HeartbeatReply* reply) {
  if (!Authorized(ctx)) return Done(ctx, kUnauthenticated);
  if (auto st = state_->Heartbeat(req->node_id(), req->ready_version()); !st.ok()) {
    return Done(ctx, ToGrpc(st));
  }
  reply->set_lease_ms(state_->lease().count());
  reply->set_placement_version(state_->placement().version);
  return Done(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* RouterServiceImpl::Deregister(grpc::CallbackServerContext* ctx,
                                                        const internal::DeregisterRequest* req,
                                                        internal::DeregisterReply* reply) {
  if (!Authorized(ctx)) return Done(ctx, kUnauthenticated);
  auto out = state_->Deregister(req->node_id());
  if (!out.ok()) return Done(ctx, ToGrpc(out.status()));
  reply->set_planned_out(*out);
  return Done(ctx, grpc::Status::OK);
}

grpc::ServerWriteReactor<internal::PlacementUpdate>* RouterServiceImpl::WatchPlacement(
    grpc::CallbackServerContext* ctx, const internal::WatchRequest* req) {
  return new Watch(state_, req->targets(), Authorized(ctx) ? grpc::Status::OK : kUnauthenticated,
                   &open_watches_);
}

grpc::ServerUnaryReactor* RouterServiceImpl::ReportLoad(grpc::CallbackServerContext* ctx,
                                                        const internal::LoadReport* req,
                                                        internal::LoadReply*) {
  if (!Authorized(ctx)) return Done(ctx, kUnauthenticated);
  std::map<ExpertKey, double> tokens;
  for (const auto& l : req->loads()) {
    if (!(l.tokens() >= 0 && l.tokens() <= kMaxReportedTokens)) {
      return Done(
          ctx, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "loads.tokens: not in [0, 2^40]"));
    }
    tokens[{l.layer(), l.expert()}] += l.tokens();
  }
  return Done(ctx, ToGrpc(state_->ReportLoad(tokens)));
}

grpc::ServerUnaryReactor* RouterServiceImpl::ListNodes(grpc::CallbackServerContext* ctx,
                                                       const internal::ListNodesRequest*,
                                                       internal::ListNodesReply* reply) {
  if (!Authorized(ctx)) return Done(ctx, kUnauthenticated);
  const auto now = std::chrono::steady_clock::now();
  for (const Node& n : state_->nodes()) {
    auto* i = reply->add_nodes();
    i->set_node_id(n.id);
    i->set_role(n.role == NodeRole::kAttention ? internal::ATTENTION
                : n.role == NodeRole::kGateway ? internal::GATEWAY
                                               : internal::EXPERT);
    i->set_grpc_address(n.grpc_address);
    i->set_capacity_experts(n.capacity);
    i->set_lease_remaining_ms(
        std::chrono::duration_cast<std::chrono::milliseconds>(n.lease_until - now).count());
    i->set_ready_version(n.ready_version);
    i->set_draining(n.draining);
  }
  const PlacementState maps = state_->state();
  reply->set_placement_version(maps.active.version);
  reply->set_target_version(maps.target.version);
  return Done(ctx, grpc::Status::OK);
}

}  // namespace dmoe::router
