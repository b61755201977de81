// dmoe-expert: an expert shard. Loads only the routed experts it is told to host, serves them on
// the UCX data plane and answers its gRPC control API.
#include <grpcpp/grpcpp.h>
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/flags.h"
#include "common/grpc_setup.h"
#include "common/metrics.h"
#include "expert_service/expert_server.h"
#include "expert_service/expert_shard.h"
#include "expert_service/hosting.h"
#include "model/routed_experts.h"
#include "kernels/cpu/blas_threads.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "proto/expert_control.grpc.pb.h"
#include "router/member.h"
#include "transport/ucx.h"

namespace dmoe {
namespace {

constexpr char kHelp[] =
    R"(usage: dmoe-expert --model DIR (--experts SPEC | --router H:P --capacity N) [flags]

An expert shard: hosts a subset of the routed experts of the model in DIR and serves them to
attention nodes over UCX (dispatch -> combine), with a gRPC control API (GetInfo, GetStats).
It reads no expert tensor it does not host. What it hosts is fixed by --experts, or kept by the
router (dmoe-router): the shard registers, loads what each new placement gives it, reports it
ready, and drops what it lost once a map without it has been active for --drain-ms.

  --model DIR          checkpoint directory (Hugging Face layout)
  --experts SPEC       experts to host: comma-separated LAYERS:EXPERTS items, each side "*", "N"
                       or "A-B" (e.g. "*:0-7" = experts 0-7 of every MoE layer), or "I/N" for the
                       I-th of N equal contiguous slices of every MoE layer (e.g. "0/4")
  --ucx-listen H:P     UCX listener address (default 127.0.0.1:0 = any free port); "none" for
                       no listener (clients then connect by worker address, e.g. over sm,self)
  --grpc-listen H:P    gRPC control address (default 127.0.0.1:0)
  --ready-file F       once serving, write {"grpc": ..., "ucx": ..., "ucx_worker": ..., "pid": ...}
                       to F (atomically)
  --node-id ID         name reported by GetInfo (default: expert-<pid>)
  --metrics-listen H:P Prometheus /metrics address (default 127.0.0.1:0)
  --router H:P         the router's gRPC address (instead of --experts)
  --capacity N         (layer, expert) pairs this shard may host (with --router)
  --cluster-token-file F  the router's cluster token
  --advertise-host H   host other nodes reach this shard at (registered with the router in
                       place of the listen host, e.g. the pod IP; default: the listen host)
  --expert-dtype T     auto (default: fp8 checkpoints stay fp8, the rest f32), f32, int8 (per-channel
                       scales) or fp8 (e4m3, 128x128 block scales): how the experts are held
  --drain-ms N         keep lost experts, and on SIGTERM keep serving, N ms after a map without
                       them is active (default 2000)
  --blas-threads N     OpenBLAS threads (default 0 = OpenBLAS's default, one per CPU). When other
                       dmoe processes share this machine, give each its share of the CPUs (`dmoe
                       up` does): OpenBLAS's idle threads spin ~0.1 s after each call and take the
                       CPUs the others need

UCX is configured through its environment (UCX_TLS, UCX_NET_DEVICES, ...). SIGTERM or SIGINT
stops the shard; with --router it first deregisters and waits (at most 30 s) until a map without
it is active, so that no request in flight is refused.
)";

uint64_t ResidentBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

// Prometheus metrics of a shard, refreshed from its counters every 500 ms.
class ExpertMetrics {
 public:
  explicit ExpertMetrics(Metrics* m) : m_(m) {
    messages_ = &m->Counter("dmoe_expert_messages_total", "Dispatch messages handled");
    rejected_ = &m->Counter("dmoe_expert_rejected_messages_total",
                            "Malformed or unservable messages rejected");
    tokens_ = &m->Counter("dmoe_expert_tokens_total", "Token rows received");
    gemms_ = &m->Counter("dmoe_expert_gemms_total", "Expert GEMMs (one per expert per batch)");
    bytes_in_ =
        &m->Counter("dmoe_expert_transport_bytes_total", "Data-plane bytes", {{"direction", "in"}});
    bytes_out_ = &m->Counter("dmoe_expert_transport_bytes_total", "Data-plane bytes",
                             {{"direction", "out"}});
    peer_errors_ = &m->Counter("dmoe_expert_peer_errors_total", "Client endpoints that failed");
    weight_bytes_ = &m->Gauge("dmoe_expert_weight_bytes", "Resident bytes of the hosted experts");
    hosted_ = &m->Gauge("dmoe_expert_hosted_experts", "(layer, expert) pairs hosted");
  }
  ~ExpertMetrics() { Stop(); }
  // With a router: heartbeat age and the active placement version.
  void SetRouterSources(std::function<double()> heartbeat_age, std::function<double()> version) {
    std::lock_guard<std::mutex> l(mu_);
    heartbeat_age_fn_ = std::move(heartbeat_age);
    version_fn_ = std::move(version);
    heartbeat_age_ = &m_->Gauge("dmoe_expert_heartbeat_age_seconds",
                                "Time since the last heartbeat the router answered");
    version_ = &m_->Gauge("dmoe_expert_placement_version", "Active placement version");
  }
  void Start(const ExpertShard* shard, const transport::ServerTransport* t) {
    thread_ = std::thread([this, shard, t] {
      while (!stop_) {
        const ShardStats s = shard->stats();
        const transport::ServerStats ts = t->stats();
        Metrics::SetTotal(*messages_, static_cast<double>(s.messages));
        Metrics::SetTotal(*rejected_, static_cast<double>(s.rejected));
        Metrics::SetTotal(*tokens_, static_cast<double>(s.tokens));
        Metrics::SetTotal(*gemms_, static_cast<double>(s.gemms));
        Metrics::SetTotal(*bytes_in_, static_cast<double>(ts.bytes_in));
        Metrics::SetTotal(*bytes_out_, static_cast<double>(ts.bytes_out));
        Metrics::SetTotal(*peer_errors_, static_cast<double>(ts.peer_errors));
        const std::shared_ptr<const ExpertStore> store = shard->store();
        weight_bytes_->Set(static_cast<double>(store->bytes()));
        hosted_->Set(static_cast<double>(store->size()));
        // Per-expert series for every expert hosted now or before (counters never vanish).
        for (const auto& k : store->Keys()) {
          if (per_expert_.count(k)) continue;
          per_expert_[k] = &m_->Counter(
              "dmoe_expert_expert_tokens_total", "Token rows computed, per (layer, expert)",
              {{"layer", std::to_string(k.first)}, {"expert", std::to_string(k.second)}});
        }
        for (auto& [k, c] : per_expert_) {
          Metrics::SetTotal(*c, static_cast<double>(shard->expert_tokens(k.first, k.second)));
        }
        {
          std::lock_guard<std::mutex> l(mu_);
          if (heartbeat_age_fn_) heartbeat_age_->Set(heartbeat_age_fn_());
          if (version_fn_) version_->Set(version_fn_());
        }
        for (int i = 0; i < 10 && !stop_; ++i)
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    });
  }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }

