// Standard services every dmoe gRPC server exposes: grpc.health.v1 and server reflection (so that
// grpcurl works). Call before building the server.
#ifndef DMOE_COMMON_GRPC_SETUP_H_
#define DMOE_COMMON_GRPC_SETUP_H_

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

namespace dmoe {

inline void EnableHealthAndReflection() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
}

}  // namespace dmoe

#endif  // DMOE_COMMON_GRPC_SETUP_H_
