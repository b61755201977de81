#include "cli/local_cluster.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/flags.h"
#include "common/process.h"
#include "common/status_macros.h"
#include "kernels/cpu/blas_threads.h"
#include "model/config.h"
#include "model/tiny_model.h"
#include "nlohmann/json.hpp"

namespace dmoe::cli {

namespace {
// A string field of a .ready file (`absent` when missing or of another type).
std::string ReadyText(const nlohmann::json& ready, const char* key, const char* absent = "?") {
  const auto it = ready.is_object() ? ready.find(key) : ready.end();
  return it != ready.end() && it->is_string() ? it->get<std::string>() : std::string(absent);
}

constexpr char kUpHelp[] =
    R"(usage: dmoe up [--model DIR] [--experts N] [--attention M] [--expert-replicas R] [flags]

Starts a local cluster as separate processes on 127.0.0.1: a dmoe-router, N dmoe-expert shards
(UCX) that take their experts from the router's placement, M dmoe-attention nodes that follow it,
and a dmoe-gateway; writes the tiny model first when DIR has none; waits until every service
answers and a placement is active; prints "gateway: HOST:PORT" (gRPC), "openai:
http://HOST:PORT/v1" (the OpenAI-compatible HTTP API) and the metrics URLs; records the processes in
the state file and returns, leaving them running. `dmoe down` stops them.

