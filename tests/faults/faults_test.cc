// Fault scenarios on a local cluster of real processes (dmoe-router, three dmoe-expert shards
// with two replicas of every expert unless a scenario says otherwise, one or two dmoe-attention
// nodes, a dmoe-gateway where named; real gRPC, real UCX over tcp on loopback or across a veth
// pair into a network namespace) under a streaming load. Each scenario prints a row of one table:
// requests completed / failed / hung, the longest stall of any stream (the longest gap between two
// streamed tokens), and how many outputs equal the fault-free output (the in-process engine, each
// request alone). docs/RELIABILITY.md has the table of a run and the command for each scenario.
//
// What is asserted is behaviour, not speed: every output equal, nothing failed or hung, and --
// where a replica could answer -- no stream waited out the expert deadline (4 s here), which is
// what every stall did before hedged dispatch.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "common/internal_tls.h"
#include "gtest/gtest.h"
#include "proto/attention.grpc.pb.h"
#include "proto/expert_control.grpc.pb.h"
#include "tests/cluster_harness.h"
#include "transport/ucx.h"

namespace dmoe {
namespace {

using testing::Cluster;
using testing::Delta;
using testing::Summary;

constexpr int kStreams = 8;
constexpr int kTokens = 300;
constexpr char kDeadlineMs[] = "4000";

std::string* g_model = nullptr;
testing::Prompts* g_prompts = nullptr;
testing::Prompts* g_expected = nullptr;

struct Row {
  std::string scenario;
  Summary s;
  int requests = 0;
};
std::vector<Row>* g_rows = nullptr;

std::string SharedSetUp() {
  g_model = new std::string(testing::TmpDir() + "/faults_model");
  g_prompts = new testing::Prompts();
  g_expected = new testing::Prompts();
  g_rows = new std::vector<Row>();
  for (int i = 0; i < kStreams; ++i) {
    std::vector<int32_t> p;
    const int len = 3 + (i * 29) % 40;
    for (int j = 0; j < len; ++j) p.push_back((i * 101 + j * 17 + 3) % 512);
    g_prompts->push_back(p);
  }
  const absl::Status st = testing::PrepareWorkload(*g_model, 91, *g_prompts, kTokens, g_expected);
  return st.ok() ? "" : std::string(st.message());
}

// Prints the rows of every scenario that ran as one table (and writes it to the test's outputs).
class Table : public ::testing::Environment {
 public:
  void TearDown() override {
    if (g_rows == nullptr || g_rows->empty()) return;
    std::string t =
        "| scenario | requests | completed | failed | hung | longest stall | equal to fault-free "
        "|\n|---|---|---|---|---|---|---|\n";
    for (const Row& r : *g_rows) {
      char line[512];
      std::snprintf(line, sizeof(line), "| %s | %d | %d | %d | %d | %.3f s | %d |\n",
                    r.scenario.c_str(), r.requests, r.s.ok, r.requests - r.s.ok - r.s.hung,
                    r.s.hung, r.s.longest_gap, r.s.identical);
      t += line;
    }
    std::printf("\n%s\n", t.c_str());
    if (const char* dir = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR")) {
      std::ofstream(std::string(dir) + "/faults_table.md") << t;
    }
  }
};

class Faults : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (setup_error_ == nullptr) setup_error_ = new std::string(SharedSetUp());
  }
  void SetUp() override { ASSERT_EQ(*setup_error_, "") << "shared set-up failed"; }
  static std::string* setup_error_;

  // Router with `replicas` of every expert, 3 shards (`slow` adds --inject-delay-ms to shard 1),
  // `nodes` attention nodes (`attention` flags added).
  static void Start(Cluster* c, std::vector<std::string> attention = {},
                    std::vector<std::string> slow = {}, int replicas = 2, int nodes = 1) {
    c->StartRouter({"--replication", std::to_string(replicas)});
    for (int i = 0; i < 3; ++i) c->AddShard(48, i == 1 ? slow : std::vector<std::string>());
    ASSERT_GT(c->WaitForActive(0), 0u);
    attention.insert(attention.begin(), {"--expert-deadline-ms", kDeadlineMs});
    for (int i = 0; i < nodes; ++i) c->AddAttention(attention);
  }

