// Connects an attention node to its expert shards: asks each shard's control API (gRPC) what it
// hosts and where its data plane listens, connects the UCX client, and builds the placement.
#ifndef DMOE_EXPERT_SERVICE_SHARD_CLIENT_H_
#define DMOE_EXPERT_SERVICE_SHARD_CLIENT_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "expert_service/remote_experts.h"
#include "model/config.h"
#include "transport/transport.h"

namespace dmoe {

enum class UcxConnectMode {
  kListener,       // the shard's "HOST:PORT" listener (needs tcp in UCX_TLS)
  kWorkerAddress,  // the shard's worker address (any UCX_TLS, e.g. sm,self)
};

struct ShardClientOptions {
  RemoteExpertsOptions remote;
  UcxConnectMode connect = UcxConnectMode::kListener;
  std::chrono::milliseconds control_deadline{5000};
};

// Owns the UCX client and the RemoteRoutedExperts over it.
class ExpertShardSet {
 public:
  // `control_addresses`: the gRPC "HOST:PORT" of each shard. Fails with a message naming the
  // shard when one cannot be reached, serves another model shape, or when some expert of a MoE
  // layer has no shard.
  static absl::StatusOr<std::unique_ptr<ExpertShardSet>> Connect(
      const ModelConfig& config, const std::vector<std::string>& control_addresses,
      const ShardClientOptions& options);
  RemoteRoutedExperts* experts() { return experts_.get(); }
  // A second client of the same shards, for the second micro-batch of a ping-pong step.
  RemoteRoutedExperts* experts_b() { return experts_b_.get(); }

 private:
  std::unique_ptr<transport::ClientTransport> client_;
  std::unique_ptr<RemoteRoutedExperts> experts_, experts_b_;
};

}  // namespace dmoe

#endif  // DMOE_EXPERT_SERVICE_SHARD_CLIENT_H_