  --model DIR            checkpoint directory (default .cache/tiny-model; created with --preset)
  --preset NAME          preset written when DIR has no config.json (default tiny; tiny-v3 has
                         DeepSeek-V3 gating and an MTP layer)
  --speculative-tokens N the attention nodes draft up to N tokens per step with the model's MTP
                         layer (default 0 = off; DeepSeek-V3 models)
  --experts N            expert shards (default 2)
  --attention M          attention nodes (default 1)
  --expert-replicas R    copies of every expert on distinct shards (default 1); with R >= 2 a dead
                         shard stalls no request
  --expert-capacity C    (layer, expert) pairs one shard may host (default: all of them, so that
                         survivors can take over a dead shard's experts)
  --lease-ms N           router lease (default 3000): how soon a dead shard is replaced
  --ucx-tls TLS          UCX_TLS for the cluster (default tcp,self; UCX_NET_DEVICES is lo)
  --wire-dtype T         hidden rows between attention and experts: bf16 (default) or f32
  --blas-threads N       compute threads (kernel pool and OpenBLAS) of each attention node and
                         shard (default: this machine's CPUs / (N + M), at least 1: the processes
                         share the machine, and idle compute threads spin and take the others'
                         CPUs)
  --http-listen H:P      the gateway's OpenAI-compatible HTTP address (default 127.0.0.1:0)
  --state-file F         where the cluster is recorded (default .cache/dmoe-up.json)
  --log-dir D            one log file per process (default .cache/dmoe-up-logs)
  --bin-dir D            where dmoe-router, dmoe-expert, dmoe-attention and dmoe-gateway live
                         (default: next to this dmoe, in Bazel's bazel-bin layout)
)";

constexpr char kDownHelp[] = R"(usage: dmoe down [--state-file F] [--grace-seconds N]

Stops the processes `dmoe up` recorded in F and removes F: first the gateway and the attention
nodes (SIGTERM: they refuse new requests and let those in progress finish), then the router, then
the expert shards.

  --state-file F       the file `dmoe up` wrote (default .cache/dmoe-up.json)
  --grace-seconds N    how long each group may take before SIGKILL (default 40: above the 30 s
                       the gateway and attention nodes drain for; 0-86400)
)";

int Fail(const std::string& what) {
  std::fprintf(stderr, "error: %s\n", what.c_str());
  return 2;
}

void MakeDirs(const std::string& dir) {
  for (size_t at = dir.find('/', 1); at != std::string::npos; at = dir.find('/', at + 1)) {
    ::mkdir(dir.substr(0, at).c_str(), 0755);
  }
  ::mkdir(dir.c_str(), 0755);
}

}  // namespace

struct UpOptions {
  std::string dir, state, logs, bin, preset, ucx_tls, wire_dtype, http_listen;
  int64_t experts = 2, attention = 1, replicas = 1, capacity = 0, lease_ms = 3000, blas = 0;
  int64_t speculative = 0;
};

absl::StatusOr<UpOptions> ParseUp(const Flags& f) {
  UpOptions o;
  o.dir = f.StringOr("model", ".cache/tiny-model");
  o.state = f.StringOr("state-file", ".cache/dmoe-up.json");
  o.logs = f.StringOr("log-dir", ".cache/dmoe-up-logs");
  o.bin = f.StringOr("bin-dir", BinDirOfThisExecutable());
  o.preset = f.StringOr("preset", "tiny");
  o.ucx_tls = f.StringOr("ucx-tls", "tcp,self");
  o.wire_dtype = f.StringOr("wire-dtype", "bf16");
  o.http_listen = f.StringOr("http-listen", "127.0.0.1:0");
  for (auto [name, value] :
       std::vector<std::pair<const char*, int64_t*>>{{"experts", &o.experts},
                                                     {"attention", &o.attention},
                                                     {"expert-replicas", &o.replicas},
                                                     {"expert-capacity", &o.capacity},
                                                     {"lease-ms", &o.lease_ms},
                                                     {"blas-threads", &o.blas},
                                                     {"speculative-tokens", &o.speculative}}) {
    auto v = f.Int(name, *value);
    if (!v.ok()) return v.status();
    *value = *v;
  }
  auto bad = [](const char* what) { return absl::InvalidArgumentError(what); };
  if (o.experts < 1 || o.experts > 64) return bad("--experts: must be in [1, 64]");
  if (o.attention < 1 || o.attention > 16) return bad("--attention: must be in [1, 16]");
  if (o.replicas < 1 || o.replicas > o.experts) {
    return bad("--expert-replicas: must be in [1, --experts]");
  }
  if (o.capacity < 0) return bad("--expert-capacity: negative");
  if (o.lease_ms < 100 || o.lease_ms > 3600000) {
    return bad("--lease-ms: must be in [100, 3600000]");
  }
  if (o.blas < 0) return bad("--blas-threads: negative");
  if (o.speculative < 0 || o.speculative > 16) return bad("--speculative-tokens: not in [0, 16]");
  return o;
}

// Every binary before any process starts: a missing one is named with the command that builds it.
absl::Status CheckBinaries(const std::string& bin) {
  std::vector<std::string> missing, targets;
  for (const char* target : {"router:dmoe-router", "expert_service:dmoe-expert",
                             "attention_service:dmoe-attention", "gateway:dmoe-gateway"}) {
    const std::string t(target);
    const std::string path = bin + "/" + t.substr(0, t.find(':')) + "/" + t.substr(t.find(':') + 1);
    if (access(path.c_str(), X_OK) != 0) {
      missing.push_back(path);
      targets.push_back("//" + t);
    }
  }
  if (missing.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("not built: ", absl::StrJoin(missing, ", "), " (build with: bazel build ",
                   absl::StrJoin(targets, " "), "; or point --bin-dir at bazel-bin)"));
}

// Starts the cluster's processes one by one, each detached, and records them; stops all it
// started when one does not come up.
class Launcher {
 public:
  explicit Launcher(std::string logs) : logs_(std::move(logs)) {}
  ~Launcher() {
    if (!kept_) StopProcesses(pids_);
  }
  // Starts `argv` + --ready-file as `name` (its log and ready file in the log folder); waits up to
  // `timeout` for its ready file; returns its gRPC address.
  absl::StatusOr<std::string> Start(const std::string& role, const std::string& name,
                                    std::vector<std::string> argv, std::chrono::seconds timeout) {
    const std::string ready = absl::StrCat(logs_, "/", name, ".ready");
    const std::string log = absl::StrCat(logs_, "/", name, ".log");
    std::remove(ready.c_str());
    argv.push_back("--ready-file");
    argv.push_back(ready);
    const pid_t pid = ChildProcess(argv, log, /*detach=*/true).Release();
    if (pid <= 0) return absl::ResourceExhaustedError(absl::StrCat("cannot start ", name));
    pids_.push_back(pid);
    auto j = WaitForReady(ready, timeout, pid);
    if (!j.ok() || !j->contains("grpc")) {
      return absl::UnavailableError(absl::StrCat(name, " did not start (see ", log, ")"));
    }
    const std::string grpc = ReadyText(*j, "grpc", ""), metrics = ReadyText(*j, "metrics", "");
    if (grpc.empty()) {
      return absl::UnavailableError(absl::StrCat(name, " wrote no gRPC address (see ", log, ")"));
    }
    metrics_urls_.push_back("http://" + metrics + "/metrics");
    ready_[name] = *j;
    processes_.push_back(
        {{"role", role}, {"pid", pid}, {"grpc", grpc}, {"metrics", metrics}, {"log", log}});
    return grpc;
  }
  const nlohmann::json& processes() const { return processes_; }
  // What `name` wrote to its ready file (null before it started).
  nlohmann::json ready(const std::string& name) const {
    auto it = ready_.find(name);
    return it == ready_.end() ? nlohmann::json() : it->second;
  }
  const std::vector<std::string>& metrics_urls() const { return metrics_urls_; }
  void Keep() { kept_ = true; }  // leave them running

