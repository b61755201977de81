// The UCX data plane's cluster token (transport/ucx.h): a server started with a token serves only
// client endpoints whose hello carried it; requests of any other endpoint are dropped unanswered
// and counted, and the server keeps serving the clients that have it. Over tcp (listener) and
// shared memory (worker address), with UCX_NET_DEVICES=lo.
#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "transport/ucx.h"

namespace dmoe::transport {
namespace {

using std::chrono::milliseconds;

class UcxToken : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const bool sm = GetParam() == "sm";
    setenv("UCX_TLS", sm ? "sm,self" : "tcp,self", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
    setenv("UCX_MM_ERROR_HANDLING", "y", 1);
    setenv("UCX_CMA_MEMORY_INVALIDATE", "y", 1);
    auto server = NewUcxServer("s3cret-token");
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(server).value();
    auto listen = server_->Listen("127.0.0.1:0");
    ASSERT_TRUE(listen.ok()) << listen.status();
    address_ = sm ? server_->WorkerAddress() : *listen;
    echo_ = std::thread([this] {
      while (!stop_) {
        std::vector<ServerRequest> batch;
        server_->Receive(milliseconds(20), &batch);
        for (ServerRequest& r : batch) server_->Reply(r.token, std::move(r.bytes));
      }
    });
  }
  void TearDown() override {
    stop_ = true;
    if (echo_.joinable()) echo_.join();
    if (server_) server_->Shutdown();
  }

  // One round trip from a client with `token` (a message of `bytes`: large ones go by
  // rendezvous); the status of its Wait.
  absl::Status RoundTrip(ClientTransport* client, milliseconds deadline, size_t bytes = 5) {
    auto peer = client->Connect(address_);
    if (!peer.ok()) return peer.status();
    std::vector<uint8_t> msg(bytes);
    for (size_t i = 0; i < bytes; ++i) msg[i] = static_cast<uint8_t>(i * 7 + 1);
    auto id = client->Post(*peer, msg);
    if (!id.ok()) return id.status();
    std::vector<uint8_t> reply;
    const absl::Status st = client->Wait(*id, Clock::now() + deadline, &reply);
    if (st.ok() && reply != msg) return absl::InternalError("wrong reply");
    return st;
  }

  std::unique_ptr<UcxServer> server_;
  std::string address_;
  std::thread echo_;
  std::atomic<bool> stop_{false};
};

TEST_P(UcxToken, OnlyClientsWithTheTokenAreServed) {
  auto good = NewUcxClient("s3cret-token");
  auto wrong = NewUcxClient("s3cret-tokem");
  auto none = NewUcxClient();
  ASSERT_TRUE(good.ok() && wrong.ok() && none.ok());
  EXPECT_TRUE(RoundTrip(good->get(), milliseconds(20000)).ok());
  EXPECT_EQ(RoundTrip(wrong->get(), milliseconds(500)).code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(RoundTrip(none->get(), milliseconds(500)).code(), absl::StatusCode::kDeadlineExceeded);
  // A large request (rendezvous) refused: UCX cancels it (it once freed its descriptor twice).
  EXPECT_EQ(RoundTrip(none->get(), milliseconds(500), 1 << 20).code(),
            absl::StatusCode::kDeadlineExceeded);
  // The server goes on serving the client that has it, small and large.
  EXPECT_TRUE(RoundTrip(good->get(), milliseconds(20000)).ok());
  EXPECT_TRUE(RoundTrip(good->get(), milliseconds(20000), 1 << 20).ok());
  const ServerStats s = server_->stats();
  EXPECT_EQ(s.refused_peers, 3u);     // each RoundTrip connects anew: wrong token once, none twice
  EXPECT_EQ(s.refused_requests, 3u);  // one request each, and the large one
  EXPECT_EQ(s.requests, 3u);          // only the good client's reached the server's queue
  EXPECT_EQ(s.replies, 3u);
}

INSTANTIATE_TEST_SUITE_P(Tls, UcxToken, ::testing::Values("tcp", "sm"));

}  // namespace
}  // namespace dmoe::transport
