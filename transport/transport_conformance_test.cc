// One suite, run against every transport: inproc, UCX over tcp (listener) and UCX over shared
// memory (worker address), with UCX_NET_DEVICES=lo.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <functional>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "transport/inproc.h"
#include "transport/transport.h"
#include "transport/ucx.h"

namespace dmoe::transport {
namespace {

using std::chrono::milliseconds;

struct Pair {
  std::unique_ptr<ServerTransport> server;
  std::string address;
  std::function<std::unique_ptr<ClientTransport>()> new_client;
};

Pair MakeInproc() {
  Pair p;
  p.server = NewInprocServer();
  p.address = *p.server->Listen("inproc:0");
  p.new_client = [] { return NewInprocClient(); };
  return p;
}

Pair MakeUcx(const std::string& tls, bool by_worker_address) {
  setenv("UCX_TLS", tls.c_str(), 1);
  setenv("UCX_NET_DEVICES", "lo", 1);
  // Shared memory keeps peer-failure handling only with these (BUILD_NOTES.md).
  setenv("UCX_MM_ERROR_HANDLING", "y", 1);
  setenv("UCX_CMA_MEMORY_INVALIDATE", "y", 1);
  setenv("UCX_KEEPALIVE_INTERVAL", "1s", 1);
  Pair p;
  auto server = NewUcxServer();
  EXPECT_TRUE(server.ok()) << server.status();
  auto listen = (*server)->Listen("127.0.0.1:0");
  EXPECT_TRUE(listen.ok()) << listen.status();
  p.address = by_worker_address ? (*server)->WorkerAddress() : *listen;
  p.server = std::move(server).value();
  p.new_client = [] {
    auto c = NewUcxClient();
    EXPECT_TRUE(c.ok()) << c.status();
    return std::move(c).value();
  };
  return p;
}

class TransportConformance : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const std::string kind = GetParam();
    if (kind == "inproc") {
      pair_ = MakeInproc();
    } else if (kind == "ucx_tcp") {
      pair_ = MakeUcx("tcp,self", false);
    } else {
      pair_ = MakeUcx("sm,self", true);
    }
  }
  void TearDown() override {
    StopEcho();
    if (pair_.server) pair_.server->Shutdown();
  }

  // Serves every request with its bytes reversed, until StopEcho.
  void StartEcho() {
    echo_ = std::thread([this] {
      while (!stop_) {
        std::vector<ServerRequest> batch;
        pair_.server->Receive(milliseconds(20), &batch);
        for (ServerRequest& r : batch) {
          std::vector<uint8_t> reply(r.bytes.rbegin(), r.bytes.rend());
          pair_.server->ReleaseBuffer(std::move(r.bytes));
          pair_.server->Reply(r.token, std::move(reply));
        }
      }
    });
  }
  void StopEcho() {
    stop_ = true;
    if (echo_.joinable()) echo_.join();
  }

  Pair pair_;
  std::thread echo_;
  std::atomic<bool> stop_{false};
};

std::vector<uint8_t> Pattern(size_t n, int salt) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(i * 31 + salt);
  return v;
}

TEST_P(TransportConformance, RoundTripsOfEverySize) {
  StartEcho();
  auto client = pair_.new_client();
  auto peer = client->Connect(pair_.address);
  ASSERT_TRUE(peer.ok()) << peer.status();
  for (size_t n :
       {size_t{1}, size_t{64}, size_t{4096}, size_t{65536}, size_t{1} << 20, size_t{5} << 20}) {
    const std::vector<uint8_t> msg = Pattern(n, static_cast<int>(n));
    auto id = client->Post(*peer, msg);
    ASSERT_TRUE(id.ok()) << id.status();
    std::vector<uint8_t> reply;
    const absl::Status st = client->Wait(*id, Clock::now() + std::chrono::seconds(20), &reply);
    ASSERT_TRUE(st.ok()) << n << ": " << st;
    ASSERT_EQ(reply.size(), n);
    EXPECT_TRUE(std::equal(reply.begin(), reply.end(), msg.rbegin())) << n;
  }
  EXPECT_GE(pair_.server->stats().requests, 6u);
}

