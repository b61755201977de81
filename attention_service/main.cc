// dmoe-attention: an attention node. Holds the non-expert weights and the paged latent KV cache,
// schedules every step (continuous batching, chunked prefill, prefix caching) and serves
// AttentionService over gRPC; routed experts run in-process or on dmoe-expert shards over UCX.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "attention_service/attention_metrics.h"
#include "attention_service/attention_node.h"
#include "attention_service/attention_server.h"
#include "attention_service/cuda_engine.h"
#include "attention_service/device_model.h"
#include "attention_service/json_constraint.h"
#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "attention_service/remote_flags.h"
#include "attention_service/scheduler.h"
#include "common/build_info.h"
#include "common/device_flags.h"
#include "common/flags.h"
#include "common/grpc_setup.h"
#include "common/huge_pages.h"
#include "common/internal_tls.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/service.h"
#include "common/status_macros.h"
#include "kernels/cpu/bf16dot.h"
#include "kernels/cpu/blas_threads.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "router/member.h"
#include "transport/wire.h"

namespace dmoe {
namespace {

constexpr char kHelp[] = R"(usage: dmoe-attention --model DIR [flags]

An attention node: serves AttentionService (Generate, Cancel, GetLoad) on gRPC.

  --model DIR             checkpoint directory (Hugging Face layout)
  --grpc-listen H:P       gRPC address (default 127.0.0.1:0 = any free port)
  --ready-file F          once serving, write {"grpc": ..., "pid": ...} to F (atomically)
  --kv-cache-mib N        KV cache size in MiB (default 256); or --kv-blocks N
  --kv-cache-dtype T      f32 (default), bf16 (each value rounded to bf16, as the reference model's
                          bf16 cache: 1152 instead of 2304 bytes per token and layer for
                          DeepSeek-V2), int8 or fp8_e4m3 (the latent part in 8 bits with a scale per
                          128 values, the rope part in bf16: 656 bytes); widened to fp32 inside the
                          attention kernel
  --block-tokens N        tokens per KV block (default 16)
  --max-running N         sequences in the running batch (default 64)
  --max-waiting N         requests waiting to run; more are refused UNAVAILABLE, and the gateway
                          tries another node (default 4096)
  --token-budget N        tokens per engine step (default 512)
  --prefill-chunk N       prompt tokens of one sequence per step (default 256)
  --micro-batches N       1 or 2 (default 2): with remote experts, two micro-batches in ping-pong
  --metrics-listen H:P    Prometheus /metrics address (default 127.0.0.1:0)
  --drain-seconds N       on SIGTERM, stop admitting and let accepted requests finish for up to
                          N seconds (default 30); those left then end UNAVAILABLE (the gateway
                          retries the ones without a token on another node)
  --drain-hand-back       on SIGTERM, end the queued requests without a token at once,
                          UNAVAILABLE, so the gateway retries them on another node instead of
                          their waiting behind the running ones. Only where other nodes stay up
                          (Kubernetes replaces one pod at a time); with none left they fail
  --max-stream-backlog-kib N  a Generate stream whose reader (the gateway, held back by a slow
                          client) leaves more than N KiB unread ends RESOURCE_EXHAUSTED and its
                          generation stops: the most the node holds per stream (default 16384)
  --advertise-host H      host others reach this node at, registered with the router in place of
                          the listen host (e.g. the pod IP; default: the listen host)
  --expert-wait-ms N      when an expert has no reachable replica, pause the affected sequences
                          (KV kept) and retry for up to N ms, then end them UNAVAILABLE
                          (default 10000 with --router, 0 otherwise)
  --speculative-tokens N  DeepSeek-V3 models: draft up to N tokens per step with the model's MTP
                          layer and verify them in the next step (default 0 = off; 1..16). The
                          output does not change (greedy: token for token; sampling: the same
                          distribution); with drafts accepted, each step yields more tokens.
                          The MTP layer's own latent cache comes on top of --kv-cache-mib (one
                          layer's worth: 1/num_hidden_layers of it, plus a few blocks)
  --bf16-activations      bf16 and fp8 weights multiply bf16-rounded activations (A16: vdpbf16ps where the
                          CPU has AVX512-BF16, about twice the batched/prefill speed; slightly less
                          exact). Every shard serving the same experts must use the same setting
  --threads N             compute threads: the kernel pool's and OpenBLAS's (default 0 = one per
                          CPU). When other dmoe processes share this machine, give each its share
                          of the CPUs (`dmoe up` does): idle pool threads spin briefly after each
                          call and OpenBLAS's ~0.1 s, taking the CPUs the others need
                          (--blas-threads N: the same, its former name)
%s%s%s%s)";

struct Options {
  std::string model;
  std::map<std::string, int64_t> v;  // the integer flags
  cpu::KvDType kv_dtype = cpu::KvDType::kF32;
};

absl::StatusOr<Options> ParseOptions(const Flags& f) {
  Options o;
  ASSIGN_OR_RETURN(o.model, f.String("model"));
  // Name, default, largest (far beyond any machine: a typo is an error naming the flag, not an
  // overflowed size or an allocation that fails).
  struct IntFlag {
    const char* name;
    int64_t dflt, max;
  };
  const IntFlag ints[] = {{"kv-cache-mib", 256, int64_t{1} << 30},
                          {"kv-blocks", 0, (int64_t{1} << 31) - 1},
                          {"block-tokens", 16, 4096},
                          {"max-running", 64, int64_t{1} << 20},
                          {"max-waiting", 4096, int64_t{1} << 24},
                          {"token-budget", 512, int64_t{1} << 24},
                          {"prefill-chunk", 256, int64_t{1} << 24},
                          {"micro-batches", 2, 2},
                          {"drain-seconds", 30, 86400},
                          {"max-stream-backlog-kib", 16384, int64_t{1} << 22},
                          {"speculative-tokens", 0, 16}};
  for (const IntFlag& i : ints) {
    ASSIGN_OR_RETURN(int64_t x, f.Int(i.name, i.dflt));
    const bool zero_ok =
        std::string(i.name) == "kv-blocks" || std::string(i.name) == "speculative-tokens";
    if (x < 0 || (x == 0 && !zero_ok)) {
      return absl::InvalidArgumentError(absl::StrCat("--", i.name, ": must be positive"));
    }
    if (x > i.max) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", i.name, ": ", x, " is over the limit of ", i.max));
    }
    o.v[i.name] = x;
  }
  const std::string kv = f.StringOr("kv-cache-dtype", "f32");
  if (!ParseKvDType(kv, &o.kv_dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-cache-dtype: \"", kv, "\" is not f32, bf16, int8 or fp8_e4m3"));
  }
  return o;
}

