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
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/build_info.h"
#include "common/cluster_token.h"
#include "common/device_flags.h"
#include "common/flags.h"
#include "common/grpc_setup.h"
#include "common/huge_pages.h"
#include "common/internal_tls.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/mutex.h"
#include "common/service.h"
#include "common/status_macros.h"
#include "expert_service/expert_server.h"
#include "expert_service/expert_shard.h"
#include "expert_service/hosting.h"
#include "kernels/cpu/bf16dot.h"
#include "kernels/cpu/blas_threads.h"
#include "model/config.h"
#include "model/cuda_experts.h"
#include "model/routed_experts.h"
#include "model/safetensors.h"
#include "proto/expert_control.grpc.pb.h"
#include "router/member.h"
#include "router/router_state.h"
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
  --node-id ID         name reported by GetInfo and to the router: printable ASCII, no
                       spaces, at most 253 bytes (default: expert-<pid>)
  --metrics-listen H:P Prometheus /metrics address (default 127.0.0.1:0)
  --router H:P         the router's gRPC address (instead of --experts)
  --capacity N         (layer, expert) pairs this shard may host (with --router)
  --cluster-token-file F  the cluster token (first line of F): sent to the router; the control
                          API then refuses calls without it (UNAUTHENTICATED)
  --advertise-host H   host other nodes reach this shard at (registered with the router in
                       place of the listen host, e.g. the pod IP; default: the listen host)
  --expert-dtype T     auto (default: bf16 and fp8 checkpoints stay as stored, the rest f32), f32,
                       bf16, int8 (per-channel scales) or fp8 (e4m3, 128x128 block scales): how
                       the experts are held
  --drain-ms N         keep lost experts, and on SIGTERM keep serving, N ms after a map without
                       them is active (default 2000)
  --bf16-activations   bf16 and fp8 experts multiply bf16-rounded activations (A16: vdpbf16ps where the CPU
                       has AVX512-BF16; kernels/cpu/bf16dot.h). Replicas of an expert must agree:
                       start every shard with the same setting
  --threads N          compute threads: the kernel pool's and OpenBLAS's (default 0 = one per
                       CPU). When other dmoe processes share this machine, give each its share of
                       the CPUs (`dmoe up` does): idle pool threads spin briefly after each call
                       and OpenBLAS's ~0.1 s, taking the CPUs the others need
                       (--blas-threads N: the same, its former name)
  --inject-delay-ms N  fault injection, for tests only: wait N ms before serving each batch of
                       requests (a slow shard)
