// Connects an attention node to its expert shards. Static: asks each listed shard's control API
// (gRPC) what it hosts and where its data plane listens. With a router: watches the router's
// active placement maps, connects to the shards they name, and switches to each new map between
// engine steps (SwitchIfChanged); reports expert load to the router for EPLB.
#ifndef DMOE_ATTENTION_SERVICE_SHARD_CLIENT_H_
#define DMOE_ATTENTION_SERVICE_SHARD_CLIENT_H_

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "attention_service/remote_experts.h"
#include "common/mutex.h"
#include "model/config.h"
#include "proto/expert_control.pb.h"
#include "proto/router.pb.h"
#include "router/member.h"
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
  // Router mode (ConnectRouter).
  std::string router;  // "HOST:PORT"
  std::string cluster_token;
  std::chrono::milliseconds first_map_timeout{30000};
  std::chrono::milliseconds load_report_interval{1000};
  // How often shards that failed are connected again (both modes).
  std::chrono::milliseconds revive_interval{2000};
};

// Owns the UCX client and the RemoteRoutedExperts over it.
class ExpertShardSet {
 public:
  ~ExpertShardSet();
  // `control_addresses`: the gRPC "HOST:PORT" of each shard. Fails with a message naming the
  // shard when one cannot be reached, serves another model shape, or when some expert of a MoE
  // layer has no shard. Shards hosting the same expert are replicas of it.
  static absl::StatusOr<std::unique_ptr<ExpertShardSet>> Connect(
      const ModelConfig& config, const std::vector<std::string>& control_addresses,
      const ShardClientOptions& options);
  // Waits (at most first_map_timeout) for the router's first active map and connects to it.
  static absl::StatusOr<std::unique_ptr<ExpertShardSet>> ConnectRouter(
      const ModelConfig& config, const ShardClientOptions& options);

  RemoteRoutedExperts* experts() { return experts_.get(); }
  // A second client of the same shards, for the second micro-batch of a ping-pong step.
  RemoteRoutedExperts* experts_b() { return experts_b_.get(); }
  // Router mode: switches both clients to the newest active map if one was prepared since the
  // last call (connected in the background); likewise to the current map connected again to its
  // failed shards (every revive_interval).
  // Static mode: switches to the routing a background thread made when failed shards answered
  // their control API again (asked every revive_interval) and were connected anew.
  // Call between engine steps, on the engine's thread. Returns whether the routing changed.
  bool SwitchIfChanged();
  uint64_t version() const { return version_; }
  uint64_t switches() const { return switches_; }
  // Times failed shards of the current map were connected again.
  uint64_t revivals() const { return revivals_; }
  // Dead and set-aside shards, round-trip history (shared by both clients).
  const PeerHealth& health() const { return *health_; }
  // Null in static mode.
  router::RouterMember* member() { return member_.get(); }

 private:
  ExpertShardSet() = default;
  // Router mode: builds a routing from a map, connecting to its new shards and again to its
  // failed ones (a connect may wait a second or two for an unreachable host), and ending the
  // connections of failed shards it drops. On ConnectRouterMaps' thread (the caller's for the
  // first map).
  std::shared_ptr<const ExpertRouting> Prepare(const internal::PlacementUpdate& u);
  // Router mode's background thread: prepares each new map, and every revive_interval the
  // current one again when some of its shards failed; SwitchIfChanged takes the result. The
  // engine's thread never waits for a connect.
  void ConnectRouterMaps();
  // Static mode: asks the shard at control address `addr` what it hosts and connects to its data
  // plane; returns the transport peer.
  absl::StatusOr<int> ConnectStatic(const std::string& addr, std::chrono::milliseconds deadline,
                                    std::vector<std::pair<int64_t, int64_t>>* experts);
  // FAILED_PRECONDITION when a shard serves another model or computes unlike the first shard.
  absl::Status CheckAlike(const std::string& addr, const internal::GetInfoReply& info);
  // Static mode's background thread: reconnects failed shards (see SwitchIfChanged).
  void ReviveStatic();

  ModelConfig config_;
  // The first shard's numerics (GetInfoReply.numerics): every other shard must compute alike.
  // Written by Connect before the reviver starts.
  std::string numerics_, numerics_of_;
  ShardClientOptions options_;
  std::unique_ptr<transport::ClientTransport> client_;
  std::shared_ptr<PeerHealth> health_ = std::make_shared<PeerHealth>();
  std::unique_ptr<RemoteRoutedExperts> experts_, experts_b_;
  // Router mode, ConnectRouterMaps' own (the caller's until it starts): the connections by
  // address, and the newest map prepared.
  std::map<std::string, int> peer_of_address_;
  std::optional<internal::PlacementUpdate> connected_;
  std::shared_ptr<const ExpertRouting> connected_routing_;
  std::chrono::steady_clock::time_point last_revival_{};
  std::atomic<uint64_t> version_{0}, switches_{0}, revivals_{0};
  std::unique_ptr<router::RouterMember> member_;
  Mutex mu_;
  // Router mode: the newest map from the router, and the newest routing prepared and not yet
  // taken by SwitchIfChanged.
  std::optional<internal::PlacementUpdate> pending_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const ExpertRouting> prepared_ ABSL_GUARDED_BY(mu_);
  // Static mode: the newest routing, and one the engine has not taken yet.
  std::shared_ptr<const ExpertRouting> static_routing_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const ExpertRouting> pending_static_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> stop_{false};
  std::thread reporter_, reviver_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_SHARD_CLIENT_H_