KvCacheOptions CacheOptions(const Options& o) {
  KvCacheOptions k;
  k.mib = o.v.at("kv-cache-mib");
  k.blocks = o.v.at("kv-blocks");
  k.block_tokens = o.v.at("block-tokens");
  k.dtype = o.kv_dtype;
  return k;
}

absl::StatusOr<SchedulerOptions> MakeSchedulerOptions(const Flags& f, const Options& o,
                                                      LocalModel* model, bool gpu) {
  SchedulerOptions so;
  so.max_running = o.v.at("max-running");
  so.max_waiting = o.v.at("max-waiting");
  so.step_token_budget = o.v.at("token-budget");
  so.prefill_chunk = o.v.at("prefill-chunk");
  RETURN_IF_ERROR(CheckSpeculativeTokens(model->config(), o.v.at("speculative-tokens")));
  so.speculative_tokens = o.v.at("speculative-tokens");
  // The GPU engine has no ping-pong of its own yet: one batch per step there.
  if (o.v.at("micro-batches") == 2 && !gpu) so.experts_b = model->second_experts();
  ExpertShardSet* shard_set = model->shard_set();
  const bool routed = shard_set != nullptr && shard_set->member() != nullptr;
  ASSIGN_OR_RETURN(int64_t expert_wait, f.Int("expert-wait-ms", routed ? 10000 : 0));
  if (expert_wait < 0) return absl::InvalidArgumentError("--expert-wait-ms: negative");
  so.expert_wait = std::chrono::milliseconds(expert_wait);
  if (shard_set != nullptr) so.between_steps = [shard_set] { shard_set->SwitchIfChanged(); };
  return so;
}

// The node over the CPU engine and a host cache, or over the GPU engine and its device pool
// (sized by the same flags).
absl::StatusOr<std::unique_ptr<AttentionNode>> MakeNode(DeviceModel* dm, const Options& o,
                                                        const SchedulerOptions& so,
                                                        AttentionMetrics* metrics) {
  if (CudaEngine* gpu = dm->gpu()) {
    return AttentionNode::Create(&dm->model(), gpu, &gpu->cache(), so, metrics);
  }
  ASSIGN_OR_RETURN(auto cache, MakeKvCache(dm->model().config(), CacheOptions(o)));
  return AttentionNode::Create(&dm->model(), std::move(cache), so, metrics);
}