// Buffers are recycled with their old contents (not cleared): every size after every other,
// small after large and large after small, must come back exactly.
TEST_P(TransportConformance, MixedSizesReuseBuffersWithoutStaleBytes) {
  StartEcho();
  auto client = pair_.new_client();
  auto peer = client->Connect(pair_.address);
  ASSERT_TRUE(peer.ok()) << peer.status();
  const size_t sizes[] = {size_t{3} << 20, 17, size_t{300} << 10, 4096, 1, size_t{1} << 20, 65};
  for (int round = 0; round < 3; ++round) {
    for (size_t k = 0; k < std::size(sizes); ++k) {
      const size_t n = sizes[(k * 3 + static_cast<size_t>(round)) % std::size(sizes)];
      std::vector<uint8_t> msg = client->AcquireBuffer();
      const std::vector<uint8_t> want = Pattern(n, round * 7 + static_cast<int>(k));
      msg.assign(want.begin(), want.end());
      auto id = client->Post(*peer, std::move(msg));
      ASSERT_TRUE(id.ok()) << id.status();
      std::vector<uint8_t> reply;
      const absl::Status st = client->Wait(*id, Clock::now() + std::chrono::seconds(20), &reply);
      ASSERT_TRUE(st.ok()) << n << ": " << st;
      ASSERT_EQ(reply.size(), n);
      EXPECT_TRUE(std::equal(reply.begin(), reply.end(), want.rbegin())) << n;
      client->ReleaseBuffer(std::move(reply));
    }
  }
}

// Nobody waits: the transport's own progress must still move requests and replies (small and
// rendezvous-sized) to completion, which Poll then reports.
TEST_P(TransportConformance, RequestsCompleteWithoutAWaiter) {
  StartEcho();
  auto client = pair_.new_client();
  auto peer = client->Connect(pair_.address);
  ASSERT_TRUE(peer.ok()) << peer.status();
  const std::vector<uint8_t> small = Pattern(64, 5), large = Pattern(size_t{2} << 20, 6);
  auto a = client->Post(*peer, small);
  auto b = client->Post(*peer, large);
  ASSERT_TRUE(a.ok() && b.ok());
  const auto give_up = Clock::now() + std::chrono::seconds(20);
  while (!(client->Poll(*a) && client->Poll(*b)) && Clock::now() < give_up) {
    std::this_thread::sleep_for(milliseconds(1));
  }
  ASSERT_TRUE(client->Poll(*a) && client->Poll(*b)) << "no progress without a waiter";
  std::vector<uint8_t> reply;
  ASSERT_TRUE(client->Wait(*a, Clock::now(), &reply).ok());
  EXPECT_TRUE(std::equal(reply.begin(), reply.end(), small.rbegin()));
  ASSERT_TRUE(client->Wait(*b, Clock::now(), &reply).ok());
  ASSERT_EQ(reply.size(), large.size());
  EXPECT_TRUE(std::equal(reply.begin(), reply.end(), large.rbegin()));
}