 private:
  std::string logs_;
  std::vector<pid_t> pids_;
  nlohmann::json processes_ = nlohmann::json::array();
  std::vector<std::string> metrics_urls_;
  std::map<std::string, nlohmann::json> ready_;
  bool kept_ = false;
};

struct Cluster {
  std::string router, gateway;
  std::vector<std::string> shards, attention;
};

absl::Status LaunchAll(const UpOptions& o, const ModelConfig& config, Launcher* l, Cluster* c) {
  const std::string blas_threads = std::to_string(
      o.blas > 0 ? o.blas : cpu::BlasThreadsShare(static_cast<int>(o.experts + o.attention)));
  // The router first: shards register with it and it plans the placement.
  ASSIGN_OR_RETURN(c->router,
                   l->Start("router", "router",
                            {o.bin + "/router/dmoe-router", "--model", o.dir, "--replication",
                             std::to_string(o.replicas), "--lease-ms", std::to_string(o.lease_ms),
                             "--startup-grace-ms", "0", "--min-shards", std::to_string(o.experts)},
                            std::chrono::seconds(60)));
  int64_t pairs = 0;
  for (int64_t layer = 0; layer < config.num_expert_layers(); ++layer) {
    if (config.IsMoeLayer(layer)) pairs += config.n_routed_experts;
  }
  for (int64_t i = 0; i < o.experts; ++i) {
    ASSIGN_OR_RETURN(
        std::string addr,
        l->Start("expert", absl::StrCat("expert", i),
                 {o.bin + "/expert_service/dmoe-expert", "--model", o.dir, "--router", c->router,
                  "--capacity", std::to_string(o.capacity > 0 ? o.capacity : pairs), "--node-id",
                  absl::StrCat("expert-", i), "--blas-threads", blas_threads},
                 std::chrono::seconds(120)));
    c->shards.push_back(addr);
  }
  for (int64_t i = 0; i < o.attention; ++i) {
    // The attention node waits (up to 30 s) for the router's first active placement.
    ASSIGN_OR_RETURN(
        std::string addr,
        l->Start("attention", absl::StrCat("attention", i),
                 {o.bin + "/attention_service/dmoe-attention", "--model", o.dir, "--router",
                  c->router, "--wire-dtype", o.wire_dtype, "--blas-threads", blas_threads,
                  "--speculative-tokens", absl::StrCat(o.speculative)},
                 std::chrono::seconds(120)));
    c->attention.push_back(addr);
  }
  // The gateway finds the attention nodes through the router (they register there).
  ASSIGN_OR_RETURN(c->gateway, l->Start("gateway", "gateway",
                                        {o.bin + "/gateway/dmoe-gateway", "--router", c->router,
                                         "--model", o.dir, "--http-listen", o.http_listen},
                                        std::chrono::seconds(60)));
  return absl::OkStatus();
}

int Up(int argc, char** argv) {
  auto flags =
      Flags::Parse(argc, argv,
                   {"model", "preset", "experts", "attention", "expert-replicas", "ucx-tls",
                    "state-file", "log-dir", "bin-dir", "wire-dtype", "expert-capacity", "lease-ms",
                    "blas-threads", "http-listen", "speculative-tokens"},
                   {});
  if (!flags.ok()) return Fail(std::string(flags.status().message()));
  if (flags->help()) {
    std::fputs(kUpHelp, stdout);
    return 0;
  }
  auto o = ParseUp(*flags);
  if (!o.ok()) return Fail(std::string(o.status().message()));
  if (std::ifstream(o->state)) {
    return Fail(
        absl::StrCat("--state-file ", o->state, " exists: a cluster is up (dmoe down first)"));
  }
  if (!std::ifstream(o->dir + "/config.json")) {
    auto preset = PresetConfig(o->preset);
    if (!preset.ok()) return Fail(std::string(preset.status().message()));
    std::fprintf(stderr, "writing the %s model to %s\n", o->preset.c_str(), o->dir.c_str());
    if (auto s = WriteTinyModel(o->dir, *preset, TinyModelOptions()); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }
  if (auto s = CheckBinaries(o->bin); !s.ok()) return Fail(std::string(s.message()));
  auto config = LoadModelConfig(o->dir);
  if (!config.ok()) return Fail(std::string(config.status().message()));
  MakeDirs(o->logs);
  setenv("UCX_NET_DEVICES", "lo", 1);
  setenv("UCX_TLS", o->ucx_tls.c_str(), 1);
  // UCX prints its warnings to stdout unless told otherwise (read when its library loads, so it
  // is set for the services here): to stderr, where the services' own log lines go.
  setenv("UCX_LOG_FILE", "stderr", 0);
  Launcher launcher(o->logs);
  Cluster c;
  if (auto s = LaunchAll(*o, *config, &launcher, &c); !s.ok()) {
    return Fail(std::string(s.message()));
  }
  const std::string openai =
      absl::StrCat("http://", ReadyText(launcher.ready("gateway"), "http"), "/v1");
  const nlohmann::json record = {{"model", o->dir},
                                 {"router", c.router},
                                 {"gateway", c.gateway},
                                 {"openai", openai},
                                 {"processes", launcher.processes()}};
  {
    std::ofstream out(o->state);
    out << record.dump(2) << "\n";
    if (!out) return Fail(absl::StrCat("--state-file: cannot write ", o->state));
  }
  launcher.Keep();
  std::printf(
      "router: %s\nexperts: %s\nattention: %s\ngateway: %s\nopenai: %s\nmetrics: %s\nstate: %s "
      "(dmoe down --state-file %s)\n",
      c.router.c_str(), absl::StrJoin(c.shards, ",").c_str(),
      absl::StrJoin(c.attention, ",").c_str(), c.gateway.c_str(), openai.c_str(),
      absl::StrJoin(launcher.metrics_urls(), " ").c_str(), o->state.c_str(), o->state.c_str());
  return 0;
}

int Down(int argc, char** argv) {
  auto flags = Flags::Parse(argc, argv, {"state-file", "grace-seconds"}, {});
  if (!flags.ok()) return Fail(std::string(flags.status().message()));
  if (flags->help()) {
    std::fputs(kDownHelp, stdout);
    return 0;
  }
  const absl::StatusOr<int64_t> grace_s = flags->Int("grace-seconds", 40);
  if (!grace_s.ok()) return Fail(std::string(grace_s.status().message()));
  if (*grace_s < 0 || *grace_s > 86400) return Fail("--grace-seconds: must be in [0, 86400]");
  const std::chrono::seconds grace(*grace_s);
  const std::string state = flags->StringOr("state-file", ".cache/dmoe-up.json");
  std::ifstream in(state);
  if (!in) return Fail(absl::StrCat("--state-file: no cluster recorded in ", state));
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("processes") ||
      !j["processes"].is_array()) {
    return Fail(absl::StrCat(state, ": not a state file"));
  }
  // Gateway and attention nodes first (SIGTERM: they finish what is in progress), then the router,
  // then the shards (which, finding no router to plan them out, leave at once). Every entry is
  // checked before any process is stopped: a bad file stops none (it had aborted dmoe down
  // half-way).
  std::vector<pid_t> front, router, shards;
  const nlohmann::json& processes = j["processes"];
  for (size_t i = 0; i < processes.size(); ++i) {
    const nlohmann::json& p = processes[i];
    const auto pid = p.is_object() ? p.find("pid") : p.end();
    const auto role = p.is_object() ? p.find("role") : p.end();
    if (pid == p.end() || !pid->is_number_integer() || pid->get<int64_t>() <= 0 ||
        pid->get<int64_t>() > std::numeric_limits<pid_t>::max() || role == p.end() ||
        !role->is_string()) {
      return Fail(absl::StrCat(state, ": processes[", i,
                               "] needs a positive integer pid and a role string"));
    }
    const std::string r = role->get<std::string>();
    (r == "expert"   ? shards
     : r == "router" ? router
                     : front)
        .push_back(static_cast<pid_t>(pid->get<int64_t>()));
  }
  std::reverse(front.begin(), front.end());
  std::printf(
      "stopping %zu processes, the gateway and attention nodes first (requests in "
      "progress may take up to %lld s)\n",
      front.size() + router.size() + shards.size(), static_cast<long long>(*grace_s));
  std::fflush(stdout);
  StopProcesses(front, grace);
  StopProcesses(router, grace);
  StopProcesses(shards, grace);
  std::remove(state.c_str());
  std::printf("stopped %zu processes\n", front.size() + router.size() + shards.size());
  return 0;
}

}  // namespace dmoe::cli
