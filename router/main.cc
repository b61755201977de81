// dmoe-router: membership (leases), the versioned expert placement map, load reports.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/flags.h"
#include "common/grpc_setup.h"
#include "common/metrics.h"
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
)";

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dmoe-router: error: %s\n", std::string(s.message()).c_str());
  return 2;
}

int Main(int argc, char** argv) {
  auto flags = Flags::Parse(
      argc - 1, argv + 1,
      {"model", "grpc-listen", "ready-file", "lease-ms", "cluster-token-file", "max-extra-replicas",
       "rebalance-seconds", "metrics-listen", "replication", "startup-grace-ms", "min-shards"},
      {});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::fputs(kHelp, stdout);
    return 0;
  }
  auto dir = flags->String("model");
  if (!dir.ok()) return Fail(dir.status());
  auto config = LoadModelConfig(*dir);
  if (!config.ok()) return Fail(config.status());
  auto lease = flags->Int("lease-ms", 3000);
  auto extra = flags->Int("max-extra-replicas", 0);
  auto rebalance = flags->Int("rebalance-seconds", 0);
  auto replication = flags->Int("replication", 1);
  auto grace = flags->Int("startup-grace-ms", lease.ok() ? *lease : 0);
  auto min_shards = flags->Int("min-shards", 1);
  for (const auto* v : {&lease, &extra, &rebalance, &replication, &grace, &min_shards}) {
    if (!v->ok()) return Fail(v->status());
  }
  if (*lease <= 0) return Fail(absl::InvalidArgumentError("--lease-ms: must be positive"));
  if (*replication < 1) return Fail(absl::InvalidArgumentError("--replication: must be >= 1"));
  if (*extra < 0) return Fail(absl::InvalidArgumentError("--max-extra-replicas: negative"));
  if (*grace < 0) return Fail(absl::InvalidArgumentError("--startup-grace-ms: negative"));
  if (*min_shards < 1) return Fail(absl::InvalidArgumentError("--min-shards: must be >= 1"));
  std::string token;
  if (flags->Has("cluster-token-file")) {
    auto t = ReadClusterTokenFile(flags->StringOr("cluster-token-file", ""));
    if (!t.ok()) return Fail(t.status());
    if (t->empty()) return Fail(absl::InvalidArgumentError("--cluster-token-file: empty token"));
    token = *t;
  }
  PlacementOptions po;
  po.max_extra_replicas = *extra;
  po.replication = *replication;
  RouterState state(
      *config, std::chrono::milliseconds(*lease), po,
      [] { return std::chrono::steady_clock::now(); }, std::chrono::milliseconds(*grace));
  state.set_min_shards(*min_shards);
  Metrics metrics;
  auto metrics_addr = metrics.Serve(flags->StringOr("metrics-listen", "127.0.0.1:0"));
  if (!metrics_addr.ok()) return Fail(metrics_addr.status());
  auto& version = metrics.Gauge("dmoe_router_placement_version", "Active placement map version");
  auto& target = metrics.Gauge("dmoe_router_target_placement_version",
                               "Planned placement version (active once every shard is ready)");
  auto& members = metrics.Gauge("dmoe_router_nodes", "Registered nodes");
  auto& heartbeat_age = metrics.Gauge("dmoe_router_oldest_heartbeat_age_seconds",
                                      "Time since the least recent heartbeat of any node");
  auto& expired =
      metrics.Counter("dmoe_router_expired_leases_total", "Nodes removed for a lapsed lease");

  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  std::atomic<bool> done{false};
  std::thread leases([&] {
    auto last_rebalance = std::chrono::steady_clock::now();
    while (!done) {
      std::this_thread::sleep_for(std::chrono::milliseconds(std::max<int64_t>(10, *lease / 10)));
      const auto gone = state.ExpireLeases();
      for (const auto& id : gone)
        std::fprintf(stderr, "dmoe-router: lease of %s lapsed\n", id.c_str());
      expired.Increment(static_cast<double>(gone.size()));
      if (*rebalance > 0 &&
          std::chrono::steady_clock::now() - last_rebalance > std::chrono::seconds(*rebalance)) {
        state.Rebalance();
        last_rebalance = std::chrono::steady_clock::now();
      }
      const PlacementState maps = state.state();
      version.Set(static_cast<double>(maps.active.version));
      target.Set(static_cast<double>(maps.target.version));
      const auto nodes = state.nodes();
      members.Set(static_cast<double>(nodes.size()));
      double oldest = 0;
      const auto now = std::chrono::steady_clock::now();
      for (const Node& n : nodes) {
        oldest = std::max(
            oldest, std::chrono::duration<double>(now - (n.lease_until - state.lease())).count());
      }
      heartbeat_age.Set(oldest);
    }
  });
  RouterServiceImpl service(&state, token);
  EnableHealthAndReflection();
  grpc::ServerBuilder builder;
  int port = 0;
  const std::string listen = flags->StringOr("grpc-listen", "127.0.0.1:0");
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  auto server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    done = true;
    leases.join();
    return Fail(absl::UnavailableError(absl::StrCat("--grpc-listen: cannot listen on ", listen)));
  }
  SetReadiness(server.get(), "dmoe.internal.RouterService", true);
  const std::string addr = absl::StrCat(listen.substr(0, listen.rfind(':')), ":", port);
  std::fprintf(stderr, "dmoe-router: serving on %s\n", addr.c_str());
  if (flags->Has("ready-file")) {
    const std::string path = flags->StringOr("ready-file", "");
    {
      std::ofstream out(path + ".tmp");
      out << "{\"grpc\": \"" << addr << "\", \"metrics\": \"" << *metrics_addr
          << "\", \"pid\": " << getpid() << "}\n";
    }
    std::rename((path + ".tmp").c_str(), path.c_str());
  }
  int sig = 0;
  sigwait(&stop, &sig);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  done = true;
  leases.join();
  return 0;
}

}  // namespace
}  // namespace dmoe::router

int main(int argc, char** argv) { return dmoe::router::Main(argc, argv); }