TEST_P(TransportConformance, ManyClientsManyRequestsInFlight) {
  StartEcho();
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int c = 0; c < 3; ++c) {
    threads.emplace_back([&, c] {
      auto client = pair_.new_client();
      auto peer = client->Connect(pair_.address);
      if (!peer.ok()) return;
      std::vector<uint64_t> ids;
      std::vector<std::vector<uint8_t>> sent;
      for (int i = 0; i < 20; ++i) {
        sent.push_back(Pattern(100 + 997 * i, c * 50 + i));
        auto id = client->Post(*peer, sent.back());
        if (!id.ok()) return;
        ids.push_back(*id);
      }
      for (size_t i = 0; i < ids.size(); ++i) {
        std::vector<uint8_t> reply;
        if (!client->Wait(ids[i], Clock::now() + std::chrono::seconds(20), &reply).ok()) return;
        if (std::equal(reply.begin(), reply.end(), sent[i].rbegin()) &&
            reply.size() == sent[i].size()) {
          ++ok;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 60);
}

TEST_P(TransportConformance, OneClientSharedByThreadsAndStaleIdsRefused) {
  // Posts and waits from several threads on one client at once, while another thread waits on
  // ids that are spent or were never given (Wait looks at a slot without a lock before it spins).
  StartEcho();
  auto client = pair_.new_client();
  auto peer = client->Connect(pair_.address);
  ASSERT_TRUE(peer.ok());
  std::atomic<int> ok{0}, posted{0}, refused{0}, other{0};
  std::atomic<bool> stale_done{false};
  std::vector<uint64_t> spent;
  for (int i = 0; i < 4; ++i) {
    auto id = client->Post(*peer, Pattern(64, 90 + i));
    ASSERT_TRUE(id.ok());
    std::vector<uint8_t> reply;
    ASSERT_TRUE(client->Wait(*id, Clock::now() + std::chrono::seconds(20), &reply).ok());
    spent.push_back(*id);
  }
  // A fixed number of stale waits, all while the other threads post and wait: they keep going
  // until the stale thread is done (at least 30 round trips each).
  constexpr int kStaleRounds = 20;
  std::thread stale([&] {
    for (int round = 0; round < kStaleRounds; ++round) {
      for (uint64_t id : {spent[0], spent[3], uint64_t{12345}, uint64_t{0}}) {
        std::vector<uint8_t> reply;
        const absl::Status st = client->Wait(id, Clock::now() + milliseconds(50), &reply);
        if (st.code() == absl::StatusCode::kInvalidArgument) {
          ++refused;
        } else {
          ++other;
        }
      }
    }
    stale_done = true;
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 30 || !stale_done.load(); ++i) {
        ++posted;
        const std::vector<uint8_t> sent = Pattern(50 + 700 * ((i + t) % 5), t * 100 + i);
        auto id = client->Post(*peer, sent);
        if (!id.ok()) return;
        std::vector<uint8_t> reply;
        if (!client->Wait(*id, Clock::now() + std::chrono::seconds(20), &reply).ok()) return;
        if (reply.size() == sent.size() && std::equal(reply.begin(), reply.end(), sent.rbegin())) {
          ++ok;
        }
        client->ReleaseBuffer(std::move(reply));
      }
    });
  }
  stale.join();
  for (auto& th : threads) th.join();
  EXPECT_GE(posted.load(), 90);
  EXPECT_EQ(ok.load(), posted.load());
  EXPECT_EQ(refused.load(), 4 * kStaleRounds);
  EXPECT_EQ(other.load(), 0);
}

TEST_P(TransportConformance, DeadlineWithoutReplyThenLateReplyIsDropped) {
  auto client = pair_.new_client();
  auto peer = client->Connect(pair_.address);
  ASSERT_TRUE(peer.ok());
  auto id = client->Post(*peer, Pattern(128, 1));
  ASSERT_TRUE(id.ok());
  std::vector<uint8_t> reply;
  const auto start = Clock::now();
  const absl::Status st = client->Wait(*id, start + milliseconds(200), &reply);
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
  // The server answers late; the client drops it and keeps working.
  StartEcho();
  auto id2 = client->Post(*peer, Pattern(300, 2));
  ASSERT_TRUE(id2.ok());
  EXPECT_TRUE(client->Wait(*id2, Clock::now() + std::chrono::seconds(20), &reply).ok());
  EXPECT_EQ(reply.size(), 300u);
}

// A peer replaced by a new connection (attention_service/shard_client.cc) is disconnected: its
// unanswered requests end UNAVAILABLE at once, not at their deadlines, it takes no more, and the
// server serves the client's new connection.
TEST_P(TransportConformance, DisconnectEndsAPeersRequestsAndANewConnectionServes) {
  auto client = pair_.new_client();
  auto old_peer = client->Connect(pair_.address);
  ASSERT_TRUE(old_peer.ok()) << old_peer.status();
  std::vector<uint8_t> reply;
  StartEcho();  // one answered request first: the connection is wired up
  auto first = client->Post(*old_peer, Pattern(64, 1));
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(client->Wait(*first, Clock::now() + std::chrono::seconds(20), &reply).ok());
  StopEcho();
  stop_ = false;
  std::vector<uint64_t> ids;
  for (int i = 0; i < 3; ++i) {  // nobody answers these
    auto id = client->Post(*old_peer, Pattern(256, 2 + i));
    ASSERT_TRUE(id.ok()) << id.status();
    ids.push_back(*id);
  }
  const auto start = Clock::now();
  client->Disconnect(*old_peer);
  client->Disconnect(*old_peer);  // twice: nothing more happens
  for (uint64_t id : ids) {
    const absl::Status st = client->Wait(id, start + std::chrono::seconds(30), &reply);
    EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
    EXPECT_NE(st.message().find("disconnected by this node"), absl::string_view::npos) << st;
  }
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
  auto after = client->Post(*old_peer, Pattern(64, 9));
  EXPECT_EQ(after.status().code(), absl::StatusCode::kUnavailable) << after.status();
  // The server answers again (the old requests' replies are dropped); a new connection works.
  StartEcho();
  auto fresh = client->Connect(pair_.address);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_NE(*fresh, *old_peer);
  auto id = client->Post(*fresh, Pattern(300, 7));
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(client->Wait(*id, Clock::now() + std::chrono::seconds(20), &reply).ok());
  const std::vector<uint8_t> sent = Pattern(300, 7);
  EXPECT_EQ(reply, std::vector<uint8_t>(sent.rbegin(), sent.rend()));
}

TEST_P(TransportConformance, ServerShutDownFailsInFlightRequests) {
  if (GetParam() == "ucx_sm") {
    // UCX's keepalive over shared memory asks whether the peer *process* lives, so a server shut
    // down inside the client's own process is never noticed; ServerProcessKilled covers sm.
    GTEST_SKIP() << "sm: a server in the client's own process; see ServerProcessKilled...";
  }
  auto client = pair_.new_client();
  auto peer = client->Connect(pair_.address);
  ASSERT_TRUE(peer.ok());
  StartEcho();
  {  // Establish the connection first.
    auto id = client->Post(*peer, Pattern(16, 3));
    std::vector<uint8_t> reply;
    ASSERT_TRUE(client->Wait(*id, Clock::now() + std::chrono::seconds(20), &reply).ok());
  }
  StopEcho();  // nobody answers: the next request stays in flight until the server goes
  auto id = client->Post(*peer, Pattern(16, 4));
  ASSERT_TRUE(id.ok());
  pair_.server->Shutdown();
  std::vector<uint8_t> reply;
  // The transport must notice the server is gone, not wait out the deadline.
  const absl::Status st = client->Wait(*id, Clock::now() + std::chrono::seconds(30), &reply);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
}

// A server shut down while a thread keeps replying: a Reply past its check of the server's state
// posts its send outside the lock, and Shutdown could close the endpoints and destroy the worker
// under it (a use after free in ucp_am_send_nbx; found by reading, the window is microseconds).
// Shutdown now waits for those posts; every request ends and the replies after it are dropped.
// 8 rounds of 64 requests, shut down after the first few replies. (It did not reproduce the race
// without the fix in 10 runs: the window is a few instructions wide; it guards the path.)
TEST_P(TransportConformance, RepliesRacingAShutdownNeverUseAClosedWorker) {
  for (int round = 0; round < 8; ++round) {
    TearDown();
    stop_ = false;
    SetUp();
    auto client = pair_.new_client();
    auto peer = client->Connect(pair_.address);
    ASSERT_TRUE(peer.ok()) << peer.status();
    std::vector<uint64_t> ids;
    for (int i = 0; i < 64; ++i) {
      auto id = client->Post(*peer, Pattern(4096, i));
      ASSERT_TRUE(id.ok()) << id.status();
      ids.push_back(*id);
    }
    // Every request received first (Receive is not called during Shutdown: a service stops its
    // receiving loop first), then one thread only replies while Shutdown runs.
    std::vector<ServerRequest> got;
    const auto until = Clock::now() + std::chrono::seconds(20);
    while (got.size() < ids.size() && Clock::now() < until) {
      pair_.server->Receive(milliseconds(20), &got);
    }
    ASSERT_EQ(got.size(), ids.size());
    std::atomic<int> replied{0};
    std::thread replier([&] {
      for (ServerRequest& r : got) {
        pair_.server->Reply(r.token, std::vector<uint8_t>(r.bytes.rbegin(), r.bytes.rend()));
        replied.fetch_add(1);
      }
    });
    while (replied.load() < 2 + round && Clock::now() < until) std::this_thread::yield();
    pair_.server->Shutdown();
    replier.join();
    // Every request ends: answered, failed once the server is gone, or (sm, where a server in
    // this process is never seen to go) at the deadline.
    const auto deadline = Clock::now() + milliseconds(500);
    for (uint64_t id : ids) {
      std::vector<uint8_t> reply;
      const absl::Status st = client->Wait(id, deadline, &reply);
      EXPECT_TRUE(st.ok() || st.code() == absl::StatusCode::kUnavailable ||
                  st.code() == absl::StatusCode::kDeadlineExceeded)
          << st;
    }
    const ServerStats stats = pair_.server->stats();
    EXPECT_GE(stats.replies, 2u + static_cast<uint64_t>(round));
  }
}

// Starts transport/silent_server (answers nothing); returns its pid and address ({-1, ""} on
// failure): its UCX worker address over sm (or with `by_worker`), else its HOST:PORT.
std::pair<pid_t, std::string> StartSilentServer(const std::string& transport,
                                                bool by_worker = false) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  if (srcdir == nullptr) return {-1, ""};
  int out[2];
  if (pipe(out) != 0) return {-1, ""};
  const std::string bin = std::string(srcdir) + "/dmoe/transport/silent_server";
  const pid_t pid = fork();
  if (pid < 0) {
    close(out[0]);
    close(out[1]);
    return {-1, ""};
  }
  if (pid == 0) {
    dup2(out[1], 1);
    close(out[0]);
    setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);  // UCX's warnings go to stdout
    execl(bin.c_str(), bin.c_str(), transport == "ucx_sm" || by_worker ? "--worker-address" : "",
          nullptr);
    _exit(127);
  }
  close(out[1]);
  std::string address;
  char c;
  while (read(out[0], &c, 1) == 1 && c != '\n') address += c;
  close(out[0]);
  return {pid, address};
}

