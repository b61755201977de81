// Standard services every dmoe gRPC server exposes: grpc.health.v1 and server reflection (so that
// grpcurl works). Call before building the server.
#ifndef DMOE_COMMON_GRPC_SETUP_H_
#define DMOE_COMMON_GRPC_SETUP_H_

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server.h>

namespace dmoe {

inline void EnableHealthAndReflection() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
}

// grpc.health.v1 names: "" (the server as a whole) and each service's own name answer SERVING only
// while the process can serve (readiness: a draining node, a gateway with no healthy attention
// node are NOT_SERVING); kLivenessService answers SERVING as long as the process answers at all
// (liveness). Kubernetes: readinessProbe {grpc: {port}}, livenessProbe {grpc: {port, service:
// "dmoe.liveness"}}.
inline constexpr char kLivenessService[] = "dmoe.liveness";

// Call after BuildAndStart, and again whenever readiness changes. `service` is the full name of
// the server's own service (e.g. "dmoe.v1.Dmoe").
inline void SetReadiness(grpc::Server* server, const char* service, bool ready) {
  grpc::HealthCheckServiceInterface* h = server->GetHealthCheckService();
  if (h == nullptr) return;
  h->SetServingStatus(kLivenessService, true);
  h->SetServingStatus("", ready);
  h->SetServingStatus(service, ready);
}

}  // namespace dmoe

#endif  // DMOE_COMMON_GRPC_SETUP_H_
