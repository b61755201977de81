// Data-plane benchmark (prints figures): dispatch + combine round trips through the UCX transport
// between two processes, with the real wire codec (bf16 rows, 2 pairs per token), at 1/16/64/256
// tokens and hidden sizes 256 and 5120, next to ucx_perftest's UCP tag latency and bandwidth for
// the same message sizes, measured in the same run over the same UCX_TLS.
//
//   bazel run -c opt //bench:transport_bench -- [--iters N] [--perftest /usr/bin/ucx_perftest]
#include <fcntl.h>
#include <signal.h>
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

// Server: validates each dispatch and answers with a combine of the same rows (no expert compute,
// no float conversion: this measures the data plane, not the shard's GEMMs).
int Serve(int ready_fd) {
  auto server = transport::NewUcxServer();
  if (!server.ok()) return 1;
  auto addr = (*server)->Listen("127.0.0.1:0");
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
                     int port) {
  const pid_t server = fork();
  if (server == 0) {
    const int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 1);
    dup2(devnull, 2);
    execl(bin.c_str(), bin.c_str(), "-p", std::to_string(port).c_str(), nullptr);
    _exit(127);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const std::string cmd = bin + " 127.0.0.1 -p " + std::to_string(port) + " -t " + test + " -s " +
                          std::to_string(size) + " -n " + std::to_string(iters) + " -w 100 -f 2>&1";
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

int Main(int argc, char** argv) {
  int iters = 2000;
  std::string perftest = "/usr/bin/ucx_perftest";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else if (a == "--perftest" && i + 1 < argc) {
      perftest = argv[++i];
    } else {
      std::printf(
          "usage: transport_bench [--iters N] [--perftest PATH]\n"
          "Uses UCX_TLS from the environment (default here: tcp,self; "
          "UCX_NET_DEVICES=lo).\n");
      return a == "--help" ? 0 : 2;
    }
  }
  setenv("UCX_NET_DEVICES", "lo", 0);
  setenv("UCX_TLS", "tcp,self", 0);
  int fds[2];
  if (pipe(fds) != 0) return 1;
  const pid_t server = fork();
  if (server == 0) {
    close(fds[0]);
    _exit(Serve(fds[1]));
  }
  close(fds[1]);
  char buf[256] = {0};
  const ssize_t got = read(fds[0], buf, sizeof(buf) - 1);
  close(fds[0]);
  if (got <= 0) {
    std::fprintf(stderr, "server did not start\n");
    return 1;
  }
  std::string addr(buf, static_cast<size_t>(got));
  addr.erase(addr.find('\n'));
  auto client = transport::NewUcxClient();
  if (!client.ok()) return 1;
  auto peer = (*client)->Connect(addr);
  if (!peer.ok()) return 1;
  std::printf(
      "UCX_TLS=%s; round trip = dispatch (bf16 rows + 2 pairs/token) + combine (bf16 rows)\n"
      "latency: dmoe RTT/2 vs ucx_perftest tag_lat (both ping-pong, one-way time)\n"
      "bandwidth: dmoe dispatch bytes/s with 8 round trips in flight vs tag_bw; best of 3 each\n",
      std::getenv("UCX_TLS"));
  std::printf("%6s %6s %10s | %12s %12s | %14s %14s | %9s %9s\n", "hidden", "tokens", "bytes",
              "dmoe RTT/2", "perftest lat", "dmoe MB/s (8)", "perftest MB/s", "lat ratio",
              "bw ratio");
  int port = 20000 + static_cast<int>(getpid() % 20000);
  for (uint32_t hidden : {256u, 5120u}) {
    for (uint32_t tokens : {1u, 16u, 64u, 256u}) {
      std::vector<float> rows(size_t{tokens} * hidden, 0.25f);
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
      double best = 1e30;
      for (int rep = 0; rep < 3; ++rep) {
        const auto t0 = Clock::now();
        for (int i = 0; i < n; ++i) {
          std::vector<uint8_t> m = (*client)->AcquireBuffer();
          wire::EncodeDispatch(h, rows.data(), pairs, &m);
          auto id = (*client)->Post(*peer, std::move(m));
          if (!id.ok() ||
              !(*client)->Wait(*id, Clock::now() + std::chrono::seconds(10), &reply).ok()) {
            std::fprintf(stderr, "round trip failed\n");
            return 1;
          }
          auto v = wire::DecodeMessage(reply.data(), reply.size());
          if (!v.ok()) return 1;
          (*client)->ReleaseBuffer(std::move(reply));
          reply = std::vector<uint8_t>();
        }
        best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count() / n);
      }
      const double half_rtt_us = best / 2 * 1e6;
      // Bandwidth with a window of 8 round trips in flight (as many shards / micro-batches give
      // in a real step): dispatch bytes per second, the direction perftest's tag_bw measures.
      constexpr int kWindow = 8;
      double best_window = 1e30;
      for (int rep = 0; rep < 3; ++rep) {
        const int rounds = std::max(4, n / kWindow);
        const auto t0 = Clock::now();
        uint64_t ids[kWindow];
        for (int r = 0; r < rounds; ++r) {
          for (int w = 0; w < kWindow; ++w) {
            std::vector<uint8_t> m = (*client)->AcquireBuffer();
            wire::EncodeDispatch(h, rows.data(), pairs, &m);
            ids[w] = *(*client)->Post(*peer, std::move(m));
          }
          for (int w = 0; w < kWindow; ++w) {
            if (!(*client)->Wait(ids[w], Clock::now() + std::chrono::seconds(10), &reply).ok()) {
              return 1;
            }
            (*client)->ReleaseBuffer(std::move(reply));
            reply = std::vector<uint8_t>();
          }
        }
        best_window =
            std::min(best_window,
                     std::chrono::duration<double>(Clock::now() - t0).count() / (rounds * kWindow));
      }
      const double mbps = bytes / best_window / 1e6;
      // Best of three for the reference too: this machine is shared and noisy.
      std::pair<double, double> lat = {1e30, -1}, bw = {-1, -1};
      for (int rep = 0; rep < 3; ++rep) {
        const auto l = ParsePerftest(Perftest(perftest, "tag_lat", bytes, n, port++));
        const auto b = ParsePerftest(Perftest(perftest, "tag_bw", bytes, n, port++));
        if (l.first > 0) lat.first = std::min(lat.first, l.first);
        bw.second = std::max(bw.second, b.second);
      }
      if (lat.first > 1e29) lat.first = -1;
      std::printf("%6u %6u %10zu | %10.2fus %10.2fus | %14.1f %14.1f | %9.2f %9.2f\n", hidden,
                  tokens, bytes, half_rtt_us, lat.first, mbps, bw.second,
                  lat.first > 0 ? half_rtt_us / lat.first : -1.0,
                  bw.second > 0 ? mbps / bw.second : -1.0);
      std::fflush(stdout);
    }
  }
  kill(server, SIGKILL);
  waitpid(server, nullptr, 0);
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