// Kills and reaps a child process whichever way a test ends (pid <= 0: nothing to do).
struct Reaper {
  pid_t pid;
  ~Reaper() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
};

// Threads posting on one endpoint while its server process is SIGKILLed: the failed endpoint
// is closed (by the progress thread) only once no Post is still sending on it. Closing it under
// a send crashed the attention node (SIGSEGV in ucp_am_send_nbx) when a shard was killed with
// streams running. Every thread ends with UNAVAILABLE; the process survives. 6 kills.
TEST_P(TransportConformance, PostsRacingAServerKillNeverUseAClosedEndpoint) {
  if (GetParam() == "inproc") GTEST_SKIP() << "inproc has no other process";
  for (int round = 0; round < 6; ++round) {
    auto [pid, address] = StartSilentServer(GetParam());
    Reaper reaper{pid};
    ASSERT_GT(pid, 0);
    ASSERT_FALSE(address.empty()) << "the server process printed no address";
    auto client = pair_.new_client();
    auto peer = client->Connect(address);
    ASSERT_TRUE(peer.ok()) << peer.status();
    // Under load the kill sometimes comes before the UCX wireup has finished (7-12 ms after the
    // connect in 2-4 runs of 30). Over sm the keepalive never fails such a peer; the client's
    // wireup bound (5 s) does, within the threads' 10 s (AServerHungDuringTheWireup...).
    std::atomic<int> posted{0}, unavailable{0}, finished{0};
    // The threads post until they fail or until this deadline: 10 s after the kill (a killed
    // peer is noticed within ~1 s, the sm keepalive), 30 s from now until then. (A deadline
    // counted from the threads' start left too little time after a kill that came late on a
    // loaded machine: a CI run once saw no thread fail over sm.)
    const auto ticks = [](Clock::time_point t) { return t.time_since_epoch().count(); };
    const auto start = Clock::now();
    std::atomic<Clock::rep> stop_at{ticks(start + std::chrono::seconds(30))};
    std::atomic<bool> killed{false};
    std::string last_errors[3];  // what each thread saw last, for a failure's message
    int posts_after_kill[3] = {0, 0, 0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t) {
      threads.emplace_back([&, t] {
        std::vector<uint64_t> ids;
        std::vector<uint8_t> reply;
        bool failed = false;
        while (!failed && ticks(Clock::now()) < stop_at.load()) {
          auto id = client->Post(*peer, Pattern(64, static_cast<uint8_t>(t)));
          if (!id.ok()) {
            failed = id.status().code() == absl::StatusCode::kUnavailable;
            last_errors[t] = id.status().ToString();
            std::this_thread::yield();  // full: the waits below free slots
          } else {
            ids.push_back(*id);
            ++posted;
            if (killed.load()) ++posts_after_kill[t];
          }
          if (ids.size() >= 8) {  // nothing answers: each wait ends at its deadline or the failure
            const absl::Status st = client->Wait(ids.front(), Clock::now(), &reply);
            ids.erase(ids.begin());
            (void)st;
          }
        }
        for (uint64_t id : ids) (void)client->Wait(id, Clock::now() + milliseconds(100), &reply);
        if (failed) ++unavailable;
        ++finished;
      });
    }
    for (const auto until = Clock::now() + std::chrono::seconds(10);
         posted.load() < 200 && finished.load() < 3 && Clock::now() < until;) {
      std::this_thread::yield();
    }
    EXPECT_GE(posted.load(), 200) << "the posts did not get going before the kill";
    kill(pid, SIGKILL);
    const auto kill_time = Clock::now();
    stop_at = ticks(kill_time + std::chrono::seconds(10));
    killed = true;
    waitpid(pid, nullptr, 0);
    reaper.pid = -1;
    for (auto& th : threads) th.join();
    ASSERT_EQ(3, unavailable.load())
        << "round " << round << ": " << posted.load() << " posts, the kill after "
        << std::chrono::duration<double>(kill_time - start).count() << " s, the threads ended "
        << std::chrono::duration<double>(Clock::now() - kill_time).count()
        << " s after it; posts accepted after the kill " << posts_after_kill[0] << "/"
        << posts_after_kill[1] << "/" << posts_after_kill[2] << "; last errors: [" << last_errors[0]
        << "] [" << last_errors[1] << "] [" << last_errors[2] << "]";
    auto after = client->Post(*peer, Pattern(64, 9));
    EXPECT_EQ(after.status().code(), absl::StatusCode::kUnavailable) << after.status();
  }
}