// --device / --gpu, refused with what the GPU engine does not run yet (before anything loads).
absl::StatusOr<DeviceChoice> ParseDeviceFlags(const Flags& f, const Options& o) {
  ASSIGN_OR_RETURN(DeviceChoice d, ParseDevice(f));
  if (d.cuda && o.v.at("speculative-tokens") > 0) {
    return absl::InvalidArgumentError("--speculative-tokens: not with --device cuda yet");
  }
  if (d.cuda && o.v.at("micro-batches") == 2) {
    spdlog::info("--device cuda: one micro-batch per step (no ping-pong on the GPU yet)");
  }
  return d;
}

// The GPU engine's KV pool: --kv-blocks, or as many blocks as fit in --kv-cache-mib.
absl::StatusOr<CudaEngineOptions> GpuPool(const ModelConfig& c, const Options& o) {
  CudaEngineOptions g;
  const KvCacheOptions k = CacheOptions(o);
  g.block_tokens = k.block_tokens;
  g.kv_dtype = k.dtype;
  g.kv_blocks = k.blocks > 0 ? k.blocks
                             : LatentKvCache::BlocksForBytes(
                                   c, k.block_tokens, static_cast<uint64_t>(k.mib) << 20, k.dtype);
  if (g.kv_blocks <= 0)
    return absl::InvalidArgumentError("--kv-cache-mib: too small for one block");
  return g;
}

// How this node computes (RegisterRequest.numerics): the held weight dtype, A16, the checkpoint's
// dtype, the device, the KV cache and wire dtypes.
absl::StatusOr<std::string> NodeNumerics(const LocalModel& model, const Options& o,
                                         const LocalModelOptions& lo, bool cuda) {
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ck, Checkpoint::Open(o.model));
  ASSIGN_OR_RETURN(TensorInfo t, ck->Info(weight_names::Layer(0, "self_attn.o_proj.weight")));
  const char* held = cpu::WeightFormatName(model.dense().layers.back().o.format);
  const bool bf16_wire = lo.shard_client.remote.dtype == wire::WireDType::kBF16;
  return absl::StrCat(
      NumericsString("weights", held, cpu::Bf16ActivationsA16(), t.dtype, cuda ? "cuda" : "cpu"),
      " kv=", cpu::KvDTypeName(o.kv_dtype), " wire=", bf16_wire ? "bf16" : "f32");
}

// With the router: registers this node with how it computes, so that the router refuses attention
// nodes that would give a request other bits than this one. The id is unique per host and process
// (in a pod the process is often PID 1).
void Register(const Flags& f, const LocalModel& model, ExpertShardSet* shard_set,
              const std::string& numerics, const std::string& addr) {
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) host[0] = '\0';
  internal::RegisterRequest reg;
  reg.set_node_id(absl::StrCat("attention-", host[0] ? host : "host", "-", getpid()));
  reg.set_role(internal::ATTENTION);
  reg.set_grpc_address(router::AdvertisedAddress(addr, f.StringOr("advertise-host", "")));
  reg.set_model_fingerprint(ModelFingerprint(model.config()));
  reg.set_numerics(numerics);
  shard_set->member()->StartMembership(reg, nullptr, router::ExitOnRefusal);
}

// The flags that take a value.
std::set<std::string> FlagNames() {
  return WithInternalTls(WithRemote({"model",
                                     "grpc-listen",
                                     "ready-file",
                                     "kv-cache-mib",
                                     "kv-blocks",
                                     "block-tokens",
                                     "max-running",
                                     "max-waiting",
                                     "token-budget",
                                     "prefill-chunk",
                                     "micro-batches",
                                     "metrics-listen",
                                     "drain-seconds",
                                     "expert-wait-ms",
                                     "kv-cache-dtype",
                                     "advertise-host",
                                     "threads",
                                     "blas-threads",
                                     "log-level",
                                     "speculative-tokens",
                                     "device",
                                     "gpu",
                                     "max-stream-backlog-kib"}));
}

