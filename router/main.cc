// dmoe-router: membership (leases), the versioned expert placement map, load reports.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/build_info.h"
#include "common/flags.h"
#include "common/grpc_setup.h"
#include "common/internal_tls.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/service.h"
#include "common/status_macros.h"
#include "model/config.h"
#include "router/member.h"
#include "router/router_service.h"
#include "router/router_state.h"

namespace dmoe::router {
namespace {

constexpr char kHelp[] = R"(usage: dmoe-router --model DIR [flags]

The router: expert shards, attention nodes and gateways register and hold a lease by heartbeat;
it keeps the versioned placement map of (layer, expert) -> shards (expert groups together, EPLB
replicas of hot experts from reported load) and streams it to watchers. It is not on the data path.

  --model DIR                config.json of the served model (the MoE shape)
  --grpc-listen H:P          address (default 127.0.0.1:0)
  --ready-file F             once serving, write {"grpc": ..., "metrics": ..., "pid": ...} to F
  --lease-ms N               lease length (default 3000); a node that misses it is removed
  --cluster-token-file F     require this token in "x-dmoe-cluster-token" on every call
  --replication R            copies of every expert on distinct shards, as capacity allows
                             (default 1); with R >= 2 losing a shard stalls no request
  --max-extra-replicas N     EPLB replicas of hot experts to add (default 0)
  --min-shards N             plan the first map only once N expert shards have registered
                             (default 1); later maps may use fewer (failover)
  --startup-grace-ms N       plan no map for N ms after start, so that after a restart every
                             live node registers again first (default: the lease)
  --rebalance-seconds N      recompute the placement from reported load every N s (default 0: never)
  --metrics-listen H:P       Prometheus /metrics (default 127.0.0.1:0)
%s%s)";

struct Options {
  std::string model, token;
  int64_t lease_ms = 3000, extra = 0, rebalance_s = 0, replication = 1, grace_ms = 0,
          min_shards = 1;
};

absl::StatusOr<Options> ParseOptions(const Flags& f) {
  Options o;
  ASSIGN_OR_RETURN(o.model, f.String("model"));
  ASSIGN_OR_RETURN(o.lease_ms, f.Int("lease-ms", 3000));
  ASSIGN_OR_RETURN(o.extra, f.Int("max-extra-replicas", 0));
  ASSIGN_OR_RETURN(o.rebalance_s, f.Int("rebalance-seconds", 0));
  ASSIGN_OR_RETURN(o.replication, f.Int("replication", 1));
  ASSIGN_OR_RETURN(o.grace_ms, f.Int("startup-grace-ms", o.lease_ms));
  ASSIGN_OR_RETURN(o.min_shards, f.Int("min-shards", 1));
  auto bad = [](const char* what) { return absl::InvalidArgumentError(what); };
  if (o.lease_ms <= 0) return bad("--lease-ms: must be positive");
  // (Larger values overflowed the lease clock: every lease lapsed at once.)
  if (o.lease_ms > 3600000) return bad("--lease-ms: at most 3600000 (an hour)");
  if (o.rebalance_s < 0 || o.rebalance_s > 86400 * 30) {
    return bad("--rebalance-seconds: 0 (never) to 2592000 (30 days)");
  }
  if (o.grace_ms > 3600000) return bad("--startup-grace-ms: at most 3600000 (an hour)");
  if (o.replication < 1) return bad("--replication: must be >= 1");
  if (o.extra < 0) return bad("--max-extra-replicas: negative");
  if (o.grace_ms < 0) return bad("--startup-grace-ms: negative");
  if (o.min_shards < 1) return bad("--min-shards: must be >= 1");
  if (f.Has("cluster-token-file")) {
    ASSIGN_OR_RETURN(o.token, ReadClusterTokenFile(f.StringOr("cluster-token-file", "")));
    if (o.token.empty()) return bad("--cluster-token-file: empty token");
  }
  return o;
}

// What an operator watches on a router, refreshed by the lease loop.
class RouterGauges {
 public:
  explicit RouterGauges(Metrics* m)
      : version_(m->Gauge("dmoe_router_placement_version", "Active placement map version")),
        target_(m->Gauge("dmoe_router_target_placement_version",
                         "Planned placement version (active once every shard is ready)")),
        members_{
            &m->Gauge("dmoe_router_nodes", "Registered nodes by role", {{"role", "expert"}}),
            &m->Gauge("dmoe_router_nodes", "Registered nodes by role", {{"role", "attention"}}),
            &m->Gauge("dmoe_router_nodes", "Registered nodes by role", {{"role", "gateway"}})},
        heartbeat_age_(m->Gauge("dmoe_router_oldest_heartbeat_age_seconds",
                                "Time since the least recent heartbeat of any node")),
        expired_(
            m->Counter("dmoe_router_expired_leases_total", "Nodes removed for a lapsed lease")) {}
  void Expired(size_t n) { expired_.Increment(static_cast<double>(n)); }
  void Update(const RouterState& state) {
    const PlacementState maps = state.state();
    version_.Set(static_cast<double>(maps.active.version));
    target_.Set(static_cast<double>(maps.target.version));
    const auto nodes = state.nodes();
    double oldest = 0;
    double by_role[3] = {0, 0, 0};
    const auto now = std::chrono::steady_clock::now();
    for (const Node& n : nodes) {
      by_role[static_cast<int>(n.role)] += 1;
      oldest = std::max(
          oldest, std::chrono::duration<double>(now - (n.lease_until - state.lease())).count());
    }
    heartbeat_age_.Set(oldest);
    for (int r = 0; r < 3; ++r) members_[r]->Set(by_role[r]);
  }