// The server is another process, SIGKILLed with a request in flight: the client must say
// UNAVAILABLE as soon as it notices (a socket closing; over sm the 1 s keepalive), not wait out
// the deadline.
TEST_P(TransportConformance, ServerProcessKilledFailsInFlightRequests) {
  if (GetParam() == "inproc") GTEST_SKIP() << "inproc has no other process";
  auto [pid, address] = StartSilentServer(GetParam());
  Reaper reaper{pid};
  ASSERT_GT(pid, 0);
  ASSERT_FALSE(address.empty()) << "the server process printed no address";
  auto client = pair_.new_client();
  auto peer = client->Connect(address);
  ASSERT_TRUE(peer.ok()) << peer.status();
  auto id = client->Post(*peer, Pattern(4096, 7));
  ASSERT_TRUE(id.ok()) << id.status();
  std::vector<uint8_t> reply;
  // The request reached the server (nothing comes back within 200 ms: it is in flight there).
  EXPECT_EQ(client->Wait(*id, Clock::now() + milliseconds(200), &reply).code(),
            absl::StatusCode::kDeadlineExceeded);
  auto id2 = client->Post(*peer, Pattern(4096, 8));
  ASSERT_TRUE(id2.ok());
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  reaper.pid = -1;
  const auto start = Clock::now();
  const absl::Status st = client->Wait(*id2, start + std::chrono::seconds(30), &reply);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  std::printf("%s: server killed, noticed after %.0f ms\n", GetParam().c_str(),
              std::chrono::duration<double, std::milli>(Clock::now() - start).count());
}

