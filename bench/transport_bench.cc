// Data-plane benchmark (prints figures): dispatch + combine round trips through the UCX transport
// between two processes, with the real wire codec (bf16 rows, 2 pairs per token), at 1/16/64/256
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
        // A combine header and the request's row bytes as they are.
        const size_t row_bytes = size_t{v->header.token_count} * v->header.hidden_size * 2;
        wire::Header h = v->header;
        h.token_count = 0;
        wire::EncodeCombine(h, nullptr, &reply);
        reply.insert(reply.end(), v->rows, v->rows + row_bytes);
        uint32_t tokens = v->header.token_count;
        uint64_t payload = row_bytes;
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
  // Everything the child needs is made before fork: this process has UCX threads, and a child
  // that allocated could block forever on a malloc lock one of them held.
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
                          std::to_string(iters) + " -w 100 -f 2>&1";
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
  double dmoe_mbps = -1;       // dispatch + combine bytes per second, 8 round trips in flight
  double dmoe_disp_mbps = -1;  // dispatch bytes only
  double perf_mbps = -1;       // ucx_perftest tag_bw (one direction)
};

int Main(int argc, char** argv) {
  int iters = 2000;
  int rounds = 5;
  bool pin = true;
  bool transport_only = false;
  int window = 8;
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
    } else if (a == "--no-pin") {
      pin = false;
    } else if (a == "--perftest" && i + 1 < argc) {
      perftest = argv[++i];
    } else {
      std::printf(
          "usage: transport_bench [--iters N] [--rounds R] [--no-pin] [--hidden H] [--tokens T]\n"
          "                       [--transport-only] [--window W] [--perftest PATH]\n"
          "Dispatch+combine round trips between two processes next to ucx_perftest, R rounds per\n"
          "size, each round measuring both back to back. Uses UCX_TLS from the environment\n"
          "(default here: tcp,self; UCX_NET_DEVICES=lo). With 2+ CPUs the server side (ours and\n"
          "perftest's) runs on CPU 0 and the client side on CPU 1 unless --no-pin.\n"
          "--transport-only: the dispatch is encoded once and copied into each request, and the\n"
          "server echoes requests without decoding them: the transport's own cost, as perftest\n"
          "measures UCX's.\n"
          "--window W: round trips in flight in the bandwidth test (default 8).\n");
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
  int fds[2];
  if (pipe(fds) != 0) return 1;
  const pid_t server = fork();
  if (server == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    close(fds[0]);
    PinTo(server_cpu);
    _exit(Serve(fds[1], transport_only));
  }
  close(fds[1]);
  // The server is stopped on every way out of here.
  struct Reaper {
    pid_t pid;
    ~Reaper() {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  } reaper{server};
  PinTo(client_cpu);
  // One line: HOST:PORT, or a worker address (over a kilobyte of hex over sm).
  std::string addr;
  char buf[4096];
  ssize_t got;
  while (addr.find('\n') == std::string::npos && (got = read(fds[0], buf, sizeof(buf))) > 0) {
    addr.append(buf, static_cast<size_t>(got));
  }
  close(fds[0]);
  if (addr.find('\n') == std::string::npos) {
    std::fprintf(stderr, "server did not start\n");
    return 1;
  }
  addr.erase(addr.find('\n'));
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
  std::printf(
      "UCX_TLS=%s, %s; round trip = dispatch (bf16 rows + 2 pairs/token, encoded from fp32 each\n"
      "time) + combine (bf16 rows), decoded and validated on both sides. %d rounds per size;\n"
      "figures are medians over rounds, ratios the median of each round's ratio.\n"
      "latency: dmoe RTT/2 p50 vs ucx_perftest tag_lat p50 (both ping-pong, one-way time)\n"
      "bandwidth: dmoe bytes/s with %d round trips in flight, both directions (one direction in\n"
      "brackets) vs tag_bw (one direction, one reused buffer). Without a NIC both directions'\n"
      "copies run on the same two CPUs, so both-directions bytes/s is the figure to compare.\n"
      "codec: encode + decode of both messages per round trip (no transport), in us.\n%s",
      std::getenv("UCX_TLS"), pinning ? "server on CPU 0, client on CPU 1" : "not pinned", rounds,
      window,
      transport_only ? "TRANSPORT ONLY: requests pre-encoded, echoed undecoded (codec not in the "
                       "round trips).\n"
                     : "");
  std::printf("%6s %6s %9s | %9s %9s %6s | %9s %9s %9s %6s | %7s\n", "hidden", "tokens", "bytes",
              "dmoe us", "perf us", "ratio", "dmoe MB/s", "(1 dir)", "perf MB/s", "ratio", "codec");
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
      const size_t bytes = msg.size();
      const int n = std::max(50, static_cast<int>(iters / (1 + bytes / 65536)));
      std::vector<uint8_t> reply;
      std::vector<float> out(hidden);
      auto encode = [&](std::vector<uint8_t>* m) {
        if (transport_only) {
          m->assign(msg.begin(), msg.end());
        } else {
          wire::EncodeDispatch(h, rows.data(), pairs, m);
        }
      };
      // The client's share of one round trip: encode the dispatch, decode the combine and read
      // its rows back to fp32 (as the engine does).
      auto round_trip = [&]() -> bool {
        std::vector<uint8_t> m = (*client)->AcquireBuffer();
        encode(&m);
        auto id = (*client)->Post(*peer, std::move(m));
        if (!id.ok() ||
            !(*client)->Wait(*id, Clock::now() + std::chrono::seconds(10), &reply).ok()) {
          return false;
        }
        if (transport_only) {
          if (reply.size() != bytes) return false;
        } else {
          auto v = wire::DecodeMessage(reply.data(), reply.size());
          if (!v.ok() || v->header.token_count != tokens) return false;
          v->RowToFloat(tokens - 1, out.data());
        }
        (*client)->ReleaseBuffer(std::move(reply));
        reply = std::vector<uint8_t>();
        return true;
      };
      // Codec cost alone: the client's encode/decode plus the server's decode and reply build.
      double codec_us;
      {
        std::vector<uint8_t> m, r;
        const int k = std::max(20, n / 4);
        const auto t0 = Clock::now();
        for (int i = 0; i < k; ++i) {
          wire::EncodeDispatch(h, rows.data(), pairs, &m);
          auto v = wire::DecodeMessage(m.data(), m.size());
          wire::Header rh = v->header;
          rh.kind = wire::Kind::kCombine;
          rh.pair_count = 0;
          wire::EncodeCombine(rh, rows.data(), &r);
          auto rv = wire::DecodeMessage(r.data(), r.size());
          rv->RowToFloat(tokens - 1, out.data());
        }
        codec_us = std::chrono::duration<double>(Clock::now() - t0).count() / k * 1e6;
      }
      std::vector<Round> results;
      for (int rep = 0; rep < rounds; ++rep) {
        Round r;
        for (int i = 0; i < 10; ++i) {  // warm-up
          if (!round_trip()) {
            std::fprintf(stderr, "warm-up round trip failed\n");
            return 1;
          }
        }
        std::vector<double> times;
        times.reserve(n);
        for (int i = 0; i < n; ++i) {
          const auto t0 = Clock::now();
          if (!round_trip()) {
            std::fprintf(stderr, "round trip failed\n");
            return 1;
          }
          times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        }
        r.dmoe_lat_us = Median(times) / 2 * 1e6;
        r.perf_lat_us =
            ParsePerftest(Perftest(perftest, "tag_lat", bytes, n, port++, server_cpu, client_cpu))
                .first;
        // Bandwidth with a window of 8 round trips in flight (as many shards / micro-batches give
        // in a real step).
        const int kWindow = window;
        const int windows = std::max(4, n / kWindow);
        const auto t0 = Clock::now();
        std::vector<uint64_t> ids(static_cast<size_t>(kWindow));
        for (int w0 = 0; w0 < windows; ++w0) {
          for (int w = 0; w < kWindow; ++w) {
            std::vector<uint8_t> m = (*client)->AcquireBuffer();
            encode(&m);
            auto id = (*client)->Post(*peer, std::move(m));
            if (!id.ok()) {
              std::fprintf(stderr, "post: %s\n", id.status().ToString().c_str());
              return 1;
            }
            ids[w] = *id;
          }
          for (int w = 0; w < kWindow; ++w) {
            const absl::Status st =
                (*client)->Wait(ids[w], Clock::now() + std::chrono::seconds(10), &reply);
            if (!st.ok() ||
                (!transport_only && !wire::DecodeMessage(reply.data(), reply.size()).ok())) {
              std::fprintf(stderr, "windowed round trip failed: %s\n", st.ToString().c_str());
              return 1;
            }
            (*client)->ReleaseBuffer(std::move(reply));
            reply = std::vector<uint8_t>();
          }
        }
        const double per =
            std::chrono::duration<double>(Clock::now() - t0).count() / (windows * kWindow);
        const size_t reply_bytes =
            transport_only ? bytes : wire::kHeaderBytes + size_t{tokens} * hidden * 2;
        r.dmoe_mbps = (bytes + reply_bytes) / per / 1e6;
        r.dmoe_disp_mbps = bytes / per / 1e6;
        r.perf_mbps =
            ParsePerftest(Perftest(perftest, "tag_bw", bytes, n, port++, server_cpu, client_cpu))
                .second;
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
      std::printf("%6u %6u %9zu | %9.2f %9.2f %6.2f | %9.1f %9.1f %9.1f %6.2f | %7.2f\n", hidden,
                  tokens, bytes, Median(dl), Median(pl), Median(lr), Median(dm), Median(dd),
                  Median(pm), Median(br), codec_us);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
