// dmoe-gateway: the public API (dmoe.v1.Dmoe) in front of the attention nodes.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/flags.h"
#include "common/grpc_setup.h"
#include "common/metrics.h"
#include "gateway/gateway_service.h"
#include "gateway/node_pool.h"
#include "model/config.h"
#include "model/tokenizer.h"
#include "router/member.h"

namespace dmoe::gateway {
namespace {

constexpr char kHelp[] = R"(usage: dmoe-gateway (--attention LIST | --router H:P) [flags]

The public gRPC API of dmoe (dmoe.v1.Dmoe: Generate, Chat, Tokenize, Detokenize, ListModels, plus
grpc.health.v1 and server reflection), balancing over attention nodes by their reported load.

  --attention LIST          comma-separated gRPC addresses of dmoe-attention nodes
  --router H:P              also (or only) the attention nodes registered with dmoe-router, looked
                            up every second (at start, waits up to 10 s for one that answers)
  --cluster-token-file F    the router's cluster token
  --model DIR               checkpoint directory: config.json (model limits) and, if present,
                            tokenizer.json for text prompts and Chat, and the chat template
                            (tokenizer_config.json's chat_template, or chat_template.jinja;
                            without one, DeepSeek-V2-Chat's "User: ...\n\nAssistant:" format)
  --tokenizer PATH          tokenizer.json (overrides DIR/tokenizer.json)
  --model-id NAME           the model's name in the API (default: dmoe)
  --grpc-listen H:P         address (default 127.0.0.1:0)
  --ready-file F            once serving, write {"grpc": ..., "pid": ...} to F
  --api-keys FILE           require "authorization: Bearer KEY"; FILE has one KEY [LIMIT] per line
  --max-concurrent-per-key N  default per-key limit of requests in flight (default 64)
  --tls-cert PEM --tls-key PEM  serve TLS instead of plaintext
  --metrics-listen H:P      Prometheus /metrics address (default 127.0.0.1:0)
)";

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dmoe-gateway: error: %s\n", std::string(s.message()).c_str());
  return 2;
}

absl::StatusOr<std::string> Slurp(const std::string& flag, const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--", flag, ": cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int Main(int argc, char** argv) {
  auto flags = Flags::Parse(
      argc - 1, argv + 1,
      {"attention", "router", "cluster-token-file", "model", "tokenizer", "model-id", "grpc-listen",
       "ready-file", "api-keys", "max-concurrent-per-key", "tls-cert", "tls-key", "metrics-listen"},
      {});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::fputs(kHelp, stdout);
    return 0;
  }
  if (!flags->Has("attention") && !flags->Has("router")) {
    return Fail(absl::InvalidArgumentError("--attention or --router: give at least one"));
  }
  std::vector<std::string> nodes =
      absl::StrSplit(flags->StringOr("attention", ""), ',', absl::SkipEmpty());
  if (flags->Has("attention") && nodes.empty()) {
    return Fail(absl::InvalidArgumentError("--attention: no address"));
  }
  std::string cluster_token;
  if (flags->Has("cluster-token-file")) {
    auto t = router::ReadClusterTokenFile(flags->StringOr("cluster-token-file", ""));
    if (!t.ok()) return Fail(t.status());
    cluster_token = *t;
  }
  GatewayOptions o;
  o.model_id = flags->StringOr("model-id", "dmoe");
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<ChatTemplate> chat;
  std::string tok_path = flags->StringOr("tokenizer", "");
  if (flags->Has("model")) {
    const std::string dir = flags->StringOr("model", "");
    auto config = LoadModelConfig(dir);
    if (!config.ok()) return Fail(config.status());
    auto tmpl = ChatTemplate::LoadFromModelDir(dir);
    if (!tmpl.ok()) return Fail(tmpl.status());
    chat = std::make_unique<ChatTemplate>(std::move(tmpl).value());
    o.chat_template = chat.get();
    std::fprintf(stderr, "dmoe-gateway: %s\n",
                 chat->is_builtin_default()
                     ? absl::StrCat("no chat template in ", dir,
                                    ": Chat uses the DeepSeek-V2-Chat format")
                           .c_str()
                     : absl::StrCat("chat template of ", dir).c_str());
    o.vocab_size = config->vocab_size;
    o.max_position_embeddings = config->max_position_embeddings;
    if (tok_path.empty() && std::ifstream(dir + "/tokenizer.json"))
      tok_path = dir + "/tokenizer.json";
  }
  if (!tok_path.empty()) {
    auto t = Tokenizer::FromFile(tok_path);
    if (!t.ok()) return Fail(t.status());
    tok = std::move(t).value();
    o.tokenizer = tok.get();
    std::fprintf(stderr, "dmoe-gateway: tokenizer %s (%lld tokens)\n", tok_path.c_str(),
                 static_cast<long long>(tok->vocab_size()));
  }
  auto limit = flags->Int("max-concurrent-per-key", 64);
  if (!limit.ok()) return Fail(limit.status());
  std::unique_ptr<ApiKeys> keys = std::make_unique<ApiKeys>();
  if (flags->Has("api-keys")) {
    auto k = ApiKeys::Load(flags->StringOr("api-keys", ""), *limit);
    if (!k.ok()) return Fail(k.status());
    keys = std::move(k).value();
  }
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (flags->Has("tls-cert") || flags->Has("tls-key")) {
    auto cert = Slurp("tls-cert", flags->StringOr("tls-cert", ""));
    auto key = Slurp("tls-key", flags->StringOr("tls-key", ""));
    if (!cert.ok()) return Fail(cert.status());
    if (!key.ok()) return Fail(key.status());
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({*key, *cert});
    creds = grpc::SslServerCredentials(ssl);
  }
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  Metrics metrics;
  auto metrics_addr = metrics.Serve(flags->StringOr("metrics-listen", "127.0.0.1:0"));
  if (!metrics_addr.ok()) return Fail(metrics_addr.status());
  auto& ttft = metrics.Seconds("dmoe_gateway_time_to_first_token_seconds",
                               "From a request's arrival at the gateway to its first token");
  auto& active = metrics.Gauge("dmoe_gateway_active_streams", "Generate/Chat streams in flight");
  o.metrics.time_to_first_token = [&ttft](double s) { ttft.Observe(s); };
  o.metrics.active = [&active](int d) { active.Increment(d); };
  o.metrics.finished = [&metrics](const std::string& outcome) {
    metrics
        .Counter("dmoe_gateway_requests_total", "Generate/Chat requests by outcome",
                 {{"outcome", outcome}})
        .Increment();
  };
  for (const char* outcome : {"ok", "cancelled", "invalid_argument", "deadline_exceeded",
                              "unavailable", "unauthenticated", "resource_exhausted"}) {
    metrics.Counter("dmoe_gateway_requests_total", "Generate/Chat requests by outcome",
                    {{"outcome", outcome}});
  }
  NodePool pool(nodes);
  auto& known_nodes =
      metrics.Gauge("dmoe_gateway_attention_nodes", "Attention nodes known", {{"state", "known"}});
  auto& healthy_nodes = metrics.Gauge("dmoe_gateway_attention_nodes", "Attention nodes known",
                                      {{"state", "healthy"}});
  std::unique_ptr<router::RouterMember> member;
  auto discover = [&] {
    auto listed = member->ListNodes();
    if (!listed.ok()) return;
    for (const auto& n : listed->nodes()) {
      if (n.role() == internal::ATTENTION && pool.Add(n.grpc_address())) {
        std::fprintf(stderr, "dmoe-gateway: attention node %s at %s (from the router)\n",
                     n.node_id().c_str(), n.grpc_address().c_str());
      }
    }
  };
  if (flags->Has("router")) {
    router::MemberOptions mo;
    mo.router_address = flags->StringOr("router", "");
    mo.cluster_token = cluster_token;
    member = std::make_unique<router::RouterMember>(mo);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    // Serve once an attention node answers (it is polled every 50 ms once known), so that the
    // first request does not find an empty pool.
    do {
      discover();
      if (pool.healthy() > 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    } while (std::chrono::steady_clock::now() < until);
    if (pool.healthy() == 0) {
      std::fprintf(stderr, "dmoe-gateway: no attention node answers yet; serving anyway\n");
    }
  }
  std::atomic<bool> done{false};
  std::atomic<grpc::Server*> server_ready{nullptr};
  std::thread watcher([&] {
    int last_ready = -1;
    for (int tick = 0; !done; ++tick) {
      if (member != nullptr && tick % 10 == 0) discover();
      known_nodes.Set(static_cast<double>(pool.size()));
      healthy_nodes.Set(static_cast<double>(pool.healthy()));
      const int ready = pool.healthy() > 0 ? 1 : 0;
      if (grpc::Server* s = server_ready.load(); s != nullptr && ready != last_ready) {
        SetReadiness(s, "dmoe.v1.Dmoe", ready == 1);
        last_ready = ready;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  GatewayService service(&pool, keys.get(), o);
  EnableHealthAndReflection();
  grpc::ServerBuilder builder;
  int port = 0;
  const std::string listen = flags->StringOr("grpc-listen", "127.0.0.1:0");
  builder.AddListeningPort(listen, creds, &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail(absl::UnavailableError(absl::StrCat("--grpc-listen: cannot listen on ", listen)));
  }
  // Ready while at least one attention node is healthy (the watcher keeps it current).
  SetReadiness(server.get(), "dmoe.v1.Dmoe", pool.healthy() > 0);
  server_ready = server.get();
  const std::string addr = absl::StrCat(listen.substr(0, listen.rfind(':')), ":", port);
  std::fprintf(stderr, "dmoe-gateway: serving on %s over %zu attention node(s)\n", addr.c_str(),
               pool.size());
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
  done = true;
  watcher.join();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}

}  // namespace
}  // namespace dmoe::gateway

int main(int argc, char** argv) { return dmoe::gateway::Main(argc, argv); }
