#include "cli/local_cluster.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/flags.h"
#include "kernels/cpu/blas_threads.h"
#include "model/config.h"
#include "model/tiny_model.h"
#include "nlohmann/json.hpp"

namespace dmoe::cli {
namespace {

constexpr char kUpHelp[] =
    R"(usage: dmoe up [--model DIR] [--experts N] [--attention M] [--expert-replicas R] [flags]

Starts a local cluster as separate processes on 127.0.0.1: a dmoe-router, N dmoe-expert shards
(UCX) that take their experts from the router's placement, M dmoe-attention nodes that follow it,
and a dmoe-gateway; writes the tiny model first when DIR has none; waits until every service
answers and a placement is active; prints "gateway: HOST:PORT" and the metrics URLs; records the
processes in the state file and returns, leaving them running. `dmoe down` stops them.

  --model DIR            checkpoint directory (default .cache/tiny-model; created with --preset)
  --preset NAME          preset written when DIR has no config.json (default tiny)
  --experts N            expert shards (default 2)
  --attention M          attention nodes (default 1)
  --expert-replicas R    copies of every expert on distinct shards (default 1); with R >= 2 a dead
                         shard stalls no request
  --expert-capacity C    (layer, expert) pairs one shard may host (default: all of them, so that
                         survivors can take over a dead shard's experts)
  --lease-ms N           router lease (default 3000): how soon a dead shard is replaced
  --ucx-tls TLS          UCX_TLS for the cluster (default tcp,self; UCX_NET_DEVICES is lo)
  --wire-dtype T         hidden rows between attention and experts: bf16 (default) or f32
  --blas-threads N       OpenBLAS threads of each attention node and shard (default: this
                         machine's CPUs / (N + M), at least 1: the processes share the machine,
                         and OpenBLAS's idle threads spin and take the others' CPUs)
  --state-file F         where the cluster is recorded (default .cache/dmoe-up.json)
  --log-dir D            one log file per process (default .cache/dmoe-up-logs)
  --bin-dir D            where dmoe-router, dmoe-expert, dmoe-attention and dmoe-gateway live
                         (default: next to this dmoe, in Bazel's bazel-bin layout)
)";

constexpr char kDownHelp[] = R"(usage: dmoe down [--state-file F]

Stops the processes `dmoe up` recorded in F (SIGTERM, then SIGKILL after 5 s) and removes F.
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

std::string BinDir() {
  char self[4096] = {0};
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  std::string exe(self, n > 0 ? static_cast<size_t>(n) : 0);
  // bazel-bin/cli/dmoe -> bazel-bin
  exe = exe.substr(0, exe.rfind('/'));
  return exe.substr(0, exe.rfind('/'));
}

// Starts a detached service (its own session, so it outlives this command); returns its pid.
pid_t Spawn(const std::vector<std::string>& argv, const std::string& log) {
  const pid_t pid = fork();
  if (pid == 0) {
    setsid();
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int null_in = open("/dev/null", O_RDONLY);
    dup2(null_in, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    std::fprintf(stderr, "dmoe up: cannot run %s: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }
  return pid;
}

// True while `pid` runs: reaps it if it is our child; otherwise looks at /proc (an orphan that
// has exited may linger as a zombie until init reaps it).
bool Alive(pid_t pid) {
  int status;
  const pid_t r = waitpid(pid, &status, WNOHANG);
  if (r == pid) return false;
  if (kill(pid, 0) != 0) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  const size_t paren = line.rfind(')');
  return paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] != 'Z';
}

// Waits for a --ready-file and returns its "grpc" address; "" when the process died or timed out.
// *metrics gets its "metrics" address.
std::string WaitReady(pid_t pid, const std::string& file, int seconds, std::string* metrics) {
  for (int i = 0; i < seconds * 20; ++i) {
    std::ifstream in(file);
    if (in) {
      std::stringstream ss;
      ss << in.rdbuf();
      auto j = nlohmann::json::parse(ss.str(), nullptr, false);
      if (!j.is_discarded() && j.contains("grpc")) {
        *metrics = j.value("metrics", "");
        return j["grpc"].get<std::string>();
      }
    }
    if (!Alive(pid)) return "";
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return "";
}

void StopAll(const std::vector<pid_t>& pids) {
  for (pid_t p : pids) kill(p, SIGTERM);
  auto any_alive = [&] {
    for (pid_t p : pids) {
      if (Alive(p)) return true;
    }
    return false;
  };
  for (int i = 0; i < 100 && any_alive(); ++i) {  // 5 s to shut down cleanly
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  for (pid_t p : pids) {
    if (Alive(p)) kill(p, SIGKILL);
  }
  for (int i = 0; i < 100 && any_alive(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

}  // namespace

int Up(int argc, char** argv) {
  auto flags = Flags::Parse(argc, argv,
                            {"model", "preset", "experts", "attention", "expert-replicas",
                             "ucx-tls", "state-file", "log-dir", "bin-dir", "wire-dtype",
                             "expert-capacity", "lease-ms", "blas-threads"},
                            {});
  if (!flags.ok()) return Fail(std::string(flags.status().message()));
  if (flags->help()) {
    std::fputs(kUpHelp, stdout);
    return 0;
  }
  const std::string dir = flags->StringOr("model", ".cache/tiny-model");
  const std::string state = flags->StringOr("state-file", ".cache/dmoe-up.json");
  const std::string logs = flags->StringOr("log-dir", ".cache/dmoe-up-logs");
  const std::string bin = flags->StringOr("bin-dir", BinDir());
  auto experts = flags->Int("experts", 2);
  auto attention = flags->Int("attention", 1);
  auto replicas = flags->Int("expert-replicas", 1);
  auto capacity = flags->Int("expert-capacity", 0);
  auto lease = flags->Int("lease-ms", 3000);
  auto blas = flags->Int("blas-threads", 0);
  for (const auto* v : {&experts, &attention, &replicas, &capacity, &lease, &blas}) {
    if (!v->ok()) return Fail(std::string(v->status().message()));
  }
  if (*experts < 1 || *experts > 64) return Fail("--experts: must be in [1, 64]");
  if (*attention < 1 || *attention > 16) return Fail("--attention: must be in [1, 16]");
  if (*replicas < 1 || *replicas > *experts)
    return Fail("--expert-replicas: must be in [1, --experts]");
  if (*capacity < 0) return Fail("--expert-capacity: negative");
  if (*lease < 100) return Fail("--lease-ms: must be at least 100");
  if (*blas < 0) return Fail("--blas-threads: negative");
  const std::string blas_threads = std::to_string(
      *blas > 0 ? *blas : cpu::BlasThreadsShare(static_cast<int>(*experts + *attention)));
  if (std::ifstream(state)) {
    return Fail(absl::StrCat("--state-file ", state, " exists: a cluster is up (dmoe down first)"));
  }
  if (!std::ifstream(dir + "/config.json")) {
    auto preset = PresetConfig(flags->StringOr("preset", "tiny"));
    if (!preset.ok()) return Fail(std::string(preset.status().message()));
    std::fprintf(stderr, "writing the %s model to %s\n", flags->StringOr("preset", "tiny").c_str(),
                 dir.c_str());
    if (auto s = WriteTinyModel(dir, *preset, TinyModelOptions()); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }
  // Every binary before any process starts: a missing one is named with the command that builds it.
  {
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
    if (!missing.empty()) {
      return Fail(absl::StrCat("not built: ", absl::StrJoin(missing, ", "),
                               " (build with: bazel build ", absl::StrJoin(targets, " "),
                               "; or point --bin-dir at bazel-bin)"));
    }
  }
  auto config = LoadModelConfig(dir);
  if (!config.ok()) return Fail(std::string(config.status().message()));
  MakeDirs(logs);
  setenv("UCX_NET_DEVICES", "lo", 1);
  setenv("UCX_TLS", flags->StringOr("ucx-tls", "tcp,self").c_str(), 1);
  std::vector<pid_t> pids;
  nlohmann::json record = {{"model", dir}, {"processes", nlohmann::json::array()}};
  auto fail = [&](const std::string& what, const std::string& log) {
    StopAll(pids);
    return Fail(absl::StrCat(what, " (see ", log, ")"));
  };
  // The router first: shards register with it and it plans the placement.
  std::vector<std::string> shard_addrs, metrics_urls;
  std::string router;
  {
    const std::string ready = logs + "/router.ready";
    const std::string log = logs + "/router.log";
    std::remove(ready.c_str());
    const pid_t pid = Spawn({bin + "/router/dmoe-router", "--model", dir, "--replication",
                             std::to_string(*replicas), "--lease-ms", std::to_string(*lease),
                             "--startup-grace-ms", "0", "--min-shards", std::to_string(*experts),
                             "--ready-file", ready},
                            log);
    pids.push_back(pid);
    std::string metrics;
    router = WaitReady(pid, ready, 60, &metrics);
    if (router.empty()) return fail("the router did not start", log);
    metrics_urls.push_back("http://" + metrics + "/metrics");
    record["processes"].push_back(
        {{"role", "router"}, {"pid", pid}, {"grpc", router}, {"metrics", metrics}, {"log", log}});
    record["router"] = router;
  }
  int64_t pairs = 0;
  for (int64_t l = 0; l < config->num_hidden_layers; ++l) {
    if (config->IsMoeLayer(l)) pairs += config->n_routed_experts;
  }
  const int64_t n = *experts;
  for (int64_t i = 0; i < n; ++i) {
    const std::string ready = absl::StrCat(logs, "/expert", i, ".ready");
    const std::string log = absl::StrCat(logs, "/expert", i, ".log");
    std::remove(ready.c_str());
    const pid_t pid = Spawn(
        {bin + "/expert_service/dmoe-expert", "--model", dir, "--router", router, "--capacity",
         std::to_string(*capacity > 0 ? *capacity : pairs), "--node-id",
         absl::StrCat("expert-", i), "--blas-threads", blas_threads, "--ready-file", ready},
        log);
    pids.push_back(pid);
    std::string metrics;
    const std::string addr = WaitReady(pid, ready, 120, &metrics);
    if (addr.empty()) return fail(absl::StrCat("expert shard ", i, " did not start"), log);
    shard_addrs.push_back(addr);
    metrics_urls.push_back("http://" + metrics + "/metrics");
    record["processes"].push_back(
        {{"role", "expert"}, {"pid", pid}, {"grpc", addr}, {"metrics", metrics}, {"log", log}});
  }
  std::vector<std::string> attention_addrs;
  for (int64_t i = 0; i < *attention; ++i) {
    const std::string ready = absl::StrCat(logs, "/attention", i, ".ready");
    const std::string log = absl::StrCat(logs, "/attention", i, ".log");
    std::remove(ready.c_str());
    // The attention node waits (up to 30 s) for the router's first active placement.
    const pid_t pid = Spawn({bin + "/attention_service/dmoe-attention", "--model", dir,
                             "--router", router, "--wire-dtype",
                             flags->StringOr("wire-dtype", "bf16"), "--blas-threads",
                             blas_threads, "--ready-file", ready},
                            log);
    pids.push_back(pid);
    std::string metrics;
    const std::string addr = WaitReady(pid, ready, 120, &metrics);
    if (addr.empty()) return fail(absl::StrCat("attention node ", i, " did not start"), log);
    attention_addrs.push_back(addr);
    metrics_urls.push_back("http://" + metrics + "/metrics");
    record["processes"].push_back(
        {{"role", "attention"}, {"pid", pid}, {"grpc", addr}, {"metrics", metrics}, {"log", log}});
  }
  const std::string ready = logs + "/gateway.ready";
  const std::string log = logs + "/gateway.log";
  std::remove(ready.c_str());
  const pid_t pid =
      // The gateway finds the attention nodes through the router (they register there).
      Spawn({bin + "/gateway/dmoe-gateway", "--router", router, "--model", dir, "--ready-file",
             ready},
            log);
  pids.push_back(pid);
  std::string gateway_metrics;
  const std::string gateway = WaitReady(pid, ready, 60, &gateway_metrics);
  if (gateway.empty()) return fail("the gateway did not start", log);
  metrics_urls.push_back("http://" + gateway_metrics + "/metrics");
  record["processes"].push_back({{"role", "gateway"},
                                 {"pid", pid},
                                 {"grpc", gateway},
                                 {"metrics", gateway_metrics},
                                 {"log", log}});
  record["gateway"] = gateway;
  {
    std::ofstream out(state);
    out << record.dump(2) << "\n";
    if (!out) {
      StopAll(pids);
      return Fail(absl::StrCat("--state-file: cannot write ", state));
    }
  }
  std::printf(
      "router: %s\nexperts: %s\nattention: %s\ngateway: %s\nmetrics: %s\nstate: %s (dmoe down "
      "--state-file %s)\n",
      router.c_str(), absl::StrJoin(shard_addrs, ",").c_str(), absl::StrJoin(attention_addrs, ",").c_str(),
      gateway.c_str(), absl::StrJoin(metrics_urls, " ").c_str(), state.c_str(), state.c_str());
  return 0;
}

int Down(int argc, char** argv) {
  auto flags = Flags::Parse(argc, argv, {"state-file"}, {});
  if (!flags.ok()) return Fail(std::string(flags.status().message()));
  if (flags->help()) {
    std::fputs(kDownHelp, stdout);
    return 0;
  }
  const std::string state = flags->StringOr("state-file", ".cache/dmoe-up.json");
  std::ifstream in(state);
  if (!in) return Fail(absl::StrCat("--state-file: no cluster recorded in ", state));
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.contains("processes"))
    return Fail(absl::StrCat(state, ": not a state file"));
  // Gateway and attention nodes first (they drain), then the router, then the shards (which,
  // finding no router to plan them out, leave at once).
  std::vector<pid_t> front, router, shards;
  for (const auto& p : j["processes"]) {
    const std::string role = p.value("role", "");
    (role == "expert" ? shards : role == "router" ? router : front)
        .push_back(p["pid"].get<pid_t>());
  }
  std::reverse(front.begin(), front.end());
  StopAll(front);
  StopAll(router);
  StopAll(shards);
  std::remove(state.c_str());
  std::printf("stopped %zu processes\n", front.size() + router.size() + shards.size());
  return 0;
}

}  // namespace dmoe::cli