 private:
  Metrics* m_;
  prometheus::Counter *messages_, *rejected_, *tokens_, *gemms_, *bytes_in_, *bytes_out_,
      *peer_errors_;
  prometheus::Gauge *weight_bytes_, *hosted_, *heartbeat_age_ = nullptr, *version_ = nullptr;
  std::map<std::pair<int64_t, int64_t>, prometheus::Counter*> per_expert_;
  std::mutex mu_;
  std::function<double()> heartbeat_age_fn_, version_fn_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

class ControlService final : public internal::ExpertControl::CallbackService {
 public:
  ControlService(internal::GetInfoReply info, const ExpertShard* shard,
                 const transport::ServerTransport* transport, uint64_t read_bytes)
      : info_(std::move(info)), shard_(shard), transport_(transport), read_bytes_(read_bytes) {}

  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* ctx,
                                    const internal::GetInfoRequest*,
                                    internal::GetInfoReply* reply) override {
    *reply = info_;
    for (const auto& [l, e] : shard_->store()->Keys()) {
      auto* id = reply->add_experts();
      id->set_layer(static_cast<uint32_t>(l));
      id->set_expert(static_cast<uint32_t>(e));
    }
    auto* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }

  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const internal::GetStatsRequest*,
                                     internal::GetStatsReply* reply) override {
    const ShardStats s = shard_->stats();
    const transport::ServerStats t = transport_->stats();
    reply->set_messages(s.messages);
    reply->set_rejected_messages(s.rejected);
    reply->set_tokens(s.tokens);
    reply->set_pairs(s.pairs);
    reply->set_batches(s.batches);
    reply->set_gemms(s.gemms);
    reply->set_bytes_in(t.bytes_in);
    reply->set_bytes_out(t.bytes_out);
    reply->set_dropped_replies(t.dropped_replies);
    reply->set_peer_errors(t.peer_errors);
    reply->set_expert_weight_bytes(shard_->store()->bytes());
    reply->set_checkpoint_bytes_read(read_bytes_);
    reply->set_resident_set_bytes(ResidentBytes());
    auto* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }

 private:
  internal::GetInfoReply info_;
  const ExpertShard* shard_;
  const transport::ServerTransport* transport_;
  uint64_t read_bytes_;
};

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dmoe-expert: error: %s\n", std::string(s.message()).c_str());
  return 2;
}

