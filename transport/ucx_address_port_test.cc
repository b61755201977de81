// The UCX server's address port (HOST:PORT, answering every connection with the worker address)
// keeps answering after accept(2) fails with an error the man page says to retry (EPROTO, EPERM
// from a firewall, ENETDOWN, ...). accept4 is interposed here: the first call fails with EPROTO.
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "gtest/gtest.h"
#include "transport/ucx.h"

namespace {
std::atomic<int> g_fail_accepts{0};
std::atomic<int> g_failed{0};
}  // namespace

extern "C" int accept4(int fd, sockaddr* addr, socklen_t* len, int flags) {
  using Accept4 = int (*)(int, sockaddr*, socklen_t*, int);
  static const auto real = reinterpret_cast<Accept4>(dlsym(RTLD_NEXT, "accept4"));
  if (g_fail_accepts.fetch_sub(1) > 0) {
    ++g_failed;
    errno = EPROTO;
    return -1;
  }
  return real(fd, addr, len, flags);
}

namespace dmoe::transport {
namespace {

// The address port stopped for good after one such error (its thread returned): the port stayed
// open, connections waited in its backlog, and every connect by HOST:PORT failed while the shard
// looked healthy.
TEST(UcxAddressPort, AnswersAfterAnAcceptError) {
  setenv("UCX_TLS", "tcp,self", 1);
  setenv("UCX_NET_DEVICES", "lo", 1);
  setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);
  g_fail_accepts = 1;  // the address port's first accept fails
  auto server = NewUcxServer();
  ASSERT_TRUE(server.ok()) << server.status();
  auto listen = (*server)->Listen("127.0.0.1:0");
  ASSERT_TRUE(listen.ok()) << listen.status();
  auto client = NewUcxClient();
  ASSERT_TRUE(client.ok()) << client.status();
  auto peer = (*client)->Connect(*listen);
  EXPECT_EQ(g_failed.load(), 1);
  EXPECT_TRUE(peer.ok()) << peer.status();
  client->reset();
  (*server)->Shutdown();
}

}  // namespace
}  // namespace dmoe::transport
