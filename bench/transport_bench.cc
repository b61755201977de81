// Data-plane benchmark (prints figures): dispatch + combine round trips through the UCX transport
// between two processes, with the real wire codec (bf16 rows, 2 pairs per token; the combine
// carries a row per pair, wire v2), at 1/16/64/256
// tokens and hidden sizes 256 and 5120, next to ucx_perftest's UCP tag latency and bandwidth for
// the same message sizes, measured in the same run over the same UCX_TLS.
//
//   bazel run -c opt //bench:transport_bench -- [--iters N] [--perftest /usr/bin/ucx_perftest]
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <x86intrin.h>
#endif

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "transport/ucx.h"
#include "transport/wire.h"

namespace dmoe {
namespace {

using Clock = std::chrono::steady_clock;

// A cheap monotonic counter: the cycle counter on x86-64, else steady_clock in nanoseconds.
uint64_t Ticks() {
#if defined(__x86_64__)
  return __rdtsc();
#else
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
          .count());
#endif
}

// Round trips (and perftest iterations: its -w) before the measured ones.
constexpr int kWarmup = 100;

// Pins the calling process (all its threads, present and future) to one CPU; no-op if cpu < 0.
void PinTo(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  sched_setaffinity(0, sizeof(set), &set);
}

// Server: validates each dispatch and answers with a combine of the same rows (no expert compute,
// no float conversion: this measures the data plane, not the shard's GEMMs). With `echo`, sends
// each request back as it came (no decode, no copy: the transport alone).
int Serve(int ready_fd, bool echo) {
  auto server = transport::NewUcxServer();
  if (!server.ok()) return 1;
  // Over sm alone UCX cannot accept connections: clients connect by worker address.
  const bool tcp = std::string(std::getenv("UCX_TLS")).find("tcp") != std::string::npos;
  absl::StatusOr<std::string> addr = (*server)->WorkerAddress();
  if (tcp) addr = (*server)->Listen("127.0.0.1:0");
  if (!addr.ok()) return 1;
  std::string line = *addr + "\n";
  if (write(ready_fd, line.data(), line.size()) < 0) return 1;
  close(ready_fd);
  std::vector<transport::ServerRequest> batch;
  std::vector<float> rows;
  for (;;) {
    batch.clear();
    (*server)->Receive(std::chrono::milliseconds(100), &batch);
    for (auto& r : batch) {
      if (echo) {
        (*server)->Reply(r.token, std::move(r.bytes));
        continue;
      }
      auto v = wire::DecodeMessage(r.bytes.data(), r.bytes.size());
      std::vector<uint8_t> reply = (*server)->AcquireBuffer();
      if (!v.ok()) {
        wire::EncodeError(wire::Header(), "bad", &reply);
      } else {
        // A wire-v2 combine: one row per dispatched pair (its token's row bytes as they are).
        const size_t row_bytes = size_t{v->header.hidden_size} * 2;
        const uint32_t pair_count = v->header.pair_count;
        wire::Header h = v->header;
        h.token_count = 0;
        h.pair_count = 0;
        wire::EncodeCombine(h, nullptr, &reply);
        for (uint32_t p = 0; p < pair_count; ++p) {
          const uint8_t* row = v->rows + size_t{v->pair(p).token} * row_bytes;
          reply.insert(reply.end(), row, row + row_bytes);
        }
        uint32_t tokens = pair_count;
        uint64_t payload = size_t{pair_count} * row_bytes;
        std::memcpy(reply.data() + 28, &tokens, 4);
        std::memcpy(reply.data() + 44, &payload, 8);
      }
      (*server)->ReleaseBuffer(std::move(r.bytes));
      (*server)->Reply(r.token, std::move(reply));
    }
  }
}

// Runs ucx_perftest (server + client on 127.0.0.1) and returns the client's output.
std::string Perftest(const std::string& bin, const std::string& test, size_t size, int iters,
                     int port, int server_cpu, int client_cpu) {
  // Everything the child needs is made before fork (a habit worth keeping: a child of a process
  // with other threads that allocated could block forever on a malloc lock one of them held).
  const std::string port_arg = std::to_string(port);
  const pid_t server = fork();
  if (server == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    const int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 1);
    dup2(devnull, 2);
    PinTo(server_cpu);
    execl(bin.c_str(), bin.c_str(), "-p", port_arg.c_str(), nullptr);
    _exit(127);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const std::string pin =
      client_cpu >= 0 ? "taskset -c " + std::to_string(client_cpu) + " " : std::string();
  const std::string cmd = "timeout 60 " + pin + bin + " 127.0.0.1 -p " + std::to_string(port) +
                          " -t " + test + " -s " + std::to_string(size) + " -n " +
                          std::to_string(iters) + " -w " + std::to_string(kWarmup) + " -f 2>&1";
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    std::array<char, 4096> buf;
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
    pclose(p);
  }
  kill(server, SIGKILL);
  waitpid(server, nullptr, 0);
  return out;
}