int Main(int argc, char** argv) {
  auto flags = Flags::Parse(
      argc - 1, argv + 1,
      {"model", "experts", "ucx-listen", "grpc-listen", "ready-file", "node-id", "metrics-listen",
       "router", "capacity", "cluster-token-file", "drain-ms", "advertise-host", "expert-dtype",
       "blas-threads"},
      {});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::fputs(kHelp, stdout);
    return 0;
  }
  auto dir = flags->String("model");
  if (!dir.ok()) return Fail(dir.status());
  auto blas = flags->Int("blas-threads", 0);
  if (!blas.ok()) return Fail(blas.status());
  if (auto st = cpu::SetBlasThreads(*blas); !st.ok()) return Fail(st);
  const bool routed = flags->Has("router");
  if (routed == flags->Has("experts")) {
    return Fail(absl::InvalidArgumentError("give exactly one of --experts and --router"));
  }
  auto capacity = flags->Int("capacity", 0);
  if (!capacity.ok()) return Fail(capacity.status());
  if (routed && *capacity <= 0) {
    return Fail(
        absl::InvalidArgumentError("--capacity: a positive number is needed with --router"));
  }
  auto drain_ms = flags->Int("drain-ms", 2000);
  if (!drain_ms.ok()) return Fail(drain_ms.status());
  if (*drain_ms < 0) return Fail(absl::InvalidArgumentError("--drain-ms: negative"));
  std::string token;
  if (flags->Has("cluster-token-file")) {
    auto t = router::ReadClusterTokenFile(flags->StringOr("cluster-token-file", ""));
    if (!t.ok()) return Fail(t.status());
    token = *t;
  }
  WeightDType expert_dtype = WeightDType::kAuto;
  if (!ParseWeightDType(flags->StringOr("expert-dtype", "auto"), &expert_dtype)) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--expert-dtype: \"",
                                                        flags->StringOr("expert-dtype", ""),
                                                        "\" is not auto, f32, int8 or fp8")));
  }
  auto config = LoadModelConfig(*dir);
  if (!config.ok()) return Fail(config.status());
  absl::StatusOr<std::vector<std::pair<int64_t, int64_t>>> experts =
      std::vector<std::pair<int64_t, int64_t>>();
  if (!routed) experts = ParseExpertSpec(flags->StringOr("experts", ""), *config);
  if (!experts.ok()) return Fail(experts.status());
  auto ck = Checkpoint::Open(*dir);
  if (!ck.ok()) return Fail(ck.status());
  std::unique_ptr<LoadProgress> progress;
  if (!routed) {
    uint64_t tensors = 0;
    const uint64_t bytes = (*ck)->BytesOf(ExpertStore::TensorSelector(*experts), &tensors);
    progress = std::make_unique<LoadProgress>(
        absl::StrCat("dmoe-expert: ", experts->size(), " experts from ", *dir), tensors, bytes);
    (*ck)->set_progress(progress.get());
  }
  auto store = ExpertStore::Load(**ck, *config, *experts, expert_dtype);
  if (!store.ok()) return Fail(store.status());
  if (progress != nullptr) progress->Done();
  (*ck)->set_progress(nullptr);
  const uint64_t bytes_read = (*ck)->bytes_read();
  // Unmap the checkpoint: its pages would otherwise stay in this process's resident set; and give
  // the heap's free pages (conversion scratch) back to the system.
  ck->reset();
  malloc_trim(0);

  // Block the stop signals before any thread starts, so that sigwait below receives them.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  auto ucx = transport::NewUcxServer();
  if (!ucx.ok()) return Fail(ucx.status());
  absl::StatusOr<std::string> ucx_addr = std::string();
  const std::string ucx_listen = flags->StringOr("ucx-listen", "127.0.0.1:0");
  if (ucx_listen != "none") {
    ucx_addr = (*ucx)->Listen(ucx_listen);
    if (!ucx_addr.ok()) return Fail(ucx_addr.status());
  }
  ExpertShard shard(*config, std::shared_ptr<const ExpertStore>(std::move(*store)));
  ExpertServer server(&shard, ucx->get());
  server.Start();

  Metrics metrics;
  auto metrics_addr = metrics.Serve(flags->StringOr("metrics-listen", "127.0.0.1:0"));
  if (!metrics_addr.ok()) return Fail(metrics_addr.status());
  ExpertMetrics expert_metrics(&metrics);
  expert_metrics.Start(&shard, ucx->get());

  internal::GetInfoReply info;
  const std::string node_id = flags->StringOr("node-id", absl::StrCat("expert-", getpid()));
  info.set_node_id(node_id);
  info.set_ucx_address(*ucx_addr);
  info.set_ucx_worker_address((*ucx)->WorkerAddress());
  info.set_hidden_size(static_cast<uint32_t>(config->hidden_size));
  info.set_num_hidden_layers(static_cast<uint32_t>(config->num_hidden_layers));
  info.set_n_routed_experts(static_cast<uint32_t>(config->n_routed_experts));
  ControlService control(info, &shard, ucx->get(), bytes_read);
  EnableHealthAndReflection();
  grpc::ServerBuilder builder;
  int grpc_port = 0;
  const std::string grpc_listen = flags->StringOr("grpc-listen", "127.0.0.1:0");
  builder.AddListeningPort(grpc_listen, grpc::InsecureServerCredentials(), &grpc_port);
  builder.RegisterService(&control);
  std::unique_ptr<grpc::Server> grpc_server = builder.BuildAndStart();
  if (grpc_server == nullptr || grpc_port == 0) {
    return Fail(
        absl::UnavailableError(absl::StrCat("--grpc-listen: cannot listen on ", grpc_listen)));
  }
  SetReadiness(grpc_server.get(), "dmoe.internal.ExpertControl", true);
  const std::string grpc_addr =
      absl::StrCat(grpc_listen.substr(0, grpc_listen.rfind(':')), ":", grpc_port);
  std::fprintf(stderr, "dmoe-expert: serving %zu experts; grpc %s, ucx %s\n", shard.store()->size(),
               grpc_addr.c_str(), ucx_addr->c_str());
  if (flags->Has("ready-file")) {
    const std::string path = flags->StringOr("ready-file", "");
    const std::string tmp = path + ".tmp";
    {
      std::ofstream out(tmp);
      out << "{\"grpc\": \"" << grpc_addr << "\", \"metrics\": \"" << *metrics_addr
          << "\", \"ucx\": \"" << *ucx_addr << "\", \"ucx_worker\": \"" << (*ucx)->WorkerAddress()
          << "\", \"pid\": " << getpid() << "}\n";
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      return Fail(absl::InternalError(absl::StrCat("--ready-file: cannot write ", path)));
    }
  }
  std::unique_ptr<HostingAgent> hosting;
  std::unique_ptr<router::RouterMember> member;
  if (routed) {
    hosting = std::make_unique<HostingAgent>(*config, *dir, node_id, &shard,
                                             std::chrono::milliseconds(*drain_ms), expert_dtype);
    router::MemberOptions mo;
    mo.router_address = flags->StringOr("router", "");
    mo.cluster_token = token;
    member = std::make_unique<router::RouterMember>(mo);
    hosting->on_ready = [&member](uint64_t) { member->HeartbeatNow(); };
    hosting->Start();
    member->StartWatch(/*targets=*/true,
                       [&hosting](const internal::PlacementUpdate& u) { hosting->OnUpdate(u); });
    internal::RegisterRequest reg;
    reg.set_node_id(node_id);
    reg.set_role(internal::EXPERT);
    // Listening on 0.0.0.0 says nothing to others: register the advertised host instead.
    const std::string host = flags->StringOr("advertise-host", "");
    reg.set_grpc_address(router::AdvertisedAddress(grpc_addr, host));
    reg.set_ucx_address(router::AdvertisedAddress(*ucx_addr, host));
    reg.set_ucx_worker_address((*ucx)->WorkerAddress());
    reg.set_capacity_experts(*capacity);
    member->StartMembership(reg, [&hosting] { return hosting->ready_version(); });
    expert_metrics.SetRouterSources(
        [&member] { return member->heartbeat_age_seconds(); },
        [&hosting] { return static_cast<double>(hosting->active_version()); });
  }
  int sig = 0;
  sigwait(&stop, &sig);
  std::fprintf(stderr, "dmoe-expert: signal %d, stopping\n", sig);
  SetReadiness(grpc_server.get(), "dmoe.internal.ExpertControl", false);
  if (member != nullptr) {
    // Leave without refusing anything: deregister, wait for a map without this shard to be
    // active, then give attention nodes --drain-ms to switch to it. Leave at once when the router
    // cannot be reached or cannot plan without this shard (nothing to wait for then).
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    const absl::StatusOr<bool> planned_out = member->Deregister();
    if (!planned_out.ok()) {
      std::fprintf(stderr, "dmoe-expert: cannot deregister (%s); leaving\n",
                   std::string(planned_out.status().message()).c_str());
    } else if (!*planned_out) {
      std::fprintf(stderr,
                   "dmoe-expert: the other shards cannot host this shard's experts; leaving\n");
    } else {
      while (!hosting->ActiveWithoutMe() && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (!hosting->ActiveWithoutMe()) {
        std::fprintf(stderr,
                     "dmoe-expert: no map without this shard became active in 30 s; "
                     "leaving\n");
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(*drain_ms));
        std::fprintf(stderr, "dmoe-expert: placement %llu is active without this shard; leaving\n",
                     static_cast<unsigned long long>(hosting->active_version()));
      }
    }
    member->Stop();
    hosting->Stop();
  }
  grpc_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  expert_metrics.Stop();
  server.Stop();
  (*ucx)->Shutdown();
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