int Main(int argc, char** argv) {
  ReexecForHugePageMalloc(argv);  // common/huge_pages.h: weights and KV pool in 2 MiB pages
  ServiceMain svc("dmoe-attention");
  auto flags =
      Flags::Parse(argc - 1, argv + 1, FlagNames(), {"bf16-activations", "drain-hand-back"});
  if (!flags.ok()) return svc.Fail(flags.status());
  if (flags->version()) return PrintVersion(svc.name());
  if (flags->help()) {
    std::printf(kHelp, DeviceHelp(26).c_str(), kLogLevelHelp, kRemoteHelp, kInternalTlsHelp);
    return 0;
  }
  if (auto s = svc.SetLogLevel(*flags); !s.ok()) return svc.Fail(s);
  if (auto s = SetInternalTlsFromFlags(*flags); !s.ok()) return svc.Fail(s);
  auto o = ParseOptions(*flags);
  if (!o.ok()) return svc.Fail(o.status());
  auto blas = ComputeThreads(*flags);
  if (!blas.ok()) return svc.Fail(blas.status());
  if (auto st = cpu::SetBlasThreads(*blas, flags->Has("threads") ? "--threads" : "--blas-threads");
      !st.ok()) {
    return svc.Fail(st);
  }
  cpu::SetBf16Activations(flags->Bool("bf16-activations"));
  LocalModelOptions lo;
  lo.log_progress = true;
  if (auto st = RemoteOptions(*flags, &lo); !st.ok()) return svc.Fail(st);
  auto config = LoadModelConfig(o->model);
  if (!config.ok()) return svc.Fail(config.status());
  auto device = ParseDeviceFlags(*flags, *o);
  auto pool = GpuPool(*config, *o);
  if (!device.ok() || !pool.ok()) return svc.Fail(!device.ok() ? device.status() : pool.status());
  Metrics metrics;
  auto metrics_addr = metrics.Serve(flags->StringOr("metrics-listen", "127.0.0.1:0"));
  if (!metrics_addr.ok()) return svc.Fail(metrics_addr.status());
  AttentionMetrics attention_metrics(&metrics, *config);
  lo.shard_client.remote.observer = attention_metrics.RoundTrips();
  auto dm = DeviceModel::Load(o->model, lo, *device, *pool);
  if (!dm.ok()) return svc.Fail(dm.status());
  LocalModel* model = &(*dm)->model();
  auto so = MakeSchedulerOptions(*flags, *o, model, device->cuda);
  if (!so.ok()) return svc.Fail(so.status());
  // JSON mode checks tokens against their text: the checkpoint's tokenizer, if it has one.
  absl::StatusOr<std::vector<std::string>> token_texts =
      TokenTextsFromDir(o->model, model->config().vocab_size);
  if (token_texts.ok()) {
    so->token_bytes = &*token_texts;
  } else {
    spdlog::warn("JSON mode (response_format json_object) is off: {}",
                 token_texts.status().ToString());
  }
  ExpertShardSet* shard_set = model->shard_set();
  const bool routed = shard_set != nullptr && shard_set->member() != nullptr;
  if (shard_set != nullptr) attention_metrics.SetShardSet(shard_set);
  // Only the router compares it.
  absl::StatusOr<std::string> numerics =
      routed ? NodeNumerics(*model, *o, lo, device->cuda) : std::string();
  if (!numerics.ok()) return svc.Fail(numerics.status());
  auto made = MakeNode(dm->get(), *o, *so, &attention_metrics);
  if (!made.ok()) return svc.Fail(made.status());
  AttentionNode& node = **made;
  node.service()->SetClusterToken(lo.shard_client.cluster_token);
  node.service()->SetMaxStreamBacklog(static_cast<size_t>(o->v.at("max-stream-backlog-kib")) << 10);
  node.Start();
  auto addr = svc.Serve(*flags, {node.service()}, "dmoe.internal.AttentionService", *metrics_addr,
                        nlohmann::json::object(), true, InternalServerCredentials());
  const absl::Status st = addr.status();
  if (st.ok()) {
    if (routed) Register(*flags, *model, shard_set, *numerics, *addr);
    const int sig = svc.WaitForStop();
    spdlog::info("signal {}, draining", sig);
    SetReadiness(svc.server(), "dmoe.internal.AttentionService", false);
    node.Drain(std::chrono::seconds(o->v.at("drain-seconds")), flags->Bool("drain-hand-back"));
    spdlog::info("stopping");
  }
  svc.StopGrpc();
  node.Stop();
  return st.ok() ? 0 : svc.Fail(st);
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