// Connects to `address` and, where that works, sends one request and waits up to 15 s for its
// reply: the first error met (or OK). `connected` says whether the connect itself worked.
absl::Status ConnectAndAsk(ClientTransport* client, const std::string& address, bool* connected) {
  auto peer = client->Connect(address);
  *connected = peer.ok();
  if (!peer.ok()) return peer.status();
  auto id = client->Post(*peer, Pattern(64, 1));
  if (!id.ok()) return id.status();
  std::vector<uint8_t> reply;
  return client->Wait(*id, Clock::now() + std::chrono::seconds(15), &reply);
}

// A server that died before the client connected (its address handed out, the process gone):
// the client must say UNAVAILABLE, at the connect or on the first request, never leave requests
// waiting out their deadlines. (A peer that dies or hangs *during* the wireup: the next test.)
TEST_P(TransportConformance, AServerDeadBeforeTheConnectIsUnavailable) {
  if (GetParam() == "inproc") GTEST_SKIP() << "inproc has no other process";
  auto [pid, address] = StartSilentServer(GetParam());
  Reaper reaper{pid};
  ASSERT_GT(pid, 0);
  ASSERT_FALSE(address.empty()) << "the server process printed no address";
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  reaper.pid = -1;
  auto client = pair_.new_client();
  const auto start = Clock::now();
  bool connected = false;
  const absl::Status st = ConnectAndAsk(client.get(), address, &connected);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  std::printf("%s: a dead server refused after %.0f ms (%s): %s\n", GetParam().c_str(),
              std::chrono::duration<double, std::milli>(Clock::now() - start).count(),
              connected ? "on the request" : "at the connect", st.ToString().c_str());
}

