// The /metrics exposer survives what any client can send it, in a process that links OpenBLAS like
// every dmoe service (its 60 KiB static TLS is what made civetweb's error page overflow its stack),
// and idle or slow connections do not keep /metrics from answering.
#include "common/metrics.h"

#include <arpa/inet.h>
#include <cblas.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe {
namespace {

int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Sends `request` (ignoring a server that closes early) and returns what comes back until the
// server closes or `timeout` passes.
std::string Exchange(int port, const std::string& request,
                     std::chrono::seconds timeout = std::chrono::seconds(10)) {
  const int fd = Connect(port);
  if (fd < 0) return "<connect failed>";
  timeval tv{};
  tv.tv_sec = timeout.count();
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  for (size_t at = 0; at < request.size();) {
    const ssize_t n = send(fd, request.data() + at, request.size() - at, MSG_NOSIGNAL);
    if (n <= 0) break;
    at += static_cast<size_t>(n);
  }
  std::string reply;
  char buf[4096];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;)
    reply.append(buf, static_cast<size_t>(n));
  close(fd);
  return reply;
}

std::string StatusLine(const std::string& reply) { return reply.substr(0, reply.find("\r\n")); }

class MetricsServer : public ::testing::Test {
 protected:
  void SetUp() override {
    // OpenBLAS is loaded here as in the services (referenced, so the linker keeps it).
    ASSERT_GE(openblas_get_num_threads(), 1);
    metrics_.Counter("dmoe_test_requests_total", "Requests.").Increment(3);
    auto addr = metrics_.Serve("127.0.0.1:0");
    ASSERT_TRUE(addr.ok()) << addr.status();
    port_ = std::stoi(addr->substr(addr->rfind(':') + 1));
  }

  void ExpectMetricsAnswer() {
    const std::string reply = Exchange(port_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_EQ(StatusLine(reply), "HTTP/1.1 200 OK");
    EXPECT_NE(reply.find("dmoe_test_requests_total 3"), std::string::npos) << reply;
  }

  Metrics metrics_;
  int port_ = 0;
};

TEST_F(MetricsServer, AnswersMetrics) { ExpectMetricsAnswer(); }

// process_start_time_seconds: this process's start, in Unix seconds (not later than now, and not
// before the test binary's own file was written by the build).
TEST_F(MetricsServer, ExportsTheProcessStartTime) {
  const double now = static_cast<double>(time(nullptr));
  const std::string reply = Exchange(port_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  const std::string key = "\nprocess_start_time_seconds ";
  const size_t at = reply.find(key);
  ASSERT_NE(at, std::string::npos) << reply;
  const double start = std::stod(reply.substr(at + key.size()));
  struct stat exe {};
  ASSERT_EQ(stat("/proc/self/exe", &exe), 0);
  EXPECT_LE(start, now + 1);
  EXPECT_GE(start, static_cast<double>(exe.st_mtime) - 1);
}

// dmoe_build_info: the VERSION file's version and the commit ("unstamped" in a plain build).
TEST_F(MetricsServer, ExportsTheBuildInfo) {
  std::ifstream in(std::string(std::getenv("TEST_SRCDIR")) + "/dmoe/VERSION");
  std::string version;
  ASSERT_TRUE(in >> version);
  const std::string reply = Exchange(port_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  const std::string line =
      "\ndmoe_build_info{commit=\"unstamped\",version=\"" + version + "\"} 1\n";
  EXPECT_NE(reply.find(line), std::string::npos) << reply.substr(0, 2000);
}

// Each of these went through civetweb's error page, which overflowed the worker's stack (SIGSEGV,
// the whole process) before //common:thread_stack.
TEST_F(MetricsServer, UnknownPathsGet404AndTheProcessLives) {
  for (const std::string& path : std::vector<std::string>{"/", "/nope", "/metric", "/favicon.ico",
                                                          "/" + std::string(10 << 10, 'a')}) {
    const std::string reply = Exchange(port_, "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n");
    const std::string status = StatusLine(reply);
    EXPECT_TRUE(status.rfind("HTTP/1.1 4", 0) == 0) << path.substr(0, 20) << ": " << status;
    EXPECT_NE(status, "HTTP/1.1 200 OK") << path.substr(0, 20);
  }
  ExpectMetricsAnswer();
}

TEST_F(MetricsServer, BadMethodsAndRequestsAreRefused) {
  const std::vector<std::string> requests = {
      "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
      "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + std::string(100000, 'p'),
      "DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
      "BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n",
      "\x01\x02\xff garbage \x7f\r\n\r\n",
      "GET /metrics HTTP/9.9\r\n\r\n",
      "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(1 << 20, 'h') + "\r\n\r\n",
      std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00", 33) +
          std::string(64, '\xff'),
  };
  for (const std::string& r : requests) {
    const std::string status = StatusLine(Exchange(port_, r));
    EXPECT_NE(status, "HTTP/1.1 200 OK") << r.substr(0, 20);
  }
  ExpectMetricsAnswer();
}

// More idle and slowloris connections than workers: each is dropped after the request timeout
// (2 s), so /metrics answers within a few seconds, not after civetweb's default 30 s per worker.
TEST_F(MetricsServer, IdleAndSlowConnectionsDoNotStarveMetrics) {
  std::vector<int> idle;
  for (int i = 0; i < 12; ++i) idle.push_back(Connect(port_));
  std::atomic<bool> stop{false};
  std::thread slow([&] {
    std::vector<int> fds;
    for (int i = 0; i < 4; ++i) fds.push_back(Connect(port_));
    const std::string header = "GET /metrics HTTP/1.1\r\nX-Slow: ";
    for (size_t k = 0; !stop; ++k) {
      for (int fd : fds) send(fd, &header[k % header.size()], 1, MSG_NOSIGNAL);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    for (int fd : fds) close(fd);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // they hold the workers first
  const auto start = std::chrono::steady_clock::now();
  ExpectMetricsAnswer();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 8.0) << "/metrics waited behind idle connections";
  stop = true;
  slow.join();
  for (int fd : idle) close(fd);
}

}  // namespace
}  // namespace dmoe
