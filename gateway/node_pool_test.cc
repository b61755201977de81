// NodePool against real gRPC servers on 127.0.0.1 that answer GetLoad with a chosen load: health
// follows the polls, Pick takes the less loaded of two, skips excluded and failed nodes, and
// returns -1 when none is healthy; a late poll is not a dead node; Add refuses duplicates.
#include "gateway/node_pool.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "gtest/gtest.h"

namespace dmoe::gateway {
namespace {

class LoadServer final : public internal::AttentionService::Service {
 public:
  explicit LoadServer(int64_t queued) : queued_(queued) {
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(this);
    server_ = b.BuildAndStart();
    address_ = "127.0.0.1:" + std::to_string(port);
  }
  ~LoadServer() override { Stop(); }
  grpc::Status GetLoad(grpc::ServerContext*, const internal::GetLoadRequest*,
                       internal::GetLoadReply* reply) override {
    ++polls;  // as it starts: the test's window then ends a whole poll period before the 3rd miss
    if (const int ms = delay_ms.load(); ms > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    }
    reply->set_total_blocks(10);
    reply->set_free_blocks(10);
    reply->set_queued_prefill_tokens(queued_.load());
    reply->set_draining(draining.load());
    return grpc::Status::OK;
  }
  void Stop() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
    server_.reset();
  }
  const std::string& address() const { return address_; }
  std::atomic<int64_t> queued_;
  std::atomic<int> delay_ms{0};  // answers GetLoad this late
  std::atomic<bool> draining{false};
  std::atomic<int> polls{0};