// A server that hangs (SIGSTOP) or dies during the wireup. Over sm UCX never fails such an
// endpoint (its keepalive skips it), nor over tcp (the kernel still answers for a stopped
// process): the requests' sends stay pending, and they held slots of the table every peer shares
// until it was full (RESOURCE_EXHAUSTED for every peer; found by PostsRacing... under load). The
// client fails a peer whose wireup has not finished 5 s after the connect: the request ends
// UNAVAILABLE, well before its 15 s deadline. (By HOST:PORT a hung server does not answer the
// address fetch: the connect fails after 1 s.) The Connect itself does not wait for the wireup: it
// runs on the attention engine's thread, which revives dead shards every 2 s. The server, resumed
// after the clients gave up, must survive and serve a new client (a forced close during a wireup
// once made UCX 1.13 abort the *server*).
void HungServerCase(const std::string& transport, bool by_worker,
                    const std::function<std::unique_ptr<ClientTransport>()>& new_client) {
  // (Not a structured binding: the threads below capture the address, which C++17 allows only
  // for variables.)
  const std::pair<pid_t, std::string> server = StartSilentServer(transport, by_worker);
  const pid_t pid = server.first;
  const std::string& address = server.second;
  Reaper reaper{pid};  // (SIGKILL ends a stopped process too)
  ASSERT_GT(pid, 0);
  ASSERT_FALSE(address.empty()) << "the server process printed no address";
  kill(pid, SIGSTOP);
  const std::string label = transport + (by_worker ? " by worker address" : "");
  // Two clients at once: the resumed server meets two half-done wireups whose clients gave up.
  std::vector<std::thread> clients;
  for (int c = 0; c < 2; ++c) {
    clients.emplace_back([&] {
      auto client = new_client();
      const auto start = Clock::now();
      bool connected = false;
      const absl::Status st = ConnectAndAsk(client.get(), address, &connected);
      EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << label << ": " << st;
      std::printf("%s: a hung server refused after %.0f ms (%s): %s\n", label.c_str(),
                  std::chrono::duration<double, std::milli>(Clock::now() - start).count(),
                  connected ? "on the request" : "at the connect", st.ToString().c_str());
    });
  }
  for (auto& t : clients) t.join();
  kill(pid, SIGCONT);
  std::this_thread::sleep_for(milliseconds(500));
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, WNOHANG), 0)
      << label << ": the resumed server died: "
      << (WIFSIGNALED(wstatus) ? absl::StrCat("signal ", WTERMSIG(wstatus))
                               : absl::StrCat("exit ", WEXITSTATUS(wstatus)));
  auto client = new_client();
  auto peer = client->Connect(address);
  ASSERT_TRUE(peer.ok()) << label << ": " << peer.status();
  auto id = client->Post(*peer, Pattern(64, 2));
  ASSERT_TRUE(id.ok()) << label << ": " << id.status();
  std::vector<uint8_t> reply;
  // The silent server never answers: the request waits out its deadline, not UNAVAILABLE.
  EXPECT_EQ(client->Wait(*id, Clock::now() + milliseconds(1500), &reply).code(),
            absl::StatusCode::kDeadlineExceeded)
      << label;
  EXPECT_EQ(waitpid(pid, nullptr, WNOHANG), 0) << label << ": the resumed server died";
}

TEST_P(TransportConformance, AServerHungDuringTheWireupFailsItsRequests) {
  if (GetParam() == "inproc") GTEST_SKIP() << "inproc has no other process";
  HungServerCase(GetParam(), false, pair_.new_client);
  // Over tcp also by worker address: a server that hangs just after answering the fetch.
  if (GetParam() == "ucx_tcp") HungServerCase(GetParam(), true, pair_.new_client);
}