%s%s%s
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
    refused_peers_ =
        &m->Counter("dmoe_expert_refused_peers_total",
                    "UCX client endpoints refused: their hello lacked the cluster token");
    refused_requests_ =
        &m->Counter("dmoe_expert_refused_requests_total",
                    "Requests dropped unanswered: their endpoint had not presented the token");
    weight_bytes_ = &m->Gauge("dmoe_expert_weight_bytes", "Resident bytes of the hosted experts");
    hosted_ = &m->Gauge("dmoe_expert_hosted_experts", "(layer, expert) pairs hosted");
    batch_ = &m->Seconds("dmoe_expert_batch_seconds",
                         "Compute time of one batch: every request that had arrived, merged per "
                         "expert, from taking them to handing the replies to the transport");
  }
  void ObserveBatch(double seconds) { batch_->Observe(seconds); }
  ~ExpertMetrics() { Stop(); }
  // With a router: heartbeat age and the active placement version.
  void SetRouterSources(std::function<double()> heartbeat_age, std::function<double()> version) {
    MutexLock l(&mu_);
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
        Metrics::SetTotal(*refused_peers_, static_cast<double>(ts.refused_peers));
        Metrics::SetTotal(*refused_requests_, static_cast<double>(ts.refused_requests));
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
          MutexLock l(&mu_);
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
      *peer_errors_, *refused_peers_, *refused_requests_;
  prometheus::Gauge *weight_bytes_, *hosted_, *heartbeat_age_ = nullptr, *version_ = nullptr;
  prometheus::Histogram* batch_;
  std::map<std::pair<int64_t, int64_t>, prometheus::Counter*> per_expert_;
  Mutex mu_;
  std::function<double()> heartbeat_age_fn_ ABSL_GUARDED_BY(mu_), version_fn_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

class ControlService final : public internal::ExpertControl::CallbackService {
 public:
  // Calls without `token` (when not empty) get UNAUTHENTICATED.
  ControlService(internal::GetInfoReply info, const ExpertShard* shard,
                 const transport::ServerTransport* transport, uint64_t read_bytes,
                 std::string token)
      : info_(std::move(info)),
        shard_(shard),
        transport_(transport),
        read_bytes_(read_bytes),
        token_(std::move(token)) {}

  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* ctx,
                                    const internal::GetInfoRequest*,
                                    internal::GetInfoReply* reply) override {
    if (!CallAuthorized(*ctx, token_)) return Refuse(ctx);
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
    if (!CallAuthorized(*ctx, token_)) return Refuse(ctx);
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
    reply->set_refused_peers(t.refused_peers);
    reply->set_refused_requests(t.refused_requests);
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
  std::string token_;

  static grpc::ServerUnaryReactor* Refuse(grpc::CallbackServerContext* ctx) {
    auto* r = ctx->DefaultReactor();
    r->Finish(Unauthenticated());
    return r;
  }
};

struct Options {
  std::string dir, token, node_id;
  bool routed = false;
  int64_t capacity = 0, drain_ms = 2000, inject_delay_ms = 0;
  WeightDType expert_dtype = WeightDType::kAuto;
};

absl::StatusOr<Options> ParseOptions(const Flags& f) {
  Options o;
  ASSIGN_OR_RETURN(o.dir, f.String("model"));
  o.node_id = f.StringOr("node-id", absl::StrCat("expert-", getpid()));
  RETURN_IF_ERROR(router::CheckNodeId(o.node_id, "--node-id"));
  o.routed = f.Has("router");
  if (o.routed == f.Has("experts")) {
    return absl::InvalidArgumentError("give exactly one of --experts and --router");
  }
  ASSIGN_OR_RETURN(o.capacity, f.Int("capacity", 0));
  if (o.routed && o.capacity <= 0) {
    return absl::InvalidArgumentError("--capacity: a positive number is needed with --router");
  }
  ASSIGN_OR_RETURN(o.drain_ms, f.Int("drain-ms", 2000));
  if (o.drain_ms < 0) return absl::InvalidArgumentError("--drain-ms: negative");
  ASSIGN_OR_RETURN(o.inject_delay_ms, f.Int("inject-delay-ms", 0));
  if (o.inject_delay_ms < 0) return absl::InvalidArgumentError("--inject-delay-ms: negative");
  if (f.Has("cluster-token-file")) {
    ASSIGN_OR_RETURN(o.token, ReadClusterTokenFile(f.StringOr("cluster-token-file", "")));
  }
  if (!ParseWeightDType(f.StringOr("expert-dtype", "auto"), &o.expert_dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("--expert-dtype: \"",
                                                   f.StringOr("expert-dtype", ""),
                                                   "\" is not auto, f32, bf16, int8 or fp8"));
  }
  return o;
}

// The experts of --experts (none with --router: the router's placement brings them), copied to
// `gpu` too where there is one (experts placed here later copy on first use); the checkpoint
// bytes read go to *bytes_read.
absl::StatusOr<std::unique_ptr<ExpertStore>> LoadExperts(const Flags& f, const Options& o,
                                                         const ModelConfig& config,
                                                         CudaExperts* gpu, uint64_t* bytes_read) {
  std::vector<std::pair<int64_t, int64_t>> experts;
  if (!o.routed) {
    ASSIGN_OR_RETURN(experts, ParseExpertSpec(f.StringOr("experts", ""), config));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ck, Checkpoint::Open(o.dir));
  std::unique_ptr<LoadProgress> progress;
  if (!o.routed) {
    uint64_t tensors = 0;
    const uint64_t bytes = ck->BytesOf(ExpertStore::TensorSelector(experts), &tensors);
    progress = std::make_unique<LoadProgress>(
        absl::StrCat("dmoe-expert: ", experts.size(), " experts from ", o.dir), tensors, bytes);
    ck->set_progress(progress.get());
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ExpertStore> store,
                   ExpertStore::Load(*ck, config, experts, o.expert_dtype));
  if (progress != nullptr) progress->Done();
  *bytes_read = ck->bytes_read();
  // Unmap the checkpoint (its pages would otherwise stay in this process's resident set) and give
  // the heap's free pages (conversion scratch) back to the system.
  ck.reset();
  malloc_trim(0);
  if (gpu != nullptr) RETURN_IF_ERROR(gpu->Preload(*store, /*log_progress=*/true));
  return store;
}

// How this shard computes, for the router (RegisterRequest.numerics): the routed experts' dtype as
// held (--expert-dtype resolved against the checkpoint's first routed expert), A16, the device.
absl::StatusOr<std::string> ShardNumerics(const Options& o, const ModelConfig& c, bool cuda) {
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ck, Checkpoint::Open(o.dir));
  DType stored = DType::kF32;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.IsMoeLayer(l)) continue;
    ASSIGN_OR_RETURN(TensorInfo t, ck->Info(weight_names::Expert(l, 0, "gate_proj")));
    stored = t.dtype;
    break;
  }
  return NumericsString("experts", WeightDTypeName(HeldWeightDType(o.expert_dtype, stored)),
                        cpu::Bf16ActivationsA16(), stored, cuda ? "cuda" : "cpu");
}