  // The prompts twice over (16 streams), and their expected outputs.
  static const testing::Prompts& Twice(const testing::Prompts& p) {
    static testing::Prompts* twice = nullptr;
    static testing::Prompts* expected = nullptr;
    if (&p == g_expected) {
      if (expected == nullptr) {
        expected = new testing::Prompts(*g_expected);
        expected->insert(expected->end(), g_expected->begin(), g_expected->end());
      }
      return *expected;
    }
    if (twice == nullptr) {
      twice = new testing::Prompts(*g_prompts);
      twice->insert(twice->end(), g_prompts->begin(), g_prompts->end());
    }
    return *twice;
  }

  static Summary Record(const std::string& scenario, const std::vector<testing::Result>& r) {
    const Summary s =
        testing::Summarize(r, r.size() > g_expected->size() ? Twice(*g_expected) : *g_expected);
    g_rows->push_back(Row{scenario, s, static_cast<int>(r.size())});
    std::printf("%s: %d/%zu completed, %d hung, longest stall %.3f s, %d equal to fault-free\n",
                scenario.c_str(), s.ok, r.size(), s.hung, s.longest_gap, s.identical);
    return s;
  }
};
std::string* Faults::setup_error_ = nullptr;

// A network namespace joined to this one by a veth pair: this side host_ip (.1), the other ns_ip
// (.2). Cut() partitions the two (blackhole routes both ways: this sandbox has neither netem nor
// netfilter, and a link taken down sends the packets to the default route instead); Heal() undoes
// it. error() says why the machine does not allow it (not root, no `ip`, no namespaces).
class NetNs {
 public:
  NetNs() {
    for (const char* p : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"}) {
      if (access(p, X_OK) == 0) ip_ = p;
    }
    if (ip_.empty()) {
      error_ = "no ip(8) on this machine";
      return;
    }
    const std::string id = std::to_string(getpid());
    name_ = "dmoe-f" + id;
    host_if_ = "dmr" + id;
    ns_if_ = "dms" + id;
    const std::string net = "10.213." + std::to_string(20 + getpid() % 200);
    host_ip_ = net + ".1";
    ns_ip_ = net + ".2";
    for (const std::string& c :
         {"netns add " + name_, "link add " + host_if_ + " type veth peer name " + ns_if_,
          "link set " + ns_if_ + " netns " + name_, "addr add " + host_ip_ + "/24 dev " + host_if_,
          "link set " + host_if_ + " up",
          "-n " + name_ + " addr add " + ns_ip_ + "/24 dev " + ns_if_,
          "-n " + name_ + " link set " + ns_if_ + " up", "-n " + name_ + " link set lo up"}) {
      if (!Ip(c)) {
        error_ = "`ip " + c + "` failed (network namespaces need root)";
        return;
      }
    }
  }
  ~NetNs() {
    if (!error_.empty() && name_.empty()) return;
    Heal();  // a route left behind would cut a later run that draws the same subnet
    Ip("netns del " + name_);
    Ip("link del " + host_if_);
    setenv("UCX_NET_DEVICES", "lo", 1);  // in case the test stopped while this side used the pair
  }
  bool Cut() {
    return Ip("route add blackhole " + ns_ip_ + "/32") &&
           Ip("-n " + name_ + " route add blackhole " + host_ip_ + "/32");
  }
  bool Heal() {
    return Ip("route del blackhole " + ns_ip_ + "/32") &&
           Ip("-n " + name_ + " route del blackhole " + host_ip_ + "/32");
  }
  // Whether tc netem (delay, loss) works here.
  bool HasNetem() {
    const bool ok =
        std::system(
            ("tc qdisc add dev " + host_if_ + " root netem delay 1ms > /dev/null 2>&1").c_str()) ==
        0;
    if (ok) std::system(("tc qdisc del dev " + host_if_ + " root > /dev/null 2>&1").c_str());
    return ok;
  }
  // argv that runs a binary inside the namespace with UCX on its side of the pair.
  std::vector<std::string> Exec() const {
    return {ip_, "netns", "exec", name_, "/usr/bin/env", "UCX_NET_DEVICES=" + ns_if_};
  }
  const std::string& error() const { return error_; }
  const std::string& host_if() const { return host_if_; }
  const std::string& host_ip() const { return host_ip_; }
  const std::string& ns_ip() const { return ns_ip_; }

