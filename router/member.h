// The client side of the router for a node (expert shard or attention node): registration with
// heartbeats that keep its lease (registering again after a lapse or a router restart), and a
// watch of placement maps that reconnects whenever the stream breaks. If the router is down the
// node keeps what it has and keeps trying; the router is never on the data path.
#ifndef DMOE_ROUTER_MEMBER_H_
#define DMOE_ROUTER_MEMBER_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/cluster_token.h"
#include "common/mutex.h"
#include "proto/router.grpc.pb.h"

namespace dmoe::router {

// `listen_address` ("HOST:PORT", e.g. 0.0.0.0:50051) with HOST replaced by `host` when it is not
// empty: what other nodes should dial (--advertise-host).
std::string AdvertisedAddress(const std::string& listen_address, const std::string& host);

struct MemberOptions {
  std::string router_address;  // "HOST:PORT"
  std::string cluster_token;   // sent as x-dmoe-cluster-token when not empty
  std::chrono::milliseconds rpc_deadline{2000};
};

// Logs "the router refused this node: <why>" and ends the process with status 2 at once: a node
// that cannot join must not serve on unseen.
void ExitOnRefusal(const std::string& why);

class RouterMember {
 public:
  explicit RouterMember(MemberOptions options);
  ~RouterMember();

  // Streams placement maps to `on_update` (on the member's own thread): active maps, or every
  // target (with active_version) when `targets`.
  void StartWatch(bool targets, std::function<void(const internal::PlacementUpdate&)> on_update);
  // Registers (retrying until the router answers), then heartbeats every lease / 3 with
  // `ready_version()` (may be null). Registers again when the router has forgotten the node.
  // When the router refuses the first registration (FAILED_PRECONDITION: another model, or
  // numerics unlike the other nodes of the role) the member logs it, calls `on_refused` (may be
  // null) on its thread and stops trying; processes pass ExitOnRefusal. A node refused after it
  // was registered (a router restart where an unlike node came first) logs it and serves on.
  void StartMembership(internal::RegisterRequest registration,
                       std::function<uint64_t()> ready_version,
                       std::function<void(const std::string& why)> on_refused = nullptr);
  bool refused() const { return refused_; }
  // Sends a heartbeat now (after loading, so that activation does not wait for the period).
  void HeartbeatNow();
  // Tells the router the node leaves; the node should serve on until a map without it is active.
  // Returns whether a map without it is planned (false: it is still needed).
  absl::StatusOr<bool> Deregister();
  // The router's members (gateways use it to find attention nodes).
  absl::StatusOr<internal::ListNodesReply> ListNodes();
  // Reports expert load (tokens per (layer, expert) since the last report).
  absl::Status ReportLoad(const internal::LoadReport& report);
  void Stop();

  // Seconds since the last successful heartbeat (or registration); -1 before the first.
  double heartbeat_age_seconds() const;
  // The newest version seen (active or target) on the watch or in heartbeat replies.
  uint64_t known_version() const { return known_version_; }
  const std::string& node_id() const { return registration_.node_id(); }

 private:
  void Authorize(grpc::ClientContext* ctx) const;
  bool RegisterOnce();
  // NOT_FOUND (the router forgot this node) registers again and, if `reregister`, heartbeats once
  // more (without: a router that forgets at once would recurse without end).
  bool HeartbeatOnce(bool reregister = true);

  MemberOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<internal::RouterService::Stub> stub_;
  internal::RegisterRequest registration_;
  std::function<uint64_t()> ready_version_;
  std::function<void(const std::string&)> on_refused_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> known_version_{0};
  std::atomic<int64_t> last_ok_ns_{0};
  std::atomic<int64_t> lease_ms_{3000};
  Mutex mu_;
  CondVar wake_;
  bool beat_now_ ABSL_GUARDED_BY(mu_) = false;
  bool registered_ = false;
  std::atomic<bool> refused_{false};
  bool ever_registered_ = false;  // the membership thread's
  Mutex watch_mu_;
  grpc::ClientContext* watch_ctx_ ABSL_GUARDED_BY(watch_mu_) = nullptr;
  std::thread watch_thread_, beat_thread_;
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_MEMBER_H_