 private:
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

// Waits (bounded) until the pool reports `n` healthy nodes.
bool WaitHealthy(const NodePool& pool, size_t n) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < until) {
    if (pool.healthy() == n) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

TEST(NodePool, PicksTheLessLoadedHealthyNode) {
  LoadServer busy(500), idle(0);
  NodePool pool({busy.address(), idle.address()}, std::chrono::milliseconds(20));
  ASSERT_TRUE(WaitHealthy(pool, 2));
  // Two nodes: power-of-two choices compares both every time.
  for (int i = 0; i < 20; ++i) EXPECT_EQ(pool.Pick({}), 1);
  EXPECT_EQ(pool.Pick({1}), 0);  // excluded: the other one
  EXPECT_EQ(pool.Pick({0, 1}), -1);
  // Requests this gateway started count as load between polls (16 each).
  for (int i = 0; i < 40; ++i) pool.Started(1);
  EXPECT_EQ(pool.Pick({}), 0);
  for (int i = 0; i < 40; ++i) pool.Ended(1);
  EXPECT_EQ(pool.Pick({}), 1);
  // Failed: skipped until a poll succeeds again.
  pool.MarkFailed(1);
  EXPECT_EQ(pool.Pick({}), 0);
  ASSERT_TRUE(WaitHealthy(pool, 2));
  EXPECT_EQ(pool.Pick({}), 1);
}

TEST(NodePool, ANodeThatStopsAnsweringIsNotPicked) {
  LoadServer a(0), b(100);
  NodePool pool({a.address(), b.address()}, std::chrono::milliseconds(20));
  ASSERT_TRUE(WaitHealthy(pool, 2));
  a.Stop();
  ASSERT_TRUE(WaitHealthy(pool, 1));
  for (int i = 0; i < 10; ++i) EXPECT_EQ(pool.Pick({}), 1);
  b.Stop();
  ASSERT_TRUE(WaitHealthy(pool, 0));
  EXPECT_EQ(pool.Pick({}), -1);
}

// A busy node answers a poll after its 500 ms deadline: one late poll keeps it in the pool (the
// gateway's only node on a loaded machine must not refuse requests); three in a row make it
// unhealthy, yet with no healthy node left it is still tried (a refused node is not); a timely
// answer brings it back.
TEST(NodePool, ALatePollIsNotADeadNode) {
  LoadServer a(0);
  NodePool pool({a.address()}, std::chrono::milliseconds(20));
  ASSERT_TRUE(WaitHealthy(pool, 1));
  a.delay_ms = 700;
  const int before = a.polls.load();
  // Watch the pool until the server has begun a second late poll (the first has missed its
  // deadline by then): it stays healthy throughout.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (a.polls.load() < before + 2 && std::chrono::steady_clock::now() < until) {
    ASSERT_EQ(pool.healthy(), 1u);
    ASSERT_EQ(pool.Pick({}), 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_GE(a.polls.load(), before + 2);
  ASSERT_TRUE(WaitHealthy(pool, 0));  // late on and on: not healthy...
  EXPECT_EQ(pool.Pick({}), 0);        // ...but, the only node left, still tried (panic mode)
  EXPECT_EQ(pool.Pick({0}), -1);
  pool.MarkFailed(0);  // a request to it failed fast: down, not even tried
  EXPECT_EQ(pool.Pick({}), -1);
  a.delay_ms = 0;
  ASSERT_TRUE(WaitHealthy(pool, 1));
  EXPECT_EQ(pool.Pick({}), 0);
}

TEST(NodePool, AddRefusesDuplicatesAndPollsNewNodes) {
  LoadServer a(0);
  NodePool pool({}, std::chrono::milliseconds(20));
  EXPECT_EQ(pool.Pick({}), -1);
  EXPECT_TRUE(pool.Add(a.address()));
  EXPECT_FALSE(pool.Add(a.address()));
  EXPECT_EQ(pool.size(), 1u);
  ASSERT_TRUE(WaitHealthy(pool, 1));
  EXPECT_EQ(pool.Pick({}), 0);
}

// A node that says it is draining (SIGTERM) gets no new requests, though it answers: it would
// refuse them, and each refusal cost a request one of its attempts.
TEST(NodePool, ADrainingNodeIsNotPicked) {
  LoadServer a(0), b(100);
  NodePool pool({a.address(), b.address()}, std::chrono::milliseconds(20));
  ASSERT_TRUE(WaitHealthy(pool, 2));
  EXPECT_EQ(pool.Pick({}), 0);  // the less loaded
  a.draining = true;
  ASSERT_TRUE(WaitHealthy(pool, 1));
  for (int i = 0; i < 5; ++i) EXPECT_EQ(pool.Pick({}), 1);
}

// Nodes the router no longer lists and that do not answer are retired: no longer polled, not
// even tried in panic mode; a healthy node is kept though unlisted; listed again, one is back.
TEST(NodePool, UnlistedNodesThatDoNotAnswerAreRetired) {
  LoadServer a(0), b(0);
  NodePool pool({a.address(), b.address()}, std::chrono::milliseconds(20));
  ASSERT_TRUE(WaitHealthy(pool, 2));
  EXPECT_EQ(pool.Retire({}), 0);  // both answer: kept
  a.delay_ms = 1000;              // late for every poll (500 ms): unhealthy, not refused
  ASSERT_TRUE(WaitHealthy(pool, 1));
  EXPECT_EQ(pool.Pick({1}), 0);  // panic mode tries the late one
  EXPECT_EQ(pool.Retire({b.address()}), 1);
  EXPECT_EQ(pool.size(), 1u);
  EXPECT_EQ(pool.Pick({1}), -1);
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));  // a poll in flight ends
  const int polls = a.polls.load();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(a.polls.load(), polls) << "a retired node is still polled";
  a.delay_ms = 0;
  EXPECT_TRUE(pool.Add(a.address()));  // listed again
  EXPECT_EQ(pool.size(), 2u);
  EXPECT_TRUE(WaitHealthy(pool, 2));
}

// A retired node is forgotten once no request is on it (its channel closed): a long-lived gateway
// sees a new address for every attention pod restart, and it used to hold every one, taking no
// new node after max_nodes (16384). A node forgotten between a Pick and Started is not used.
TEST(NodePool, RetiredNodesAreForgottenOnceNoRequestIsOnThem) {
  // No polls after the first (an hour apart): no connection is ever made to these addresses.
  NodePool pool({}, std::chrono::hours(1), "", std::chrono::milliseconds(10000), /*max_nodes=*/8);
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(pool.Add("127.0.0.1:" + std::to_string(1 + i))) << "node " << i << " refused";
    ASSERT_EQ(pool.Retire({}), 1);  // never answered: retired, and forgotten at once
  }
  EXPECT_EQ(pool.held(), 0u);
  // With a request on it, a retired node is kept until the request ends.
  ASSERT_TRUE(pool.Add("127.0.0.1:1"));
  const int id = pool.Pick({});  // panic mode: not healthy yet, not refused
  ASSERT_GE(id, 100) << "numbers are never reused";
  ASSERT_NE(pool.Started(id), nullptr);
  EXPECT_EQ(pool.Retire({}), 1);
  EXPECT_EQ(pool.held(), 1u);
  EXPECT_EQ(pool.size(), 0u);
  EXPECT_EQ(pool.Pick({}), -1);
  pool.Ended(id);
  EXPECT_EQ(pool.held(), 0u);
  // Late calls about a forgotten node do nothing.
  EXPECT_EQ(pool.Started(id), nullptr);
  pool.MarkFailed(id);
  pool.Ended(id);
  EXPECT_EQ(pool.held(), 0u);
}

}  // namespace
}  // namespace dmoe::gateway