// With --router: hosts what the placement says and holds a lease; on stop, leaves without
// refusing anything.
class RouterLink {
 public:
  struct Addresses {
    std::string node_id, grpc, ucx, ucx_worker;
  };
  RouterLink(const Flags& f, const Options& o, const ModelConfig& config, ExpertShard* shard,
             const Addresses& a, const std::string& numerics, ExpertMetrics* metrics)
      : drain_(o.drain_ms) {
    hosting_ =
        std::make_unique<HostingAgent>(config, o.dir, a.node_id, shard, drain_, o.expert_dtype);
    router::MemberOptions mo;
    mo.router_address = f.StringOr("router", "");
    mo.cluster_token = o.token;
    member_ = std::make_unique<router::RouterMember>(mo);
    hosting_->on_ready = [this](uint64_t) { member_->HeartbeatNow(); };
    hosting_->Start();
    member_->StartWatch(/*targets=*/true,
                        [this](const internal::PlacementUpdate& u) { hosting_->OnUpdate(u); });
    internal::RegisterRequest reg;
    reg.set_node_id(a.node_id);
    reg.set_role(internal::EXPERT);
    // Listening on 0.0.0.0 says nothing to others: register the advertised host instead.
    const std::string host = f.StringOr("advertise-host", "");
    reg.set_grpc_address(router::AdvertisedAddress(a.grpc, host));
    reg.set_ucx_address(router::AdvertisedAddress(a.ucx, host));
    reg.set_ucx_worker_address(a.ucx_worker);
    reg.set_capacity_experts(o.capacity);
    reg.set_model_fingerprint(ModelFingerprint(config));
    reg.set_numerics(numerics);
    member_->StartMembership(
        reg, [this] { return hosting_->ready_version(); }, router::ExitOnRefusal);
    metrics->SetRouterSources([this] { return member_->heartbeat_age_seconds(); },
                              [this] { return static_cast<double>(hosting_->active_version()); });
  }

