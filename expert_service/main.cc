// dmoe-expert: an expert shard. Loads only the routed experts it is told to host, serves them on
// the UCX data plane and answers its gRPC control API.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cli/flags.h"
#include "common/grpc_setup.h"
#include "common/metrics.h"
#include "expert_service/expert_server.h"
#include "expert_service/expert_shard.h"
#include "expert_service/routed_experts.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "proto/expert_control.grpc.pb.h"
#include "transport/ucx.h"

namespace dmoe {
namespace {

constexpr char kHelp[] = R"(usage: dmoe-expert --model DIR --experts SPEC [flags]

An expert shard: hosts a subset of the routed experts of the model in DIR and serves them to
attention nodes over UCX (dispatch -> combine), with a gRPC control API (GetInfo, GetStats).
It reads no expert tensor it does not host.

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

UCX is configured through its environment (UCX_TLS, UCX_NET_DEVICES, ...). SIGTERM or SIGINT
stops the shard.
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
  ExpertMetrics(Metrics* m, const std::vector<std::pair<int64_t, int64_t>>& experts,
                uint64_t weight_bytes)
      : experts_(experts) {
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
    m->Gauge("dmoe_expert_weight_bytes", "Resident bytes of the hosted experts")
        .Set(static_cast<double>(weight_bytes));
    m->Gauge("dmoe_expert_hosted_experts", "(layer, expert) pairs hosted")
        .Set(static_cast<double>(experts.size()));
    for (const auto& [l, e] : experts) {
      per_expert_.push_back(
          &m->Counter("dmoe_expert_expert_tokens_total", "Token rows computed, per (layer, expert)",
                      {{"layer", std::to_string(l)}, {"expert", std::to_string(e)}}));
    }
  }
  ~ExpertMetrics() { Stop(); }
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
        for (size_t i = 0; i < experts_.size(); ++i) {
          Metrics::SetTotal(*per_expert_[i], static_cast<double>(shard->expert_tokens(
                                                 experts_[i].first, experts_[i].second)));
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
  std::vector<std::pair<int64_t, int64_t>> experts_;
  prometheus::Counter *messages_, *rejected_, *tokens_, *gemms_, *bytes_in_, *bytes_out_,
      *peer_errors_;
  std::vector<prometheus::Counter*> per_expert_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

class ControlService final : public internal::ExpertControl::CallbackService {
 public:
  ControlService(internal::GetInfoReply info, const ExpertShard* shard,
                 const transport::ServerTransport* transport, uint64_t weight_bytes,
                 uint64_t read_bytes)
      : info_(std::move(info)),
        shard_(shard),
        transport_(transport),
        weight_bytes_(weight_bytes),
        read_bytes_(read_bytes) {}

  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* ctx,
                                    const internal::GetInfoRequest*,
                                    internal::GetInfoReply* reply) override {
    *reply = info_;
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
    reply->set_expert_weight_bytes(weight_bytes_);
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
  uint64_t weight_bytes_, read_bytes_;
};

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dmoe-expert: error: %s\n", std::string(s.message()).c_str());
  return 2;
}

int Main(int argc, char** argv) {
  auto flags = cli::Flags::Parse(
      argc - 1, argv + 1,
      {"model", "experts", "ucx-listen", "grpc-listen", "ready-file", "node-id", "metrics-listen"},
      {});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::fputs(kHelp, stdout);
    return 0;
  }
  auto dir = flags->String("model");
  if (!dir.ok()) return Fail(dir.status());
  auto spec = flags->String("experts");
  if (!spec.ok()) return Fail(spec.status());
  auto config = LoadModelConfig(*dir);
  if (!config.ok()) return Fail(config.status());
  auto experts = ParseExpertSpec(*spec, *config);
  if (!experts.ok()) return Fail(experts.status());
  auto ck = Checkpoint::Open(*dir);
  if (!ck.ok()) return Fail(ck.status());
  const auto t0 = std::chrono::steady_clock::now();
  std::fprintf(stderr, "dmoe-expert: loading %zu experts from %s\n", experts->size(), dir->c_str());
  auto store = ExpertStore::Load(**ck, *config, *experts);
  if (!store.ok()) return Fail(store.status());
  const uint64_t bytes_read = (*ck)->bytes_read();
  std::fprintf(stderr, "dmoe-expert: loaded %.1f MiB of expert weights in %.2f s\n",
               static_cast<double>(bytes_read) / (1 << 20),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  // Unmap the checkpoint: its pages would otherwise stay in this process's resident set.
  ck->reset();

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
  ExpertShard shard(*config, store->get());
  ExpertServer server(&shard, ucx->get());
  server.Start();

  Metrics metrics;
  auto metrics_addr = metrics.Serve(flags->StringOr("metrics-listen", "127.0.0.1:0"));
  if (!metrics_addr.ok()) return Fail(metrics_addr.status());
  ExpertMetrics expert_metrics(&metrics, *experts, (*store)->bytes());
  expert_metrics.Start(&shard, ucx->get());

  internal::GetInfoReply info;
  info.set_node_id(flags->StringOr("node-id", absl::StrCat("expert-", getpid())));
  info.set_ucx_address(*ucx_addr);
  info.set_ucx_worker_address((*ucx)->WorkerAddress());
  info.set_hidden_size(static_cast<uint32_t>(config->hidden_size));
  info.set_num_hidden_layers(static_cast<uint32_t>(config->num_hidden_layers));
  info.set_n_routed_experts(static_cast<uint32_t>(config->n_routed_experts));
  for (const auto& [l, e] : *experts) {
    auto* id = info.add_experts();
    id->set_layer(static_cast<uint32_t>(l));
    id->set_expert(static_cast<uint32_t>(e));
  }
  ControlService control(info, &shard, ucx->get(), (*store)->bytes(), bytes_read);
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
  const std::string grpc_addr =
      absl::StrCat(grpc_listen.substr(0, grpc_listen.rfind(':')), ":", grpc_port);
  std::fprintf(stderr, "dmoe-expert: serving %zu experts; grpc %s, ucx %s\n", experts->size(),
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
  int sig = 0;
  sigwait(&stop, &sig);
  std::fprintf(stderr, "dmoe-expert: signal %d, stopping\n", sig);
  grpc_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  expert_metrics.Stop();
  server.Stop();
  (*ucx)->Shutdown();
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
