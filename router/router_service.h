// The gRPC adapter of the router: RouterService over RouterState, with the cluster token checked on
// every call.
#ifndef DMOE_ROUTER_ROUTER_SERVICE_H_
#define DMOE_ROUTER_ROUTER_SERVICE_H_

#include <atomic>
#include <string>

#include "proto/router.grpc.pb.h"
#include "router/router_state.h"

namespace dmoe::router {

class RouterServiceImpl final : public internal::RouterService::CallbackService {
 public:
  // Empty `token`: no token required.
  RouterServiceImpl(RouterState* state, std::string token)
      : state_(state), token_(std::move(token)) {}

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* ctx,
                                     const internal::RegisterRequest* req,
                                     internal::RegisterReply* reply) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const internal::HeartbeatRequest* req,
                                      internal::HeartbeatReply* reply) override;
  grpc::ServerUnaryReactor* Deregister(grpc::CallbackServerContext* ctx,
                                       const internal::DeregisterRequest* req,
                                       internal::DeregisterReply* reply) override;
  grpc::ServerWriteReactor<internal::PlacementUpdate>* WatchPlacement(
      grpc::CallbackServerContext* ctx, const internal::WatchRequest* req) override;
  grpc::ServerUnaryReactor* ReportLoad(grpc::CallbackServerContext* ctx,
                                       const internal::LoadReport* req,
                                       internal::LoadReply* reply) override;
  grpc::ServerUnaryReactor* ListNodes(grpc::CallbackServerContext* ctx,
                                      const internal::ListNodesRequest* req,
                                      internal::ListNodesReply* reply) override;

  // The wire form of a placement map.
  static internal::PlacementUpdate ToProto(const PlacementMap& m, const std::vector<Node>& nodes,
                                           uint64_t active_version);

  // Placement watches open at once (each holds a thread); more are RESOURCE_EXHAUSTED.
  static constexpr int kMaxWatches = 4096;

 private:
  bool Authorized(grpc::CallbackServerContext* ctx) const;
  RouterState* state_;
  std::string token_;
  std::atomic<int> open_watches_{0};
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_ROUTER_SERVICE_H_