 private:
  prometheus::Gauge& version_;
  prometheus::Gauge& target_;
  prometheus::Gauge* members_[3];  // by NodeRole: expert, attention, gateway
  prometheus::Gauge& heartbeat_age_;
  prometheus::Counter& expired_;
};

// Expires leases (and rebalances every rebalance_s) until `done`.
void LeaseLoop(const Options& o, RouterState* state, RouterGauges* gauges,
               const std::atomic<bool>* done) {
  auto last_rebalance = std::chrono::steady_clock::now();
  while (!*done) {
    // A tenth of a lease, at most 100 ms at a time: a stop is seen within 100 ms.
    const auto tick = std::chrono::steady_clock::now() +
                      std::chrono::milliseconds(std::max<int64_t>(10, o.lease_ms / 10));
    while (!*done && std::chrono::steady_clock::now() < tick) {
      std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(
          std::chrono::milliseconds(100), tick - std::chrono::steady_clock::now()));
    }
    if (*done) break;
    const auto gone = state->ExpireLeases();
    for (const auto& id : gone) spdlog::warn("lease of {} lapsed", id);
    gauges->Expired(gone.size());
    if (o.rebalance_s > 0 &&
        std::chrono::steady_clock::now() - last_rebalance > std::chrono::seconds(o.rebalance_s)) {
      state->Rebalance();
      last_rebalance = std::chrono::steady_clock::now();
    }
    gauges->Update(*state);
  }
}

int Main(int argc, char** argv) {
  ServiceMain svc("dmoe-router");
  auto flags = Flags::Parse(
      argc - 1, argv + 1,
      WithInternalTls({"model", "grpc-listen", "ready-file", "lease-ms", "cluster-token-file",
                       "max-extra-replicas", "rebalance-seconds", "metrics-listen", "replication",
                       "startup-grace-ms", "min-shards", "log-level"}),
      {});
  if (!flags.ok()) return svc.Fail(flags.status());
  if (flags->version()) return PrintVersion(svc.name());
  if (flags->help()) {
    std::printf(kHelp, kLogLevelHelp, kInternalTlsHelp);
    return 0;
  }
  if (auto s = svc.SetLogLevel(*flags); !s.ok()) return svc.Fail(s);
  if (auto s = SetInternalTlsFromFlags(*flags); !s.ok()) return svc.Fail(s);
  auto o = ParseOptions(*flags);
  if (!o.ok()) return svc.Fail(o.status());
  auto config = LoadModelConfig(o->model);
  if (!config.ok()) return svc.Fail(config.status());
  PlacementOptions po;
  po.max_extra_replicas = o->extra;
  po.replication = o->replication;
  RouterState state(
      *config, std::chrono::milliseconds(o->lease_ms), po,
      [] { return std::chrono::steady_clock::now(); }, std::chrono::milliseconds(o->grace_ms));
  state.set_min_shards(o->min_shards);
  Metrics metrics;
  auto metrics_addr = metrics.Serve(flags->StringOr("metrics-listen", "127.0.0.1:0"));
  if (!metrics_addr.ok()) return svc.Fail(metrics_addr.status());
  RouterGauges gauges(&metrics);
  std::atomic<bool> done{false};
  std::thread leases([&] { LeaseLoop(*o, &state, &gauges, &done); });
  RouterServiceImpl service(&state, o->token);
  auto addr = svc.Serve(*flags, {&service}, "dmoe.internal.RouterService", *metrics_addr,
                        nlohmann::json::object(), true, InternalServerCredentials());
  const absl::Status st = addr.status();
  if (st.ok()) svc.WaitForStop();
  svc.StopGrpc(std::chrono::seconds(1));
  done = true;
  leases.join();
  return st.ok() ? 0 : svc.Fail(st);
}

}  // namespace
}  // namespace dmoe::router

int main(int argc, char** argv) { return dmoe::router::Main(argc, argv); }
