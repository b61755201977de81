// dmoe-gateway: the public API (dmoe.v1.Dmoe) in front of the attention nodes.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/build_info.h"
#include "common/cluster_token.h"
#include "common/flags.h"
#include "common/grpc_setup.h"
#include "common/internal_tls.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/service.h"
#include "common/status_macros.h"
#include "gateway/gateway_metrics.h"
#include "gateway/gateway_service.h"
#include "gateway/http_front.h"
#include "gateway/node_pool.h"
#include "model/config.h"
#include "model/tokenizer.h"
#include "router/member.h"

namespace dmoe::gateway {
namespace {

constexpr char kHelp[] = R"(usage: dmoe-gateway (--attention LIST | --router H:P) [flags]

The public gRPC API of dmoe (dmoe.v1.Dmoe: Generate, Chat, Tokenize, Detokenize, ListModels, plus
grpc.health.v1 and server reflection) and an OpenAI-compatible HTTP API (POST /v1/chat/completions,
/v1/completions; GET /v1/models, /health, /version), balancing over attention nodes by their
reported load. Both take the same API keys, limits and retries.

  --attention LIST          comma-separated gRPC addresses of dmoe-attention nodes
  --router H:P              also (or only) the attention nodes registered with dmoe-router, looked
                            up every second (at start, waits up to 10 s for one that answers)
  --cluster-token-file F    the cluster token (first line of F): sent to the router and with
                            every call to the attention nodes, which refuse calls without it
  --model DIR               checkpoint directory: config.json (model limits) and, if present,
                            tokenizer.json for text prompts and Chat, and the chat template
                            (tokenizer_config.json's chat_template, or chat_template.jinja;
                            without one, DeepSeek-V2-Chat's "User: ...\n\nAssistant:" format)
  --tokenizer PATH          tokenizer.json (overrides DIR/tokenizer.json)
  --reasoning-parser P      deepseek-r1: a chat answer's thinking, up to "</think>", goes to
                            message.reasoning_content (delta.reasoning_content when streaming), the
                            rest to content, as vLLM's deepseek_r1 parser; none (default): all
                            of it is content
  --chat-template F         a Jinja chat template file used instead of the checkpoint's (with its
                            bos/eos), e.g. the image's /usr/local/share/dmoe/chat_templates/
                            deepseek_v3_tools.jinja (deploy/chat_templates/ in the source), which
                            also renders the request's tools for DeepSeek-V3/R1
  --tool-call-parser P      deepseek_v3: chat requests with tools get the model's tool calls as
                            message.tool_calls (streamed as delta.tool_calls; finish_reason
                            "tool_calls"), as vLLM's deepseek_v3 parser; tool_choice "required"
                            or a named function starts the answer inside a call. Needs a chat
                            template that renders tools (--chat-template). none (default): tools
                            only with tool_choice "none"
  --generation-config M     defaults of the OpenAI API's sampling fields a request omits: auto
                            (default: DIR/generation_config.json's temperature, top_p, top_k,
                            min_p and repetition_penalty, as vLLM does), or none (OpenAI's:
                            temperature 1, top_p 1)
  --model-id NAME[,ALIAS...]  the model's name in the API (default: dmoe), and other names it
                            answers to (e.g. deepseek-ai/DeepSeek-V3, as client scripts write)
  --grpc-listen H:P         address (default 127.0.0.1:0)
  --http-listen H:P         the OpenAI-compatible HTTP API's address (default 127.0.0.1:0; "off":
                            none)
  --http-threads N          HTTP event-loop threads (default 1; each serves many connections)
  --node-keepalive-ms N     ping attention nodes this often while streams are open; a node that
                            does not answer for as long is dropped and its streams end
                            UNAVAILABLE (default 10000; 1000-600000)
  --cors-origin ORIGIN      let browser pages from ORIGIN ("https://ui.example.com", or "*" for
                            any) call the HTTP API: preflight OPTIONS answered, CORS headers set
                            (default: none)
  --max-stream-backlog-kib N  a gRPC stream whose client leaves more than N KiB unread ends
                            RESOURCE_EXHAUSTED, its generation cancelled (default 16384; 1-4194304)
  --drain-seconds N         on SIGTERM: readiness off, no new requests or connections, and those
                            in progress finish for up to N s (then they are cut; default 30,
                            0-86400; give Kubernetes a terminationGracePeriodSeconds above it)
  --ready-file F            once serving, write {"grpc": ..., "http": ..., "pid": ...} to F
  --api-keys FILE           require "authorization: Bearer KEY"; FILE has one KEY [LIMIT] per line
  --max-concurrent-per-key N  default per-key limit of requests in flight (default 64)
  --tls-cert PEM --tls-key PEM  serve TLS instead of plaintext (gRPC and HTTPS)
  --metrics-listen H:P      Prometheus /metrics address (default 127.0.0.1:0); the HTTP API's
                            port answers GET /metrics too (as vLLM's)
%s%s)";

absl::StatusOr<std::string> Slurp(const std::string& flag, const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--", flag, ": cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// What the gateway serves with, loaded from its flags before it starts.
struct Setup {
  GatewayOptions o;
  std::vector<std::string> nodes;  // --attention
  std::string cluster_token;
  std::chrono::milliseconds keepalive{10000};  // --node-keepalive-ms
  std::chrono::seconds drain{30};              // --drain-seconds
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<ChatTemplate> chat;
  std::unique_ptr<ApiKeys> keys = std::make_unique<ApiKeys>();
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  HttpFrontOptions http;
};

// --model (limits, chat template) and --tokenizer.
absl::Status LoadModelParts(const Flags& f, Setup* s) {
  std::string tok_path = f.StringOr("tokenizer", "");
  if (f.Has("model")) {
    const std::string dir = f.StringOr("model", "");
    ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
    ASSIGN_OR_RETURN(ChatTemplate tmpl, ChatTemplate::LoadFromModelDir(dir));
    s->chat = std::make_unique<ChatTemplate>(std::move(tmpl));
    s->o.chat_template = s->chat.get();
    if (s->chat->is_builtin_default()) {
      spdlog::info("no chat template in {}: Chat uses the DeepSeek-V2-Chat format", dir);
    } else {
      spdlog::info("chat template of {}", dir);
    }
    s->o.vocab_size = config.vocab_size;
    s->o.max_position_embeddings = config.max_position_embeddings;
    RETURN_IF_ERROR(s->o.SetSamplingDefaults(f.StringOr("generation-config", "auto"),
                                             config.sampling_defaults));
    if (tok_path.empty() && std::ifstream(dir + "/tokenizer.json")) {
      tok_path = dir + "/tokenizer.json";
    }
  }
  RETURN_IF_ERROR(s->o.SetReasoningParser(f.StringOr("reasoning-parser", "none")));
  RETURN_IF_ERROR(s->o.SetToolCallParser(f.StringOr("tool-call-parser", "none")));
  if (f.Has("chat-template")) {
    const ChatTemplate base = s->chat != nullptr ? *s->chat : ChatTemplate::BuiltinDefault();
    auto tmpl = base.WithTemplateFile(f.StringOr("chat-template", ""));
    if (!tmpl.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--chat-template: ", tmpl.status().message()));
    }
    s->chat = std::make_unique<ChatTemplate>(*std::move(tmpl));
    s->o.chat_template = s->chat.get();
    spdlog::info("chat template {}", f.StringOr("chat-template", ""));
  }
  if (!tok_path.empty()) {
    ASSIGN_OR_RETURN(s->tok, Tokenizer::FromFile(tok_path));
    s->o.tokenizer = s->tok.get();
    spdlog::info("tokenizer {} ({} tokens)", tok_path, s->tok->vocab_size());
  }
  return absl::OkStatus();
}

absl::StatusOr<Setup> LoadSetup(const Flags& f) {
  Setup s;
  if (!f.Has("attention") && !f.Has("router")) {
    return absl::InvalidArgumentError("--attention or --router: give at least one");
  }
  s.nodes = absl::StrSplit(f.StringOr("attention", ""), ',', absl::SkipEmpty());
  if (f.Has("attention") && s.nodes.empty()) {
    return absl::InvalidArgumentError("--attention: no address");
  }
  if (f.Has("cluster-token-file")) {
    ASSIGN_OR_RETURN(s.cluster_token, ReadClusterTokenFile(f.StringOr("cluster-token-file", "")));
  }
  RETURN_IF_ERROR(s.o.SetModelNames(f.StringOr("model-id", "dmoe")));
  RETURN_IF_ERROR(LoadModelParts(f, &s));
  ASSIGN_OR_RETURN(int64_t limit, f.Int("max-concurrent-per-key", 64));
  if (f.Has("api-keys")) {
    ASSIGN_OR_RETURN(s.keys, ApiKeys::Load(f.StringOr("api-keys", ""), limit));
  }
  if (f.Has("tls-cert") || f.Has("tls-key")) {
    ASSIGN_OR_RETURN(std::string cert, Slurp("tls-cert", f.StringOr("tls-cert", "")));
    ASSIGN_OR_RETURN(std::string key, Slurp("tls-key", f.StringOr("tls-key", "")));
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({key, cert});
    s.creds = grpc::SslServerCredentials(ssl);
    s.http.tls_cert_pem = cert;
    s.http.tls_key_pem = key;
  }
  s.http.listen = f.StringOr("http-listen", "127.0.0.1:0");
  ASSIGN_OR_RETURN(int64_t threads, f.Int("http-threads", 1));
  if (threads < 1 || threads > 64) {
    return absl::InvalidArgumentError("--http-threads: must be in [1, 64]");
  }
  s.http.threads = static_cast<int>(threads);
  ASSIGN_OR_RETURN(int64_t keepalive, f.Int("node-keepalive-ms", 10000));
  if (keepalive < 1000 || keepalive > 600000) {
    return absl::InvalidArgumentError("--node-keepalive-ms: must be in [1000, 600000]");
  }
  s.keepalive = std::chrono::milliseconds(keepalive);
  ASSIGN_OR_RETURN(int64_t backlog, f.Int("max-stream-backlog-kib", 16384));
  if (backlog < 1 || backlog > (int64_t{1} << 22)) {
    return absl::InvalidArgumentError("--max-stream-backlog-kib: must be in [1, 4194304]");
  }
  s.o.max_stream_backlog_bytes = static_cast<size_t>(backlog) << 10;
  ASSIGN_OR_RETURN(int64_t drain, f.Int("drain-seconds", 30));
  if (drain < 0 || drain > 86400) {
    return absl::InvalidArgumentError("--drain-seconds: must be in [0, 86400]");
  }
  s.drain = std::chrono::seconds(drain);
  s.http.cors_origin = f.StringOr("cors-origin", "");
  if (f.Has("cors-origin")) RETURN_IF_ERROR(gateway::CheckCorsOrigin(s.http.cors_origin));
  s.http.version = "dmoe-gateway (OpenAI-compatible API v1)";
  return s;
}

// Keeps the pool's node list (from the router, every second), the node gauges and the server's
// readiness (ready while an attention node is healthy) current, on its own thread.
class PoolWatcher {
 public:
  PoolWatcher(NodePool* pool, Metrics* metrics, GatewayMetricSet* set, const Flags& f,
              const std::string& cluster_token)
      : pool_(pool),
        set_(set),
        known_(metrics->Gauge("dmoe_gateway_attention_nodes", "Attention nodes known",
                              {{"state", "known"}})),
        healthy_(metrics->Gauge("dmoe_gateway_attention_nodes", "Attention nodes known",
                                {{"state", "healthy"}})) {
    if (!f.Has("router")) return;
    router::MemberOptions mo;
    mo.router_address = f.StringOr("router", "");
    mo.cluster_token = cluster_token;
    member_ = std::make_unique<router::RouterMember>(mo);
    // Serve once an attention node answers (it is polled every 50 ms once known), so that the
    // first request does not find an empty pool.
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    do {
      Discover();
      if (pool_->healthy() > 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    } while (std::chrono::steady_clock::now() < until);
    if (pool_->healthy() == 0) spdlog::warn("no attention node answers yet; serving anyway");
  }
  ~PoolWatcher() { Stop(); }
  void Stop() {
    done_ = true;
    if (thread_.joinable()) thread_.join();
  }
  void Start() {
    thread_ = std::thread([this] { Run(); });
  }
  void SetServer(grpc::Server* s) { server_ = s; }

 private:
  void Discover() {
    auto listed = member_->ListNodes();
    if (!listed.ok()) return;
    std::set<std::string> addresses;
    for (const auto& n : listed->nodes()) {
      if (n.role() != internal::ATTENTION) continue;
      addresses.insert(n.grpc_address());
      if (pool_->Add(n.grpc_address())) {
        spdlog::info("attention node {} at {} (from the router)", n.node_id(), n.grpc_address());
      }
    }
    if (const int gone = pool_->Retire(addresses); gone > 0) {
      spdlog::info(
          "{} attention node(s) no longer listed by the router and not answering: "
          "no longer polled",
          gone);
    }
  }
  void Run() {
    int last_ready = -1;
    for (int tick = 0; !done_; ++tick) {
      if (member_ != nullptr && tick % 10 == 0) Discover();
      known_.Set(static_cast<double>(pool_->size()));
      healthy_.Set(static_cast<double>(pool_->healthy()));
      set_->Refresh(*pool_);
      const int ready = pool_->healthy() > 0 ? 1 : 0;
      if (grpc::Server* s = server_.load(); s != nullptr && ready != last_ready) {
        SetReadiness(s, "dmoe.v1.Dmoe", ready == 1);
        last_ready = ready;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  NodePool* pool_;
  GatewayMetricSet* set_;
  prometheus::Gauge& known_;
  prometheus::Gauge& healthy_;
  std::unique_ptr<router::RouterMember> member_;
  std::atomic<bool> done_{false};
  std::atomic<grpc::Server*> server_{nullptr};
  std::thread thread_;
};

int Main(int argc, char** argv) {
  ServiceMain svc("dmoe-gateway");
  auto flags = Flags::Parse(argc - 1, argv + 1,
                            WithInternalTls({"attention",          "router",
                                             "cluster-token-file", "model",
                                             "tokenizer",          "model-id",
                                             "generation-config",  "reasoning-parser",
                                             "chat-template",      "tool-call-parser",
                                             "grpc-listen",        "ready-file",
                                             "api-keys",           "max-concurrent-per-key",
                                             "tls-cert",           "tls-key",
                                             "metrics-listen",     "log-level",
                                             "http-listen",        "http-threads",
                                             "cors-origin",        "node-keepalive-ms",
                                             "drain-seconds",      "max-stream-backlog-kib"}),
                            {});
  if (!flags.ok()) return svc.Fail(flags.status());
  if (flags->version()) return PrintVersion(svc.name());
  if (flags->help()) {
    std::printf(kHelp, kLogLevelHelp, kInternalTlsHelp);
    return 0;
  }
  if (auto s = svc.SetLogLevel(*flags); !s.ok()) return svc.Fail(s);
  if (auto s = SetInternalTlsFromFlags(*flags); !s.ok()) return svc.Fail(s);
  auto setup = LoadSetup(*flags);
  if (!setup.ok()) return svc.Fail(setup.status());
  Metrics metrics;
  auto metrics_addr = metrics.Serve(flags->StringOr("metrics-listen", "127.0.0.1:0"));
  if (!metrics_addr.ok()) return svc.Fail(metrics_addr.status());
  HttpFrontOptions http = setup->http;
  GatewayMetricSet metric_set(&metrics, setup->o.model_id, &setup->o, &http.metrics);
  NodePool pool(setup->nodes, std::chrono::milliseconds(50), setup->cluster_token,
                setup->keepalive);
  PoolWatcher watcher(&pool, &metrics, &metric_set, *flags, setup->cluster_token);
  watcher.Start();
  GatewayService service(&pool, setup->keys.get(), setup->o);
  http.ready = [&pool] { return pool.healthy() > 0; };
  http.metrics_text = [&metrics] { return metrics.Text(); };
  HttpFront front(&service, http);
  nlohmann::json extra = nlohmann::json::object();
  absl::Status st;
  if (http.listen != "off") {
    auto http_addr = front.Start();
    st = http_addr.status();
    if (st.ok()) {
      extra["http"] = *http_addr;
      spdlog::info("OpenAI-compatible API on http{}://{}/v1", http.tls_cert_pem.empty() ? "" : "s",
                   *http_addr);
    }
  }
  // Ready while at least one attention node is healthy (the watcher keeps it current).
  if (st.ok()) {
    auto addr = svc.Serve(*flags, {&service}, "dmoe.v1.Dmoe", *metrics_addr, extra,
                          pool.healthy() > 0, setup->creds);
    st = addr.status();
  }
  if (st.ok()) {
    watcher.SetServer(svc.server());
    spdlog::info("over {} attention node(s)", pool.size());
    const int sig = svc.WaitForStop();
    spdlog::info("signal {}: draining, up to {} s (--drain-seconds)", sig, setup->drain.count());
  }
  watcher.Stop();  // its thread sets the server's readiness: gone before the drain turns it off
  // Before the nodes' pool goes: what the drain leaves is cancelled.
  DrainAndStop(&front, &svc, st.ok() ? setup->drain : std::chrono::seconds(0));
  if (st.ok()) spdlog::info("stopped");
  return st.ok() ? 0 : svc.Fail(st);
}

}  // namespace
}  // namespace dmoe::gateway

int main(int argc, char** argv) { return dmoe::gateway::Main(argc, argv); }