 private:
  bool Ip(const std::string& args) {
    return std::system((ip_ + " " + args + " > /dev/null 2>&1").c_str()) == 0;
  }
  std::string ip_, name_, host_if_, ns_if_, host_ip_, ns_ip_, error_;
};

TEST_F(Faults, NoFault) {
  Cluster c("nofault", *g_model);
  Start(&c);
  const Summary s = Record("none (baseline)", c.Run(*g_prompts, kTokens, 0, nullptr));
  EXPECT_EQ(s.identical, kStreams);
}

// SIGSTOP of one of 3 shards mid-stream: its calls are hedged to the other replica, it is set
// aside, and after SIGCONT it serves again.
TEST_F(Faults, SigstopOneShardWithReplicas) {
  Cluster c("sigstop", *g_model);
  Start(&c);
  const pid_t pid = c.shard(1).pid();
  const Summary s =
      Record("SIGSTOP 1 of 3 shards (2 replicas)",
             c.Run(*g_prompts, kTokens, kStreams * 40, [&] { ::kill(pid, SIGSTOP); }));
  EXPECT_EQ(s.ok, kStreams);
  EXPECT_EQ(s.identical, kStreams);
  EXPECT_EQ(s.hung, 0);
  EXPECT_LT(s.longest_gap, 2.0) << "a stream waited out the expert deadline";
  ::kill(pid, SIGCONT);
  std::vector<double> after;
  for (int round = 0; round < 10; ++round) {
    const auto before = c.ShardTokens();
    const Summary again = testing::Summarize(c.Run(*g_prompts, 16, 0, nullptr), {});
    EXPECT_EQ(again.ok, kStreams);
    after = Delta(c.ShardTokens(), before);
    if (after[1] > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  std::printf("after SIGCONT: pairs per shard %.0f %.0f %.0f\n", after[0], after[1], after[2]);
  EXPECT_GT(after[1], 0) << "the resumed shard got no traffic";
}

// The same without hedging (--hedge-factor 0): each call to the stopped shard waits out its
// deadline before going to the other replica. The comparison row of the table.
TEST_F(Faults, SigstopOneShardWithReplicasWithoutHedging) {
  Cluster c("sigstop_nohedge", *g_model);
  Start(&c, {"--hedge-factor", "0"});
  const pid_t pid = c.shard(1).pid();
  const Summary s =
      Record("SIGSTOP 1 of 3 shards (2 replicas), hedging off",
             c.Run(*g_prompts, kTokens, kStreams * 40, [&] { ::kill(pid, SIGSTOP); }));
  ::kill(pid, SIGCONT);
  EXPECT_EQ(s.identical, kStreams);
  EXPECT_EQ(s.hung, 0);
}

// A shard that answers every batch 300 ms late (--inject-delay-ms): hedging takes its work to the
// replicas; it is set aside, comes back with each late reply, and loses again.
TEST_F(Faults, SlowShardWithReplicas) {
  Cluster c("slow", *g_model);
  Start(&c, {}, {"--inject-delay-ms", "300"});
  const Summary s =
      Record("1 of 3 shards 300 ms slow (2 replicas)", c.Run(*g_prompts, kTokens, 0, nullptr));
  EXPECT_EQ(s.ok, kStreams);
  EXPECT_EQ(s.identical, kStreams);
  EXPECT_LT(s.longest_gap, 2.0) << "a stream waited out the expert deadline";
}

TEST_F(Faults, SigkillOneShardWithReplicas) {
  Cluster c("kill_replicas", *g_model);
  Start(&c);
  const Summary s =
      Record("SIGKILL 1 of 3 shards (2 replicas)",
             c.Run(*g_prompts, kTokens, kStreams * 40, [&] { c.shard(1).Kill(SIGKILL); }));
  EXPECT_EQ(s.ok, kStreams);
  EXPECT_EQ(s.identical, kStreams);
}

// Without replicas the router moves the dead shard's experts to the survivors (lease 1.5 s):
// streams wait (bounded) or fail with UNAVAILABLE; none hangs, every completed one is right.
TEST_F(Faults, SigkillOneShardWithoutReplicas) {
  Cluster c("kill_noreplicas", *g_model);
  Start(&c, {}, {}, /*replicas=*/1);
  const Summary s =
      Record("SIGKILL 1 of 3 shards (no replicas)",
             c.Run(*g_prompts, kTokens, kStreams * 40, [&] { c.shard(1).Kill(SIGKILL); }));
  EXPECT_EQ(s.hung, 0);
  EXPECT_EQ(s.other, 0);
  EXPECT_EQ(s.ok + s.unavailable, kStreams);
  EXPECT_EQ(s.identical, s.ok);
}

// The router is off the data path: killed mid-stream (and not restarted), nothing fails.
TEST_F(Faults, SigkillRouter) {
  Cluster c("kill_router", *g_model);
  Start(&c);
  const Summary s =
      Record("SIGKILL the router (not restarted)",
             c.Run(*g_prompts, kTokens, kStreams * 40, [&] { c.router().Kill(SIGKILL); }));
  EXPECT_EQ(s.ok, kStreams);
  EXPECT_EQ(s.identical, kStreams);
}

// Two attention nodes behind a gateway; one is killed before its requests' first token: the
// gateway retries them on the other, nothing fails.
TEST_F(Faults, AttentionNodeKilledBeforeTheFirstToken) {
  Cluster c("kill_attention_early", *g_model);
  Start(&c, {}, {}, 2, /*nodes=*/2);
  c.StartGateway();
  ASSERT_EQ(testing::Summarize(c.Run(*g_prompts, 4, 0, nullptr), {}).ok, kStreams);  // warm
  c.attention(1).Kill(SIGKILL);
  const Summary s = Record("SIGKILL 1 of 2 attention nodes, before the first token (gateway)",
                           c.Run(Twice(*g_prompts), kTokens, 0, nullptr));
  EXPECT_EQ(s.ok, 2 * kStreams);
  EXPECT_EQ(s.identical, 2 * kStreams);
}

// Killed mid-stream: what it was streaming fails at once with UNAVAILABLE (the gateway cannot
// replay a stream the client has partly seen); the other node's streams complete; none hangs.
TEST_F(Faults, AttentionNodeKilledMidStream) {
  Cluster c("kill_attention", *g_model);
  Start(&c, {}, {}, 2, /*nodes=*/2);
  c.StartGateway();
  const Summary s = Record(
      "SIGKILL 1 of 2 attention nodes, mid-stream (gateway)",
      c.Run(Twice(*g_prompts), kTokens, 2 * kStreams * 40, [&] { c.attention(1).Kill(SIGKILL); }));
  EXPECT_EQ(s.hung, 0);
  EXPECT_EQ(s.other, 0);
  EXPECT_EQ(s.ok + s.unavailable, 2 * kStreams);
  EXPECT_GT(s.unavailable, 0) << "no stream was on the killed node";
  EXPECT_EQ(s.identical, s.ok);
}

// An attention node that stalls without closing its connections (SIGSTOP; a hung host is like
// it), mid-stream: the gateway's keepalive pings go unanswered, so its streams end UNAVAILABLE
// within about two keepalive periods instead of holding their clients until their deadline.
TEST_F(Faults, AttentionNodeStoppedMidStream) {
  Cluster c("stop_attention", *g_model);
  Start(&c, {}, {}, 2, /*nodes=*/2);
  c.StartGateway({"--node-keepalive-ms", "1000"});
  ASSERT_FALSE(HasFatalFailure());
  const Summary s = Record("SIGSTOP 1 of 2 attention nodes, mid-stream (gateway)",
                           c.Run(Twice(*g_prompts), kTokens, 2 * kStreams * 40,
                                 [&] { c.attention(1).Signal(SIGSTOP); }));
  c.attention(1).Kill(SIGKILL);  // (a stopped process keeps a SIGTERM pending)
  EXPECT_EQ(s.hung, 0);
  EXPECT_EQ(s.other, 0);
  EXPECT_EQ(s.ok + s.unavailable, 2 * kStreams);
  EXPECT_GT(s.unavailable, 0) << "no stream was on the stopped node";
  EXPECT_EQ(s.identical, s.ok);
}

// The gateway killed mid-stream: its clients' streams end at once (UNAVAILABLE, none hangs); a
// new gateway serves at once.
TEST_F(Faults, GatewayKilledMidStream) {
  Cluster c("kill_gateway", *g_model);
  Start(&c);
  c.StartGateway();
  const Summary s =
      Record("SIGKILL the gateway, mid-stream",
             c.Run(*g_prompts, kTokens, kStreams * 40, [&] { c.gateway().Kill(SIGKILL); }));
  EXPECT_EQ(s.hung, 0);
  EXPECT_EQ(s.unavailable, kStreams);
  c.StartGateway();
  const Summary again = Record("  then a new gateway", c.Run(*g_prompts, kTokens, 0, nullptr));
  EXPECT_EQ(again.identical, kStreams);
}

// A network partition between hosts: shard 2 runs in its own network namespace, reached over a
// veth pair (UCX over tcp, gRPC), every other process on this side. The pair is cut mid-stream:
// the streams go on (its experts have replicas on this side); healed, the shard serves again
// without a restart.
TEST_F(Faults, PartitionOfAShardOnAnotherHostAndItsHealing) {
  NetNs ns;
  if (!ns.error().empty()) GTEST_SKIP() << "no network namespaces here: " << ns.error();
  if (!ns.HasNetem()) {
    std::printf(
        "tc netem is not available on this kernel: no delay or loss can be injected here\n");
  }
  setenv("UCX_NET_DEVICES", ns.host_if().c_str(), 1);  // this side's processes use the pair too
  Cluster c("partition", *g_model);
  c.StartRouter({"--replication", "2"}, ns.host_ip() + ":0");
  c.AddShard(48);
  c.AddShard(48);
  c.AddShard(48, {"--grpc-listen", ns.ns_ip() + ":0", "--ucx-listen", ns.ns_ip() + ":0"},
             ns.Exec());
  ASSERT_GT(c.WaitForActive(0), 0u);
  c.StartAttention({"--expert-deadline-ms", kDeadlineMs});
  setenv("UCX_NET_DEVICES", "lo", 1);
  bool cut = false;
  const Summary s = Record("network partition of 1 of 3 shards (own netns, 2 replicas)",
                           c.Run(*g_prompts, kTokens, kStreams * 40, [&] { cut = ns.Cut(); }));
  ASSERT_TRUE(cut) << "could not cut the pair";
  EXPECT_EQ(s.ok, kStreams);
  EXPECT_EQ(s.identical, kStreams);
  EXPECT_EQ(s.hung, 0);
  // The cut is real: the shard's control API cannot be reached (ShardTokens reads 0 then).
  EXPECT_EQ(c.ShardTokens()[2], 0.0) << "shard 2 still answers across the cut";
  ASSERT_TRUE(ns.Heal());
  std::vector<double> after = {0, 0, 0};
  for (int round = 0; round < 20; ++round) {
    const auto before = c.ShardTokens();
    const Summary again = testing::Summarize(c.Run(*g_prompts, 16, 0, nullptr), {});
    EXPECT_EQ(again.ok, kStreams);
    after = Delta(c.ShardTokens(), before);
    if (after[2] > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  std::printf("after healing: pairs per shard %.0f %.0f %.0f\n", after[0], after[1], after[2]);
  EXPECT_GT(after[2], 0) << "the healed shard got no traffic";
}

// The same cut without replicas, and without a router to move experts (static: --experts slices,
// --expert-shards): every stream uses the cut shard's experts, so each fails -- with UNAVAILABLE
// naming the shard, within the expert deadline of the cut, none hangs. Healed, the node serves
// again without a restart (it connects to the shard anew once its control API answers).
TEST_F(Faults, PartitionWithoutReplicasFailsTheCutPathThenHeals) {
  NetNs ns;
  if (!ns.error().empty()) GTEST_SKIP() << "no network namespaces here: " << ns.error();
  setenv("UCX_NET_DEVICES", ns.host_if().c_str(), 1);
  Cluster c("partition_static", *g_model);
  c.AddShard(0, {"--experts", "0/3"});
  c.AddShard(0, {"--experts", "1/3"});
  c.AddShard(
      0,
      {"--experts", "2/3", "--grpc-listen", ns.ns_ip() + ":0", "--ucx-listen", ns.ns_ip() + ":0"},
      ns.Exec());
  const std::string cut_shard = c.shard_info(2).at("grpc");
  c.AddAttention({"--expert-shards",
                  c.shard_info(0).at("grpc") + "," + c.shard_info(1).at("grpc") + "," + cut_shard,
                  "--expert-deadline-ms", kDeadlineMs});
  setenv("UCX_NET_DEVICES", "lo", 1);
  bool cut = false;
  auto cut_at = std::chrono::steady_clock::now();
  const auto results = c.Run(*g_prompts, kTokens, kStreams * 40, [&] {
    cut_at = std::chrono::steady_clock::now();
    cut = ns.Cut();
  });
  ASSERT_TRUE(cut) << "could not cut the pair";
  const Summary s =
      Record("network partition of 1 of 3 shards (own netns, no replicas, static)", results);
  EXPECT_EQ(s.hung, 0);
  EXPECT_EQ(s.other, 0);
  double slowest = 0;
  for (const auto& r : results) {
    if (r.status.ok()) continue;
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
    EXPECT_NE(r.status.error_message().find(cut_shard), std::string::npos)
        << "does not name the cut shard: " << r.status.error_message();
    slowest = std::max(slowest, std::chrono::duration<double>(r.ended - cut_at).count());
  }
  std::printf("cut path: %d failed, the last %.3f s after the cut (expert deadline %s ms)\n",
              s.unavailable, slowest, kDeadlineMs);
  EXPECT_LE(slowest, std::atof(kDeadlineMs) / 1000 + 1.0);
  ASSERT_TRUE(ns.Heal());
  Summary after;
  int rounds = 0;
  for (; rounds < 30; ++rounds) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    testing::Prompts want;
    for (const auto& e : *g_expected) want.emplace_back(e.begin(), e.begin() + 16);
    after = testing::Summarize(c.Run(*g_prompts, 16, 0, nullptr), want);
    if (after.identical == kStreams) break;
  }
  std::printf("healed: %d/%d equal to fault-free after %d rounds of 0.5 s\n", after.identical,
              kStreams, rounds + 1);
  EXPECT_EQ(after.identical, kStreams) << "the node did not serve again after healing";
}

// The inner doors: with a cluster token, the attention node's API and the shards' control API
// refuse callers without it (UNAUTHENTICATED), a UCX peer without it is refused and counted, and
// the cluster still serves (through a gateway that has the token).
TEST_F(Faults, InnerDoorsRefuseCallersWithoutTheToken) {
  Cluster c("doors", *g_model);
  c.UseClusterToken("doors-7f3a91c2e4b5");
  Start(&c);
  auto attention = internal::AttentionService::NewStub(
      grpc::CreateChannel(c.attention_address(), grpc::InsecureChannelCredentials()));
  auto shard = internal::ExpertControl::NewStub(
      grpc::CreateChannel(c.shard_info(0).at("grpc"), grpc::InsecureChannelCredentials()));
  int refused = 0;
  for (const std::string token : {"", "doors-7f3a91c2e4b6"}) {
    auto call = [&](auto&& f) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      if (!token.empty()) ctx.AddMetadata("x-dmoe-cluster-token", token);
      const grpc::Status st = f(&ctx);
      EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED) << st.error_message();
      refused += st.error_code() == grpc::StatusCode::UNAUTHENTICATED;
    };
    call([&](grpc::ClientContext* ctx) {
      internal::GetLoadReply r;
      return attention->GetLoad(ctx, internal::GetLoadRequest(), &r);
    });
    call([&](grpc::ClientContext* ctx) {
      internal::CancelReply r;
      return attention->Cancel(ctx, internal::CancelRequest(), &r);
    });
    call([&](grpc::ClientContext* ctx) {
      internal::GenerateRequest req;
      req.add_prompt_token_ids(5);
      req.mutable_sampling()->set_max_tokens(4);
      auto reader = attention->Generate(ctx, req);
      internal::GenerateResponse r;
      while (reader->Read(&r)) {
      }
      return reader->Finish();
    });
    call([&](grpc::ClientContext* ctx) {
      internal::GetInfoReply r;
      return shard->GetInfo(ctx, internal::GetInfoRequest(), &r);
    });
    call([&](grpc::ClientContext* ctx) {
      internal::GetStatsReply r;
      return shard->GetStats(ctx, internal::GetStatsRequest(), &r);
    });
  }
  // A UCX peer without the token: its request is dropped unanswered.
  auto ucx = transport::NewUcxClient();
  ASSERT_TRUE(ucx.ok()) << ucx.status();
  auto peer = (*ucx)->Connect(c.shard_info(0).at("ucx"));
  ASSERT_TRUE(peer.ok()) << peer.status();
  auto id = (*ucx)->Post(*peer, std::vector<uint8_t>(64, 0));
  ASSERT_TRUE(id.ok()) << id.status();
  std::vector<uint8_t> reply;
  EXPECT_EQ(
      (*ucx)->Wait(*id, transport::Clock::now() + std::chrono::milliseconds(500), &reply).code(),
      absl::StatusCode::kDeadlineExceeded);
  // The cluster, whose own calls carry the token, still serves: through a gateway, which sends
  // the token to the attention node.
  c.StartGateway();
  const Summary s = Record("cluster token on (10 refused gRPC calls, 1 refused UCX peer; gateway)",
                           c.Run(*g_prompts, kTokens, 0, nullptr));
  EXPECT_EQ(refused, 10);
  EXPECT_EQ(s.identical, kStreams);
  grpc::ClientContext ctx;
  ctx.AddMetadata("x-dmoe-cluster-token", "doors-7f3a91c2e4b5");
  internal::GetStatsReply stats;
  ASSERT_TRUE(shard->GetStats(&ctx, internal::GetStatsRequest(), &stats).ok());
  std::printf("shard 0: %llu refused UCX peers, %llu refused requests\n",
              static_cast<unsigned long long>(stats.refused_peers()),
              static_cast<unsigned long long>(stats.refused_requests()));
  EXPECT_EQ(stats.refused_peers(), 1u);
  EXPECT_EQ(stats.refused_requests(), 1u);
}

// Internal mTLS: every process serves its internal API over TLS that requires a client
// certificate from the cluster's CA; the cluster serves (through a gateway, whose public API stays
// plaintext here); a plaintext client and a TLS client without a certificate are refused.
TEST_F(Faults, InternalMtlsRefusesClientsWithoutACertificate) {
  const std::string dir = testing::TmpDir() + "/mtls";
  const std::string make =
      "mkdir -p " + dir + " && cd " + dir +
      " && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2"
      " -subj /CN=dmoe-test-ca"
      " && openssl req -newkey rsa:2048 -nodes -keyout key.pem -out req.csr -subj /CN=dmoe"
      " && printf 'subjectAltName=DNS:dmoe-internal\\n' > ext.cnf"
      " && openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem"
      " -days 2 -extfile ext.cnf";
  ASSERT_EQ(std::system((make + " > /dev/null 2>&1").c_str()), 0) << "openssl failed: " << make;
  auto slurp = [&](const char* f) {
    std::ifstream in(dir + "/" + f);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  SetInternalTls({slurp("ca.pem"), slurp("cert.pem"), slurp("key.pem")});
  struct Plain {
    ~Plain() { SetInternalTls({}); }
  } plain_again;
  Cluster c("mtls", *g_model);
  c.UseInternalTls(dir);
  Start(&c);
  c.StartGateway();
  const Summary s = Record("internal mTLS on (gateway)", c.Run(*g_prompts, kTokens, 0, nullptr));
  EXPECT_EQ(s.identical, kStreams);
  auto load = [&](std::shared_ptr<grpc::Channel> ch) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    internal::GetLoadReply r;
    return internal::AttentionService::NewStub(ch)->GetLoad(&ctx, internal::GetLoadRequest(), &r);
  };
  EXPECT_TRUE(load(InternalChannel(c.attention_address())).ok());
  const grpc::Status plaintext =
      load(grpc::CreateChannel(c.attention_address(), grpc::InsecureChannelCredentials()));
  EXPECT_EQ(plaintext.error_code(), grpc::StatusCode::UNAVAILABLE) << plaintext.error_message();
  grpc::SslCredentialsOptions no_cert;
  no_cert.pem_root_certs = slurp("ca.pem");
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride(kInternalTlsName);
  const grpc::Status anonymous =
      load(grpc::CreateCustomChannel(c.attention_address(), grpc::SslCredentials(no_cert), args));
  EXPECT_EQ(anonymous.error_code(), grpc::StatusCode::UNAVAILABLE) << anonymous.error_message();
  std::printf("internal mTLS: plaintext client: %s; TLS client without a certificate: %s\n",
              plaintext.error_message().c_str(), anonymous.error_message().c_str());
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::AddGlobalTestEnvironment(new dmoe::Table());
  return RUN_ALL_TESTS();
}
