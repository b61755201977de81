// Which side of a UCX connection aborts when the other goes away mid-wireup, over tcp on lo, in
// real processes (a server and a client forked per run). Debian 12's UCX 1.13.1 asserts in
// ucp_request_send_state_ff (ucp_request.c:684, "got REP message") when an endpoint whose wireup
// reply is still pending fails; upstream removed that assertion in 1.14 (commit 9ccaf31bb6).
// Scenarios (the run's parent triggers each as soon as the client's Connect returned, plus a
// delay):
//   server SIGKILLed; server Shutdown(); client _exit; client SIGKILLed.
// Prints one row per scenario and delay; exits 1 when any process died of a signal.
// Usage: ucx_wireup_race [RUNS]   (default 10 per row). Not in CI: on UCX 1.13 it fails.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "transport/ucx.h"

namespace dmoe::transport {
namespace {

void UcxOnLoopback() {
  setenv("UCX_TLS", "tcp,self", 1);
  setenv("UCX_NET_DEVICES", "lo", 1);
  setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);
}

std::string ReadLine(int fd) {
  std::string s;
  char c;
  while (read(fd, &c, 1) == 1 && c != '\n') s.push_back(c);
  return s;
}

struct Outcome {
  int server_sig = 0, client_sig = 0;
};

// mode 0: server SIGKILLed right after the client's Connect returns; 1: server Shutdown();
// 2: client _exit right after Connect; 3: client SIGKILLed right after connect.
Outcome RunOnce(int mode, int delay_us) {
  int to_parent[2], to_server[2], to_client[2];
  if (pipe(to_parent) != 0 || pipe(to_server) != 0 || pipe(to_client) != 0) std::abort();
  const pid_t server = fork();
  if (server == 0) {
    UcxOnLoopback();
    auto s = NewUcxServer();
    if (!s.ok() || !(*s)->Listen("127.0.0.1:0").ok()) _exit(3);
    const std::string a = (*s)->WorkerAddress() + "\n";
    if (write(to_parent[1], a.data(), a.size()) < 0) _exit(4);
    char c;
    if (read(to_server[0], &c, 1) != 1) _exit(5);
    if (c == 'S') (*s)->Shutdown();
    if (c == 'W') {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      (*s)->Shutdown();
    }
    _exit(0);
  }
  const std::string addr = ReadLine(to_parent[0]);
  const pid_t client = fork();
  if (client == 0) {
    UcxOnLoopback();
    auto c = NewUcxClient();
    if (!c.ok()) _exit(3);
    auto peer = (*c)->Connect(addr);
    if (write(to_client[1], "c", 1) < 0) _exit(4);
    if (mode == 2) _exit(0);
    if (peer.ok()) {
      for (int i = 0; i < 20; ++i) {
        auto id = (*c)->Post(*peer, std::vector<uint8_t>(64, 1));
        if (!id.ok()) break;
        std::vector<uint8_t> reply;
        (void)(*c)->Wait(*id, std::chrono::steady_clock::now() + std::chrono::milliseconds(50),
                         &reply);
      }
    }
    c->reset();
    _exit(0);
  }
  char ch;
  if (read(to_client[0], &ch, 1) != 1) std::abort();
  if (delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
  if (mode == 0) kill(server, SIGKILL);
  if (mode == 3) kill(client, SIGKILL);
  const char order = mode == 1 ? 'S' : 'W';  // Shutdown now, or serve 500 ms then Shutdown
  if (mode != 0 && write(to_server[1], &order, 1) != 1) std::abort();
  Outcome o;
  int st = 0;
  waitpid(client, &st, 0);
  if (WIFSIGNALED(st)) o.client_sig = WTERMSIG(st);
  waitpid(server, &st, 0);
  if (mode != 0 && WIFSIGNALED(st)) o.server_sig = WTERMSIG(st);
  for (int* p : {to_parent, to_server, to_client}) {
    close(p[0]);
    close(p[1]);
  }
  return o;
}

constexpr const char* kScenario[] = {"server SIGKILLed", "server Shutdown()", "client _exit",
                                     "client SIGKILLed"};

}  // namespace
}  // namespace dmoe::transport

int main(int argc, char** argv) {
  using dmoe::transport::RunOnce;
  const int runs = argc > 1 ? std::atoi(argv[1]) : 10;
  if (runs < 1) return 2;
  int died = 0;
  std::printf("%-18s %8s  %-22s %-22s\n", "scenario", "delay", "server died (signal)",
              "client died (signal)");
  std::fflush(stdout);  // before the forks: else each child repeats what is buffered
  for (int mode = 0; mode < 4; ++mode) {
    for (int delay : {0, 200, 1000, 5000}) {
      int server = 0, client = 0;
      for (int i = 0; i < runs; ++i) {
        const dmoe::transport::Outcome o = RunOnce(mode, delay);
        server += o.server_sig != 0;
        client += o.client_sig != 0 && mode != 3;
      }
      died += server + client;
      std::printf("%-18s %5d us  %3d / %-16d %3d / %d\n", dmoe::transport::kScenario[mode], delay,
                  server, mode == 0 ? 0 : runs, client, mode == 3 ? 0 : runs);
      std::fflush(stdout);
    }
  }
  return died > 0 ? 1 : 0;
}
