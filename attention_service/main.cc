// dmoe-attention: an attention node. Holds the non-expert weights and the paged latent KV cache,
// schedules every step (continuous batching, chunked prefill, prefix caching) and serves
// AttentionService over gRPC; routed experts run in-process or on dmoe-expert shards over UCX.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "attention_service/attention_metrics.h"
#include "attention_service/attention_server.h"
#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "attention_service/scheduler.h"
#include "common/flags.h"
#include "attention_service/remote_flags.h"
#include "common/grpc_setup.h"
#include "common/metrics.h"
#include "kernels/cpu/blas_threads.h"
#include "router/member.h"

namespace dmoe {
namespace {

constexpr char kHelp[] = R"(usage: dmoe-attention --model DIR [flags]

An attention node: serves AttentionService (Generate, Cancel, GetLoad) on gRPC.

  --model DIR             checkpoint directory (Hugging Face layout)
  --grpc-listen H:P       gRPC address (default 127.0.0.1:0 = any free port)
  --ready-file F          once serving, write {"grpc": ..., "pid": ...} to F (atomically)
  --kv-cache-mib N        KV cache size in MiB (default 256); or --kv-blocks N
  --kv-cache-dtype T      f32 (default), int8 or fp8_e4m3: the latent part in 8 bits with a scale
                          per 128 values, the rope part in bf16 (656 instead of 2304 bytes per token
                          and layer for DeepSeek-V2), dequantized inside the attention kernel
  --block-tokens N        tokens per KV block (default 16)
  --max-running N         sequences in the running batch (default 64)
  --token-budget N        tokens per engine step (default 512)
  --prefill-chunk N       prompt tokens of one sequence per step (default 256)
  --micro-batches N       1 or 2 (default 2): with remote experts, two micro-batches in ping-pong
  --metrics-listen H:P    Prometheus /metrics address (default 127.0.0.1:0)
  --drain-seconds N       on SIGTERM, stop admitting and let running requests finish for up to N
                          seconds (default 30)
  --advertise-host H      host others reach this node at, registered with the router in place of
                          the listen host (e.g. the pod IP; default: the listen host)
  --expert-wait-ms N      when an expert has no reachable replica, pause the affected sequences
                          (KV kept) and retry for up to N ms, then end them UNAVAILABLE
                          (default 10000 with --router, 0 otherwise)
  --blas-threads N        OpenBLAS threads (default 0 = OpenBLAS's default, one per CPU). When
                          other dmoe processes share this machine, give each its share of the CPUs
                          (`dmoe up` does): OpenBLAS's idle threads spin ~0.1 s after each call
                          and take the CPUs the others need
%s)";

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dmoe-attention: error: %s\n", std::string(s.message()).c_str());
  return 2;
}

int Main(int argc, char** argv) {
  auto flags = Flags::Parse(
      argc - 1, argv + 1,
      WithRemote({"model", "grpc-listen", "ready-file", "kv-cache-mib", "kv-blocks",
                       "block-tokens", "max-running", "token-budget", "prefill-chunk",
                       "micro-batches", "metrics-listen", "drain-seconds", "expert-wait-ms",
                       "kv-cache-dtype", "advertise-host", "blas-threads"}),
      {});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::printf(kHelp, kRemoteHelp);
    return 0;
  }
  auto dir = flags->String("model");
  if (!dir.ok()) return Fail(dir.status());
  auto blas = flags->Int("blas-threads", 0);
  if (!blas.ok()) return Fail(blas.status());
  if (auto st = cpu::SetBlasThreads(*blas); !st.ok()) return Fail(st);
  LocalModelOptions o;
  o.log_progress = true;
  if (auto st = RemoteOptions(*flags, &o); !st.ok()) return Fail(st);
  auto ints = std::vector<std::pair<const char*, int64_t>>{
      {"kv-cache-mib", 256}, {"kv-blocks", 0},       {"block-tokens", 16}, {"max-running", 64},
      {"token-budget", 512}, {"prefill-chunk", 256}, {"micro-batches", 2}, {"drain-seconds", 30}};
  std::map<std::string, int64_t> v;
  for (const auto& [name, dflt] : ints) {
    auto x = flags->Int(name, dflt);
    if (!x.ok()) return Fail(x.status());
    if (*x < 0 || (*x == 0 && std::string(name) != "kv-blocks")) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--", name, ": must be positive")));
    }
    v[name] = *x;
  }
  auto config = LoadModelConfig(*dir);
  if (!config.ok()) return Fail(config.status());
  Metrics metrics;
  auto metrics_addr = metrics.Serve(flags->StringOr("metrics-listen", "127.0.0.1:0"));
  if (!metrics_addr.ok()) return Fail(metrics_addr.status());
  AttentionMetrics attention_metrics(&metrics, *config);
  o.shard_client.remote.observer = attention_metrics.RoundTrips();
  auto model = LocalModel::Load(*dir, o);
  if (!model.ok()) return Fail(model.status());
  const ModelConfig& c = (*model)->config();
  cpu::KvDType kv_dtype = cpu::KvDType::kF32;
  if (!ParseKvDType(flags->StringOr("kv-cache-dtype", "f32"), &kv_dtype)) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--kv-cache-dtype: \"",
                                                        flags->StringOr("kv-cache-dtype", ""),
                                                        "\" is not f32, int8 or fp8_e4m3")));
  }
  const int64_t blocks =
      v["kv-blocks"] > 0
          ? v["kv-blocks"]
          : LatentKvCache::BlocksForBytes(c, v["block-tokens"], v["kv-cache-mib"] << 20, kv_dtype);
  if (blocks <= 0)
    return Fail(absl::InvalidArgumentError("--kv-cache-mib: too small for one block"));
  LatentKvCache cache(c, v["block-tokens"], blocks, kv_dtype);
  std::fprintf(
      stderr,
      "dmoe-attention: KV cache (%s) %lld blocks x %lld tokens, %.1f MiB, %llu bytes/token\n",
      cpu::KvDTypeName(kv_dtype), static_cast<long long>(blocks),
      static_cast<long long>(v["block-tokens"]),
      static_cast<double>(blocks * cache.block_bytes()) / (1 << 20),
      static_cast<unsigned long long>(cache.bytes_per_token()));
  SchedulerOptions so;
  so.max_running = v["max-running"];
  so.step_token_budget = v["token-budget"];
  so.prefill_chunk = v["prefill-chunk"];
  if (v["micro-batches"] > 2) return Fail(absl::InvalidArgumentError("--micro-batches: 1 or 2"));
  if (v["micro-batches"] == 2) so.experts_b = (*model)->second_experts();
  ExpertShardSet* shard_set = (*model)->shard_set();
  const bool routed = shard_set != nullptr && shard_set->member() != nullptr;
  auto expert_wait = flags->Int("expert-wait-ms", routed ? 10000 : 0);
  if (!expert_wait.ok()) return Fail(expert_wait.status());
  if (*expert_wait < 0) return Fail(absl::InvalidArgumentError("--expert-wait-ms: negative"));
  so.expert_wait = std::chrono::milliseconds(*expert_wait);
  if (routed) {
    so.between_steps = [shard_set] { shard_set->SwitchIfChanged(); };
    attention_metrics.SetShardSet(shard_set);
  }
  Scheduler scheduler(&(*model)->engine(), &cache, so);

  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  SchedulerLoop loop(&scheduler);
  loop.Start();
  attention_metrics.Start(&scheduler, &(*model)->engine());
  AttentionServiceImpl service(&scheduler, &attention_metrics);
  EnableHealthAndReflection();
  grpc::ServerBuilder builder;
  int port = 0;
  const std::string listen = flags->StringOr("grpc-listen", "127.0.0.1:0");
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail(absl::UnavailableError(absl::StrCat("--grpc-listen: cannot listen on ", listen)));
  }
  SetReadiness(server.get(), "dmoe.internal.AttentionService", true);
  const std::string addr = absl::StrCat(listen.substr(0, listen.rfind(':')), ":", port);
  std::fprintf(stderr, "dmoe-attention: serving on %s, metrics on http://%s/metrics\n",
               addr.c_str(), metrics_addr->c_str());
  if (flags->Has("ready-file")) {
    const std::string path = flags->StringOr("ready-file", "");
    {
      std::ofstream out(path + ".tmp");
      out << "{\"grpc\": \"" << addr << "\", \"metrics\": \"" << *metrics_addr
          << "\", \"pid\": " << getpid() << "}\n";
    }
    if (std::rename((path + ".tmp").c_str(), path.c_str()) != 0) {
      return Fail(absl::InternalError(absl::StrCat("--ready-file: cannot write ", path)));
    }
  }
  if (routed) {
    internal::RegisterRequest reg;
    reg.set_node_id(absl::StrCat("attention-", getpid()));
    reg.set_role(internal::ATTENTION);
    reg.set_grpc_address(router::AdvertisedAddress(addr, flags->StringOr("advertise-host", "")));
    shard_set->member()->StartMembership(reg, nullptr);
  }
  int sig = 0;
  sigwait(&stop, &sig);
  // Graceful: admit nothing new (new requests get UNAVAILABLE and the gateway retries them on
  // another node), let the accepted ones finish within the grace period, then stop.
  std::fprintf(stderr, "dmoe-attention: signal %d, draining\n", sig);
  SetReadiness(server.get(), "dmoe.internal.AttentionService", false);
  scheduler.Drain();
  const auto grace = std::chrono::steady_clock::now() + std::chrono::seconds(v["drain-seconds"]);
  while (std::chrono::steady_clock::now() < grace) {
    const SchedulerLoad load = scheduler.load();
    if (load.running == 0 && load.waiting == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::fprintf(stderr, "dmoe-attention: stopping\n");
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  loop.Stop();
  attention_metrics.Stop();
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