// ucx_perftest -f ends with one line "iters p50-lat avg-lat overall-lat bw-avg bw-overall
// msgrate-avg msgrate-overall". Returns {median latency usec, overall bandwidth MB/s}.
std::pair<double, double> ParsePerftest(const std::string& out) {
  size_t end = out.find_last_not_of(" \n");
  if (end == std::string::npos) return {-1, -1};
  const size_t start = out.rfind('\n', end);
  const std::string line = out.substr(start == std::string::npos ? 0 : start + 1);
  double v[8] = {0};
  if (std::sscanf(line.c_str(), "%lf %lf %lf %lf %lf %lf %lf %lf", &v[0], &v[1], &v[2], &v[3],
                  &v[4], &v[5], &v[6], &v[7]) < 6) {
    return {-1, -1};
  }
  return {v[1], v[5]};
}

double Median(std::vector<double> v) {
  if (v.empty()) return -1;
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

// One size's figures for one round (all measured back to back, so a slow phase of this shared
// machine hits both sides of a ratio).
struct Round {
  double dmoe_lat_us = -1;     // p50 of RTT/2 over the round's round trips
  double perf_lat_us = -1;     // ucx_perftest tag_lat p50
  double dmoe_mbps = -1;       // dispatch + combine bytes/s, `window` round trips in flight
  double dmoe_disp_mbps = -1;  // dispatch bytes only
  double perf_mbps = -1;       // ucx_perftest tag_bw (one direction)
};

// What one size's measurement needs; the same for our client and for perftest.
struct Case {
  uint32_t hidden = 0, tokens = 0;
  size_t bytes = 0;  // the dispatch message
  int n = 0;         // round trips (latency) / messages (perftest)
  int window = 2;
  bool transport_only = false;
};

// The client process of one round: connects to the server at `addr`, measures latency (ping-pong
// p50) and bandwidth (`window` round trips in flight), and writes {lat, mbps, disp_mbps} to
// `out_fd`. Returns the process exit code.
int Client(const std::string& addr, const Case& c, int out_fd) {
  auto client = transport::NewUcxClient();
  if (!client.ok()) {
    std::fprintf(stderr, "client: %s\n", client.status().ToString().c_str());
    return 1;
  }
  auto peer = (*client)->Connect(addr);
  if (!peer.ok()) {
    std::fprintf(stderr, "connect: %s\n", peer.status().ToString().c_str());
    return 1;
  }
  const uint32_t tokens = c.tokens, hidden = c.hidden;
  std::vector<float> rows(size_t{tokens} * hidden);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = 0.25f + 1e-3f * static_cast<float>(i % 97);
  std::vector<wire::Pair> pairs;
  for (uint32_t t = 0; t < tokens; ++t) {
    pairs.push_back({t, 0, 0.5f});
    pairs.push_back({t, 1, 0.5f});
  }
  wire::Header h;
  h.token_count = tokens;
  h.hidden_size = hidden;
  h.dtype = wire::WireDType::kBF16;
  std::vector<uint8_t> msg;
  wire::EncodeDispatch(h, rows.data(), pairs, &msg);
  std::vector<uint8_t> reply;
  std::vector<float> out(hidden);
  // Transport only: an echoed reply holds the request's bytes and goes out again as the next
  // request, unwritten (as perftest re-sends one buffer: rewriting the payload every time costs,
  // between CPUs that share no cache, more than the transfer — that belongs to the codec runs).
  std::vector<std::vector<uint8_t>> echoes;
  auto next_request = [&]() {
    if (c.transport_only && !echoes.empty()) {
      std::vector<uint8_t> m = std::move(echoes.back());
      echoes.pop_back();
      return m;
    }
    std::vector<uint8_t> m = (*client)->AcquireBuffer();
    if (c.transport_only) {
      m.assign(msg.begin(), msg.end());
    } else {
      wire::EncodeDispatch(h, rows.data(), pairs, &m);
    }
    return m;
  };
  // Takes in a reply: the echo is checked (size and header) and kept for reuse; a combine is
  // decoded, and with `read_row` its last row read back to fp32 (as the engine does).
  auto take_reply = [&](bool read_row) -> bool {
    if (c.transport_only) {
      if (reply.size() != c.bytes ||
          std::memcmp(reply.data(), msg.data(), wire::kHeaderBytes) != 0) {
        return false;
      }
      echoes.push_back(std::move(reply));
    } else {
      auto v = wire::DecodeMessage(reply.data(), reply.size());
      if (!v.ok() || v->header.token_count != pairs.size()) return false;  // a row per pair
      if (read_row) v->RowToFloat(static_cast<uint32_t>(pairs.size()) - 1, out.data());
      (*client)->ReleaseBuffer(std::move(reply));
    }
    reply = std::vector<uint8_t>();
    return true;
  };
  // The client's share of one round trip: encode the dispatch, decode the combine and read its
  // rows back to fp32 (as the engine does).
  // One deadline for a whole loop (a clock read per round trip was ~4% of a small one; the
  // engine, too, sets one per layer, not per message).
  Clock::time_point deadline;
  auto round_trip = [&]() -> bool {
    auto id = (*client)->Post(*peer, next_request());
    if (!id.ok() || !(*client)->Wait(*id, deadline, &reply).ok()) {
      return false;
    }
    return take_reply(/*read_row=*/true);
  };
  deadline = Clock::now() + std::chrono::seconds(60);
  for (int i = 0; i < kWarmup; ++i) {
    if (!round_trip()) {
      std::fprintf(stderr, "warm-up round trip failed\n");
      return 1;
    }
  }
  // One time stamp per round trip, from the cycle counter where there is one (as perftest's
  // ucs_get_time): clock_gettime costs ~26 ns here, two per round trip were a tenth of a small
  // one. Ticks are converted with the rate measured over the whole loop.
  std::vector<double> times;
  times.reserve(static_cast<size_t>(c.n));
  deadline = Clock::now() + std::chrono::seconds(120);
  const auto wall0 = Clock::now();
  uint64_t prev = Ticks();
  const uint64_t tick0 = prev;
  for (int i = 0; i < c.n; ++i) {
    if (!round_trip()) {
      std::fprintf(stderr, "round trip failed\n");
      return 1;
    }
    const uint64_t now = Ticks();
    times.push_back(static_cast<double>(now - prev));
    prev = now;
  }
  const double seconds_per_tick = std::chrono::duration<double>(Clock::now() - wall0).count() /
                                  static_cast<double>(std::max<uint64_t>(1, prev - tick0));
  double result[3];
  result[0] = Median(times) * seconds_per_tick / 2 * 1e6;
  // Bandwidth: `window` round trips kept in flight (a sliding window, as perftest's tag_bw keeps
  // its sends outstanding): each reply taken in is followed at once by a new request.
  const int total = std::max(4 * c.window, c.n);
  std::vector<uint64_t> ids(static_cast<size_t>(c.window));
  auto post = [&](int k) -> bool {
    auto id = (*client)->Post(*peer, next_request());
    if (!id.ok()) {
      std::fprintf(stderr, "post: %s\n", id.status().ToString().c_str());
      return false;
    }
    ids[static_cast<size_t>(k % c.window)] = *id;
    return true;
  };
  const auto t0 = Clock::now();
  deadline = t0 + std::chrono::seconds(120);
  for (int k = 0; k < c.window; ++k) {
    if (!post(k)) return 1;
  }
  for (int k = 0; k < total; ++k) {
    const absl::Status st =
        (*client)->Wait(ids[static_cast<size_t>(k % c.window)], deadline, &reply);
    if (!st.ok() || !take_reply(/*read_row=*/false)) {
      std::fprintf(stderr, "windowed round trip failed: %s\n", st.ToString().c_str());
      return 1;
    }
    if (k + c.window < total && !post(k + c.window)) return 1;
  }
  const double per = std::chrono::duration<double>(Clock::now() - t0).count() / total;
  const size_t reply_bytes =
      c.transport_only ? c.bytes : wire::kHeaderBytes + pairs.size() * hidden * 2;
  result[1] = (c.bytes + reply_bytes) / per / 1e6;
  result[2] = c.bytes / per / 1e6;
  return write(out_fd, result, sizeof(result)) == sizeof(result) ? 0 : 1;
}

// Waits up to `limit` for `pid`; kills it if it is still running then. Returns its exit code,
// or -1 if it was killed or did not exit normally.
int WaitFor(pid_t pid, std::chrono::seconds limit) {
  const auto until = Clock::now() + limit;
  for (;;) {
    int status = 0;
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (r < 0) return -1;
    if (Clock::now() >= until) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// Our side of one round, in a fresh server process and a fresh client process (as perftest's
// are: a process's memory placement on this VM decides its speed for its lifetime, and one
// process pair for every round would weigh one draw against perftest's fresh ones).
// Returns false (with a message) if it failed.
bool RunOurs(const Case& c, int server_cpu, int client_cpu, Round* r) {
  int ready[2], result[2];
  if (pipe(ready) != 0) return false;
  if (pipe(result) != 0) {
    close(ready[0]);
    close(ready[1]);
    return false;
  }
  const pid_t server = fork();
  if (server == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    close(ready[0]);
    close(result[0]);
    close(result[1]);
    PinTo(server_cpu);
    _exit(Serve(ready[1], c.transport_only));
  }
  close(ready[1]);
  struct Reaper {  // the server is stopped on every way out of here
    pid_t pid;
    ~Reaper() {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  } reaper{server};
  // One line: HOST:PORT, or a worker address (over a kilobyte of hex over sm).
  std::string addr;
  char buf[4096];
  ssize_t got;
  while (addr.find('\n') == std::string::npos && (got = read(ready[0], buf, sizeof(buf))) > 0) {
    addr.append(buf, static_cast<size_t>(got));
  }
  close(ready[0]);
  if (addr.find('\n') == std::string::npos) {
    std::fprintf(stderr, "server did not start\n");
    close(result[0]);
    close(result[1]);
    return false;
  }
  addr.erase(addr.find('\n'));
  const pid_t client = fork();
  if (client == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    close(result[0]);
    PinTo(client_cpu);
    _exit(Client(addr, c, result[1]));
  }
  close(result[1]);
  double v[3] = {-1, -1, -1};
  size_t have = 0;
  while (have < sizeof(v)) {
    const ssize_t k = read(result[0], reinterpret_cast<char*>(v) + have, sizeof(v) - have);
    if (k <= 0) break;
    have += static_cast<size_t>(k);
  }
  close(result[0]);
  const int rc = WaitFor(client, std::chrono::seconds(120));
  if (have != sizeof(v) || rc != 0) {
    std::fprintf(stderr, "client failed (exit %d)\n", rc);
    return false;
  }
  r->dmoe_lat_us = v[0];
  r->dmoe_mbps = v[1];
  r->dmoe_disp_mbps = v[2];
  return true;
}

int Main(int argc, char** argv) {
  int iters = 2000;
  int rounds = 5;
  bool pin = true;
  bool transport_only = false;
  bool per_round = false;
  int window = 2;
  uint32_t only_hidden = 0, only_tokens = 0;
  std::string perftest = "/usr/bin/ucx_perftest";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else if (a == "--rounds" && i + 1 < argc) {
      rounds = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--hidden" && i + 1 < argc) {
      only_hidden = static_cast<uint32_t>(std::atoi(argv[++i]));
    } else if (a == "--tokens" && i + 1 < argc) {
      only_tokens = static_cast<uint32_t>(std::atoi(argv[++i]));
    } else if (a == "--window" && i + 1 < argc) {
      window = std::clamp(std::atoi(argv[++i]), 1, 256);
    } else if (a == "--transport-only") {
      transport_only = true;
    } else if (a == "--per-round") {
      per_round = true;
    } else if (a == "--no-pin") {
      pin = false;
    } else if (a == "--perftest" && i + 1 < argc) {
      perftest = argv[++i];
    } else {
      std::printf(
          "usage: transport_bench [--iters N] [--rounds R] [--no-pin] [--hidden H] [--tokens T]\n"
          "                       [--transport-only] [--window W] [--per-round] [--perftest PATH]\n"
          "Dispatch+combine round trips between two processes next to ucx_perftest, R rounds per\n"
          "size; each round starts fresh processes for both (ours: a server and a client) and\n"
          "measures them back to back, in alternating order. Uses UCX_TLS from the environment\n"
          "(default here: tcp,self; UCX_NET_DEVICES=lo). With 2+ CPUs the server side (ours and\n"
          "perftest's) runs on CPU 0 and the client side on CPU 1 unless --no-pin.\n"
          "--transport-only: the dispatch is encoded once, the server echoes requests without\n"
          "decoding them, and each echo goes out again as a later request, unwritten: the\n"
          "transport's own cost, as perftest measures UCX's (it re-sends one buffer).\n"
          "--window W: round trips kept in flight in the bandwidth test (default 2).\n"
          "--per-round: also print every round's figures (to stderr).\n");
      return a == "--help" ? 0 : 2;
    }
  }
  setenv("UCX_NET_DEVICES", "lo", 0);
  setenv("UCX_TLS", "tcp,self", 0);
  // Shared memory with peer-failure handling (as dmoe runs it; BUILD_NOTES.md); read at ucp_init.
  setenv("UCX_MM_ERROR_HANDLING", "y", 0);
  setenv("UCX_CMA_MEMORY_INVALIDATE", "y", 0);
  const bool pinning = pin && std::thread::hardware_concurrency() >= 2;
  const int server_cpu = pinning ? 0 : -1, client_cpu = pinning ? 1 : -1;
  // This process starts no UCX (no threads): every round forks fresh ones.
  PinTo(client_cpu);
  std::printf(
      "UCX_TLS=%s, %s; round trip = dispatch (bf16 rows + 2 pairs/token, encoded from fp32 each\n"
      "time) + combine (bf16, a row per pair: wire v2), decoded and validated on both sides. %d "
      "rounds per size,\n"
      "each in fresh processes for both sides; figures are medians over rounds, ratios the\n"
      "median of each round's ratio; 'best' is the best round of ours over perftest's best round\n"
      "(each process draws its speed on this VM: the best rounds compare like with like).\n"
      "latency: dmoe RTT/2 p50 vs ucx_perftest tag_lat p50 (both ping-pong, one-way time)\n"
      "bandwidth: dmoe bytes/s with %d round trips in flight, both directions (one direction in\n"
      "brackets) vs tag_bw (one direction, one reused buffer). Without a NIC both directions'\n"
      "copies run on the same two CPUs, so both-directions bytes/s is the figure to compare.\n"
      "codec: encode + decode of both messages per round trip (no transport), in us.\n%s",
      std::getenv("UCX_TLS"), pinning ? "server on CPU 0, client on CPU 1" : "not pinned", rounds,
      window,
      transport_only ? "TRANSPORT ONLY: requests pre-encoded, echoed undecoded, each echo re-sent "
                       "unwritten (codec not in the round trips).\n"
                     : "");
  std::printf("%6s %6s %9s | %9s %9s %6s %6s | %9s %9s %9s %6s %6s | %7s\n", "hidden", "tokens",
              "bytes", "dmoe us", "perf us", "ratio", "best", "dmoe MB/s", "(1 dir)", "perf MB/s",
              "ratio", "best", "codec");
  int port = 20000 + static_cast<int>(getpid() % 20000);
  for (uint32_t hidden : {256u, 5120u}) {
    for (uint32_t tokens : {1u, 16u, 64u, 256u}) {
      if ((only_hidden != 0 && hidden != only_hidden) ||
          (only_tokens != 0 && tokens != only_tokens)) {
        continue;
      }
      std::vector<float> rows(size_t{tokens} * hidden);
      for (size_t i = 0; i < rows.size(); ++i) rows[i] = 0.25f + 1e-3f * static_cast<float>(i % 97);
      std::vector<wire::Pair> pairs;
      for (uint32_t t = 0; t < tokens; ++t) {
        pairs.push_back({t, 0, 0.5f});
        pairs.push_back({t, 1, 0.5f});
      }
      wire::Header h;
      h.token_count = tokens;
      h.hidden_size = hidden;
      h.dtype = wire::WireDType::kBF16;
      std::vector<uint8_t> msg;
      wire::EncodeDispatch(h, rows.data(), pairs, &msg);
      Case c;
      c.hidden = hidden;
      c.tokens = tokens;
      c.bytes = msg.size();
      c.n = std::max(50, static_cast<int>(iters / (1 + c.bytes / 65536)));
      c.window = window;
      c.transport_only = transport_only;
      // Codec cost alone: the client's encode/decode plus the server's decode and reply build.
      double codec_us;
      {
        std::vector<float> out(hidden);
        std::vector<uint8_t> m, r;
        std::vector<float> pair_rows;  // the combine: a row per pair (wire v2)
        for (const wire::Pair& p : pairs) {
          pair_rows.insert(pair_rows.end(), rows.begin() + size_t{p.token} * hidden,
                           rows.begin() + size_t{p.token + 1} * hidden);
        }
        const int k = std::max(20, c.n / 4);
        const auto t0 = Clock::now();
        for (int i = 0; i < k; ++i) {
          wire::EncodeDispatch(h, rows.data(), pairs, &m);
          auto v = wire::DecodeMessage(m.data(), m.size());
          wire::Header rh = v->header;
          rh.kind = wire::Kind::kCombine;
          rh.token_count = rh.pair_count;
          rh.pair_count = 0;
          wire::EncodeCombine(rh, pair_rows.data(), &r);
          auto rv = wire::DecodeMessage(r.data(), r.size());
          rv->RowToFloat(rh.token_count - 1, out.data());
        }
        codec_us = std::chrono::duration<double>(Clock::now() - t0).count() / k * 1e6;
      }
      std::vector<Round> results;
      for (int rep = 0; rep < rounds; ++rep) {
        Round r;
        auto perf = [&] {
          r.perf_lat_us = ParsePerftest(Perftest(perftest, "tag_lat", c.bytes, c.n, port++,
                                                 server_cpu, client_cpu))
                              .first;
          r.perf_mbps = ParsePerftest(Perftest(perftest, "tag_bw", c.bytes, c.n, port++, server_cpu,
                                               client_cpu))
                            .second;
        };
        // Alternating which goes first cancels a steady drift of the machine's speed.
        if (rep % 2 == 1) perf();
        if (!RunOurs(c, server_cpu, client_cpu, &r)) return 1;
        if (rep % 2 == 0) perf();
        if (per_round) {
          std::fprintf(stderr, "  round %d: latency %.2f vs %.2f us, bandwidth %.1f vs %.1f MB/s\n",
                       rep, r.dmoe_lat_us, r.perf_lat_us, r.dmoe_mbps, r.perf_mbps);
        }
        results.push_back(r);
      }
      std::vector<double> dl, pl, lr, dm, dd, pm, br;
      for (const Round& r : results) {
        dl.push_back(r.dmoe_lat_us);
        dm.push_back(r.dmoe_mbps);
        dd.push_back(r.dmoe_disp_mbps);
        if (r.perf_lat_us > 0) {
          pl.push_back(r.perf_lat_us);
          lr.push_back(r.dmoe_lat_us / r.perf_lat_us);
        }
        if (r.perf_mbps > 0) {
          pm.push_back(r.perf_mbps);
          br.push_back(r.dmoe_mbps / r.perf_mbps);
        }
      }
      auto best = [](const std::vector<double>& v, bool low) {
        if (v.empty()) return -1.0;
        return low ? *std::min_element(v.begin(), v.end()) : *std::max_element(v.begin(), v.end());
      };
      const double best_lat = pl.empty() ? -1 : best(dl, true) / best(pl, true);
      const double best_bw = pm.empty() ? -1 : best(dm, false) / best(pm, false);
      std::printf(
          "%6u %6u %9zu | %9.2f %9.2f %6.2f %6.2f | %9.1f %9.1f %9.1f %6.2f %6.2f | %7.2f\n",
          hidden, tokens, c.bytes, Median(dl), Median(pl), Median(lr), best_lat, Median(dm),
          Median(dd), Median(pm), Median(br), best_bw, codec_us);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