// A peer that never answers (hung after the wireup: only request deadlines notice) holds at most
// 1024 of the 4096 request slots the client's peers share; the others can still post.
TEST_P(TransportConformance, OnePeerHoldsAtMostAQuarterOfTheRequestSlots) {
  if (GetParam() == "inproc") GTEST_SKIP() << "inproc has no request slots";
  auto [pid_a, address_a] = StartSilentServer(GetParam());
  Reaper reaper_a{pid_a};
  auto [pid_b, address_b] = StartSilentServer(GetParam());
  Reaper reaper_b{pid_b};
  ASSERT_FALSE(address_a.empty() || address_b.empty()) << "a server process printed no address";
  auto client = pair_.new_client();
  auto a = client->Connect(address_a);
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = client->Connect(address_b);
  ASSERT_TRUE(b.ok()) << b.status();
  int accepted = 0;
  absl::Status refused;
  for (int i = 0; i < 1100 && refused.ok(); ++i) {
    auto id = client->Post(*a, Pattern(64, 3));
    if (id.ok()) {
      ++accepted;
    } else {
      refused = id.status();
    }
  }
  EXPECT_EQ(accepted, 1024);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  auto other = client->Post(*b, Pattern(64, 4));
  EXPECT_TRUE(other.ok()) << other.status();
}

// The slots a hung shard's requests hold come back when its peer is disconnected: four silent
// servers' requests fill the client's 4096 slots, one of them stopped (SIGSTOP) before its 1024
// are posted; Disconnect ends them at once (not at their deadlines), and once they are waited a
// post to a new peer is accepted again. (Here their sends complete before the stop takes hold
// of them; a forced close ending sends still pending is AServerHungDuringTheWireup's case.)
TEST_P(TransportConformance, DisconnectFreesAHungPeersRequestSlots) {
  if (GetParam() == "inproc") GTEST_SKIP() << "inproc has no request slots";
  std::vector<std::unique_ptr<Reaper>> reapers;
  std::vector<std::string> addresses;
  for (int i = 0; i < 4; ++i) {
    auto [pid, address] = StartSilentServer(GetParam());
    reapers.push_back(std::unique_ptr<Reaper>(new Reaper{pid}));  // (no temporary to reap it)
    ASSERT_GT(pid, 0);
    ASSERT_FALSE(address.empty()) << "server process " << i << " printed no address";
    addresses.push_back(address);
  }
  auto client = pair_.new_client();
  std::vector<int> peers;
  for (const std::string& a : addresses) {
    auto peer = client->Connect(a);
    ASSERT_TRUE(peer.ok()) << peer.status();
    peers.push_back(*peer);
  }
  std::this_thread::sleep_for(milliseconds(500));  // the wireups end (milliseconds)
  kill(reapers[0]->pid, SIGSTOP);
  std::vector<uint64_t> hung;
  for (int i = 0; i < 4; ++i) {
    for (int k = 0; k < 1024; ++k) {
      auto id = client->Post(peers[static_cast<size_t>(i)], Pattern(512, k));
      ASSERT_TRUE(id.ok()) << "peer " << i << ", request " << k << ": " << id.status();
      if (i == 0) hung.push_back(*id);
    }
  }
  auto fresh = client->Connect(addresses[1]);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  auto full = client->Post(*fresh, Pattern(64, 1));
  ASSERT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  const auto start = Clock::now();
  client->Disconnect(peers[0]);
  std::vector<uint8_t> reply;
  for (uint64_t id : hung) {
    const absl::Status st = client->Wait(id, start + std::chrono::seconds(20), &reply);
    ASSERT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  }
  // The forced close runs on the progress thread: the slots come back once it has.
  absl::Status posted = absl::UnknownError("not posted");
  while (!posted.ok() && Clock::now() - start < std::chrono::seconds(10)) {
    auto id = client->Post(*fresh, Pattern(64, 2));
    posted = id.status();
    if (!posted.ok()) std::this_thread::sleep_for(milliseconds(10));
  }
  EXPECT_TRUE(posted.ok()) << posted;
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
}

INSTANTIATE_TEST_SUITE_P(All, TransportConformance,
                         ::testing::Values("inproc", "ucx_tcp", "ucx_sm"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace dmoe::transport
