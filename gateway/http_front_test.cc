#include "gateway/http_front.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe::gateway {
namespace {

int ConnectTo(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(std::stoi(host_port.substr(colon + 1))));
  inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &a.sin_addr);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

// GET /version on `fd`: the status line of the answer ("" when none came).
std::string GetVersion(int fd) {
  const std::string req = "GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) return "";
  std::string got;
  char buf[4096];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) got.append(buf, static_cast<size_t>(n));
  return got.substr(0, got.find("\r\n"));
}

double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// Out of file descriptors, the listener cannot accept: it waits and tries again, rather than
// re-arming at once (which spun a core at 100 % for as long as the process had no descriptor to
// spare), and the connection waiting in the backlog is served once descriptors are free again.
TEST(HttpFront, OutOfDescriptorsTheListenerBacksOffAndRecovers) {
  NodePool pool({});
  ApiKeys keys;
  GatewayService service(&pool, &keys, GatewayOptions());
  HttpFrontOptions o;
  o.version = "test";
  HttpFront front(&service, o);
  auto addr = front.Start();
  ASSERT_TRUE(addr.ok()) << addr.status();
  {  // served as usual first
    const int fd = ConnectTo(*addr);
    ASSERT_GE(fd, 0);
    EXPECT_EQ(GetVersion(fd), "HTTP/1.1 200 OK");
    close(fd);
  }
  // Use up every descriptor but one, which the client's socket takes: the server's accept then
  // fails with EMFILE while the connection waits in the backlog.
  rlimit lim{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &lim), 0);
  const rlimit low{256, lim.rlim_max};
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  std::vector<int> hogs;
  for (int fd; (fd = open("/dev/null", O_RDONLY)) >= 0;) hogs.push_back(fd);
  ASSERT_FALSE(hogs.empty());
  close(hogs.back());
  hogs.pop_back();
  const int waiting = ConnectTo(*addr);
  ASSERT_GE(waiting, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the accept fails from now on
  const double cpu0 = CpuSeconds();
  const auto t0 = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double cpu = CpuSeconds() - cpu0;
  std::printf("out of descriptors: %.3f s of CPU in %.3f s\n", cpu, wall);
  EXPECT_LT(cpu, 0.25 * wall);  // spinning used a whole core (about 1 s)
  for (int fd : hogs) close(fd);
  EXPECT_EQ(GetVersion(waiting), "HTTP/1.1 200 OK");  // accepted once descriptors are free
  close(waiting);
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &lim), 0);
  front.Stop();
}

}  // namespace
}  // namespace dmoe::gateway