  // Deregisters, waits for a map without this shard to be active, then gives attention nodes
  // --drain-ms to switch to it. Leaves at once when the router cannot be reached or cannot plan
  // without this shard (nothing to wait for then).
  void Leave() {
    hosting_->StopLoading();  // what this shard is leaving needs no more experts
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    const absl::StatusOr<bool> planned_out = member_->Deregister();
    if (!planned_out.ok()) {
      spdlog::warn("cannot deregister ({}); leaving", std::string(planned_out.status().message()));
    } else if (!*planned_out) {
      spdlog::warn("the other shards cannot host this shard's experts; leaving");
    } else {
      while (!hosting_->ActiveWithoutMe() && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (!hosting_->ActiveWithoutMe()) {
        spdlog::warn("no map without this shard became active in 30 s; leaving");
      } else {
        std::this_thread::sleep_for(drain_);
        spdlog::info("placement {} is active without this shard; leaving",
                     hosting_->active_version());
      }
    }
    member_->Stop();
    hosting_->Stop();
  }

 private:
  std::chrono::milliseconds drain_;
  std::unique_ptr<HostingAgent> hosting_;
  std::unique_ptr<router::RouterMember> member_;
};

// What GetInfo answers besides the hosted experts.
internal::GetInfoReply Info(const RouterLink::Addresses& a, const ModelConfig& c,
                            const std::string& numerics) {
  internal::GetInfoReply info;
  info.set_model_fingerprint(ModelFingerprint(c));
  info.set_numerics(numerics);
  info.set_node_id(a.node_id);
  info.set_ucx_address(a.ucx);
  info.set_ucx_worker_address(a.ucx_worker);
  info.set_hidden_size(static_cast<uint32_t>(c.hidden_size));
  info.set_num_hidden_layers(static_cast<uint32_t>(c.num_hidden_layers));
  info.set_n_routed_experts(static_cast<uint32_t>(c.n_routed_experts));
  return info;
}

// --device cuda: the experts compute on GPU --gpu (copied there at start, or on first use for
// experts placed here later); else null.
absl::StatusOr<std::unique_ptr<CudaExperts>> MakeGpuExperts(const Flags& f, const ModelConfig& c) {
  ASSIGN_OR_RETURN(DeviceChoice d, ParseDevice(f));
  if (!d.cuda) return std::unique_ptr<CudaExperts>();
  auto gpu = CudaExperts::Create(c, d.gpu);
  if (!gpu.ok()) {
    return absl::Status(gpu.status().code(),
                        absl::StrCat("--device cuda: ", gpu.status().message()));
  }
  spdlog::info("experts compute on {}", (*gpu)->name());
  return gpu;
}

// The flags that take a value.
std::set<std::string> FlagNames() {
  return WithInternalTls({"model", "experts", "ucx-listen", "grpc-listen", "ready-file", "node-id",
                          "metrics-listen", "router", "capacity", "cluster-token-file", "drain-ms",
                          "advertise-host", "expert-dtype", "threads", "blas-threads", "log-level",
                          "inject-delay-ms", "device", "gpu"});
}

// The compute pool's threads (--threads / --blas-threads) and --bf16-activations.
absl::Status SetUpCompute(const Flags& flags) {
  auto blas = ComputeThreads(flags);
  if (!blas.ok()) return blas.status();
  RETURN_IF_ERROR(
      cpu::SetBlasThreads(*blas, flags.Has("threads") ? "--threads" : "--blas-threads"));
  cpu::SetBf16Activations(flags.Bool("bf16-activations"));
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  ReexecForHugePageMalloc(argv);  // common/huge_pages.h: the experts load in 2 MiB pages
  ServiceMain svc("dmoe-expert");
  auto flags = Flags::Parse(argc - 1, argv + 1, FlagNames(), {"bf16-activations"});
  if (!flags.ok()) return svc.Fail(flags.status());
  if (flags->version()) return PrintVersion(svc.name());
  if (flags->help()) {
    std::printf(kHelp, DeviceHelp(23, /*experts_only=*/true).c_str(), kLogLevelHelp,
                kInternalTlsHelp);
    return 0;
  }
  if (auto s = svc.SetLogLevel(*flags); !s.ok()) return svc.Fail(s);
  if (auto s = SetInternalTlsFromFlags(*flags); !s.ok()) return svc.Fail(s);
  if (auto s = SetUpCompute(*flags); !s.ok()) return svc.Fail(s);
  auto o = ParseOptions(*flags);
  if (!o.ok()) return svc.Fail(o.status());
  auto config = LoadModelConfig(o->dir);
  if (!config.ok()) return svc.Fail(config.status());
  auto gpu = MakeGpuExperts(*flags, *config);  // before loading: fail fast without a GPU
  if (!gpu.ok()) return svc.Fail(gpu.status());
  auto numerics = ShardNumerics(*o, *config, gpu->get() != nullptr);
  if (!numerics.ok()) return svc.Fail(numerics.status());
  // Before the experts load: a bad --metrics-listen fails now; the process is seen while it loads.
  Metrics metrics;
  auto metrics_addr = metrics.Serve(flags->StringOr("metrics-listen", "127.0.0.1:0"));
  if (!metrics_addr.ok()) return svc.Fail(metrics_addr.status());
  uint64_t bytes_read = 0;
  auto store = LoadExperts(*flags, *o, *config, gpu->get(), &bytes_read);
  if (!store.ok()) return svc.Fail(store.status());

  auto ucx = transport::NewUcxServer(o->token);
  if (!ucx.ok()) return svc.Fail(ucx.status());
  absl::StatusOr<std::string> ucx_addr = std::string();
  const std::string ucx_listen = flags->StringOr("ucx-listen", "127.0.0.1:0");
  if (ucx_listen != "none") ucx_addr = (*ucx)->Listen(ucx_listen);
  if (!ucx_addr.ok()) return svc.Fail(ucx_addr.status());
  ExpertShard shard(*config, std::shared_ptr<const ExpertStore>(std::move(*store)), gpu->get());
  ExpertMetrics expert_metrics(&metrics);
  ExpertServer server(&shard, ucx->get());
  server.SetBatchObserver([&expert_metrics](double s) { expert_metrics.ObserveBatch(s); });
  if (o->inject_delay_ms > 0) {
    spdlog::warn("--inject-delay-ms {}: every batch waits (a test-only fault)", o->inject_delay_ms);
    server.SetInjectedDelay(std::chrono::milliseconds(o->inject_delay_ms));
  }
  server.Start();
  expert_metrics.Start(&shard, ucx->get());

  RouterLink::Addresses a;
  a.node_id = o->node_id;
  a.ucx = *ucx_addr;
  a.ucx_worker = (*ucx)->WorkerAddress();
  ControlService control(Info(a, *config, *numerics), &shard, ucx->get(), bytes_read, o->token);
  spdlog::info("serving {} experts; ucx {}", shard.store()->size(), a.ucx);
  auto grpc_addr =
      svc.Serve(*flags, {&control}, "dmoe.internal.ExpertControl", *metrics_addr,
                {{"ucx", a.ucx}, {"ucx_worker", a.ucx_worker}}, true, InternalServerCredentials());
  const absl::Status st = grpc_addr.status();
  std::unique_ptr<RouterLink> link;  // the metrics thread reads it: stopped first, below
  if (st.ok()) {
    a.grpc = *grpc_addr;
    if (o->routed) {
      link =
          std::make_unique<RouterLink>(*flags, *o, *config, &shard, a, *numerics, &expert_metrics);
    }
    const int sig = svc.WaitForStop();
    spdlog::info("signal {}, stopping", sig);
    SetReadiness(svc.server(), "dmoe.internal.ExpertControl", false);
    if (link != nullptr) link->Leave();
  }
  expert_metrics.Stop();
  link.reset();
  svc.StopGrpc();
  server.Stop();
  (*ucx)->Shutdown();
  return st.ok() ? 0 : svc.Fail(st);
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
