#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "common/mutex.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"
#include "router/member.h"
#include "router/router_service.h"
#include "router/router_state.h"

namespace dmoe::router {
namespace {

using std::chrono::milliseconds;

struct FakeClock {
  std::chrono::steady_clock::time_point now =
      std::chrono::steady_clock::time_point() + std::chrono::hours(1);
};

Node Expert(const std::string& id, int64_t capacity) {
  Node n;
  n.id = id;
  n.grpc_address = "127.0.0.1:1";
  n.capacity = capacity;
  return n;
}

bool Covers(const PlacementMap& m, const ModelConfig& c) {
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      if (!m.replicas.count({l, e})) return false;
    }
  }
  return true;
}

TEST(RouterState, LeasesMembershipAndVersions) {
  const ModelConfig c = *PresetConfig("tiny");  // 3 MoE layers x 16 experts = 48 pairs
  FakeClock clock;
  RouterState s(c, milliseconds(1000), PlacementOptions(), [&] { return clock.now; });
  EXPECT_EQ(s.placement().version, 0u);
  ASSERT_TRUE(s.Register(Expert("a", 30)).ok());
  EXPECT_EQ(s.target().version, 0u);  // 30 < 48: cannot cover yet
  EXPECT_NE(s.problem().find("48 (layer, expert) pairs"), std::string::npos) << s.problem();
  ASSERT_TRUE(s.Register(Expert("b", 30)).ok());
  const PlacementMap v1 = s.target();
  EXPECT_EQ(v1.version, 1u);
  EXPECT_TRUE(Covers(v1, c));
  // Not active until both shards are ready.
  EXPECT_EQ(s.placement().version, 0u);
  ASSERT_TRUE(s.Heartbeat("a", 1).ok());
  EXPECT_EQ(s.placement().version, 0u);
  ASSERT_TRUE(s.Heartbeat("b", 1).ok());
  EXPECT_EQ(s.placement().version, 1u);
  ASSERT_TRUE(s.Register(Expert("c", 30)).ok());  // scale-out: a new target including c
  const PlacementMap v2 = s.target();
  EXPECT_EQ(v2.version, 2u);
  EXPECT_EQ(v2.shards.size(), 3u);
  ASSERT_TRUE(s.Heartbeat("a", 2).ok());
  ASSERT_TRUE(s.Heartbeat("b", 2).ok());
  EXPECT_EQ(s.placement().version, 1u);  // c has not loaded yet
  ASSERT_TRUE(s.Heartbeat("c", 2).ok());
  EXPECT_EQ(s.placement().version, 2u);
  // a and c keep heartbeating, b stops: after the lease, b is gone and a new map covers without it.
  clock.now += milliseconds(600);
  ASSERT_TRUE(s.Heartbeat("a").ok());
  ASSERT_TRUE(s.Heartbeat("c").ok());
  clock.now += milliseconds(600);
  EXPECT_EQ(s.ExpireLeases(), std::vector<std::string>{"b"});
  const PlacementMap v3 = s.target();
  EXPECT_EQ(v3.version, 3u);
  EXPECT_TRUE(Covers(v3, c));
  for (const auto& [key, rs] : v3.replicas) {
    for (int r : rs) EXPECT_NE(v3.shards[static_cast<size_t>(r)], "b");
  }
  EXPECT_EQ(s.Heartbeat("b").code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(s.Heartbeat("a", 3).ok());
  ASSERT_TRUE(s.Heartbeat("c", 3).ok());
  EXPECT_EQ(s.placement().version, 3u);
  // Re-registering the same shard unchanged makes no new version.
  ASSERT_TRUE(s.Register(Expert("a", 30)).ok());
  EXPECT_EQ(s.target().version, 3u);
  // Deregistering plans the shard out: the next target has only c (capacity allowing: 30 < 48,
  // so nothing changes and a stays in).
  ASSERT_TRUE(s.Register(Expert("d", 64)).ok());
  auto out = s.Deregister("a");
  ASSERT_TRUE(out.ok());
  EXPECT_TRUE(*out);
  const PlacementMap v5 = s.target();
  EXPECT_EQ(v5.version, 5u);
  EXPECT_EQ(v5.shards, (std::vector<std::string>{"c", "d"}));
  EXPECT_EQ(s.Deregister("nobody").status().code(), absl::StatusCode::kNotFound);
  // d alone cannot be planned out (c's 30 < 48): the answer says so.
  out = s.Deregister("d");
  ASSERT_TRUE(out.ok());
  EXPECT_FALSE(*out);
  // Bad registrations name the field.
  EXPECT_NE(s.Register(Expert("", 3)).message().find("node_id"), absl::string_view::npos);
  EXPECT_NE(s.Register(Expert("z", 0)).message().find("capacity_experts"), absl::string_view::npos);
}

// What one token holder registers is bounded: every field is copied into each watcher's map
// (the id once per expert it hosts), so a 1 MiB id made every update gigabytes on V3.
TEST(RouterState, RegistrationFieldsAreBounded) {
  const ModelConfig c = *PresetConfig("tiny");
  RouterState s(c, milliseconds(1000), PlacementOptions());
  const std::pair<std::function<void(Node*)>, const char*> cases[] = {
      {[](Node* n) { n->id = std::string(1 << 20, 'x'); }, "node_id"},
      {[](Node* n) { n->id = "shard\n0"; }, "node_id"},
      {[](Node* n) { n->id = "shard 0"; }, "node_id"},
      {[](Node* n) { n->grpc_address = std::string(2048, '1'); }, "grpc_address"},
      {[](Node* n) { n->ucx_address = std::string(2048, '1'); }, "ucx_address"},
      {[](Node* n) { n->ucx_worker_address = std::string(1 << 20, 'a'); }, "ucx_worker_address"},
      {[](Node* n) { n->numerics = std::string(4096, 'n'); }, "numerics"},
  };
  for (const auto& [mutate, field] : cases) {
    Node n = Expert("a", 48);
    mutate(&n);
    const absl::Status st = s.Register(n);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(st.message().find(field), absl::string_view::npos) << st;
  }
  EXPECT_TRUE(s.nodes().empty());
  Node longest = Expert(std::string(kMaxNodeIdBytes, 'x'), 48);
  longest.ucx_worker_address = std::string(kMaxWorkerAddressBytes, 'a');
  EXPECT_TRUE(s.Register(longest).ok());
}

// Versions near 2^64 would wrap: a node claiming it knew 2^64-2 made the map after next version
// 0 and the one after 1, live at once on shards "ready" for 2^64-1 that never load again.
TEST(RouterState, VersionsCannotBePushedToWrap) {
  const ModelConfig c = *PresetConfig("tiny");
  RouterState s(c, milliseconds(1000), PlacementOptions());
  EXPECT_EQ(s.Register(Expert("a", 48), ~uint64_t{0} - 1).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(s.Register(Expert("a", 48), 5).ok());
  EXPECT_EQ(s.target().version, 6u);
  // Ready for a version not planned yet counts only up to the newest planned one.
  ASSERT_TRUE(s.Heartbeat("a", ~uint64_t{0}).ok());
  EXPECT_EQ(s.placement().version, 6u);
  ASSERT_TRUE(s.Register(Expert("b", 48)).ok());
  EXPECT_EQ(s.target().version, 7u);
  EXPECT_EQ(s.placement().version, 6u);  // b and a have not loaded 7
  ASSERT_TRUE(s.Heartbeat("b", 7).ok());
  EXPECT_EQ(s.placement().version, 6u);  // nor a
  ASSERT_TRUE(s.Heartbeat("a", 7).ok());
  EXPECT_EQ(s.placement().version, 7u);
}

// Capacities are taken up to the number of (layer, expert) pairs: two shards of INT64_MAX summed
// past the int64 range, and no map was planned.
TEST(RouterState, HugeCapacitiesPlanAMap) {
  const ModelConfig c = *PresetConfig("tiny");
  RouterState s(c, milliseconds(1000), PlacementOptions());
  ASSERT_TRUE(s.Register(Expert("a", INT64_MAX)).ok());
  ASSERT_TRUE(s.Register(Expert("b", INT64_MAX)).ok());
  EXPECT_GT(s.target().version, 0u) << s.problem();
  EXPECT_TRUE(Covers(s.target(), c));
  for (const Node& n : s.nodes()) EXPECT_EQ(n.capacity, 48);
}

// A node keeps its role: an expert shard's id coming back as an attention node left the maps
// naming a shard nobody could reach, and its lapse never planned it out.
TEST(RouterState, ANodeKeepsItsRole) {
  const ModelConfig c = *PresetConfig("tiny");
  RouterState s(c, milliseconds(1000), PlacementOptions());
  ASSERT_TRUE(s.Register(Expert("a", 48)).ok());
  Node again = Expert("a", 48);
  again.role = NodeRole::kAttention;
  const absl::Status st = s.Register(again);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("role"), absl::string_view::npos) << st;
  ASSERT_EQ(s.nodes().size(), 1u);
  EXPECT_EQ(s.nodes()[0].role, NodeRole::kExpert);
}

// Load reports name routed experts of MoE layers, with finite token counts; a bad entry adds
// nothing (inf made the hot-replica arithmetic NaN; arbitrary keys were kept forever).
TEST(RouterState, LoadReportsAreChecked) {
  const ModelConfig c = *PresetConfig("tiny");  // layer 0 dense, 1-3 MoE, 16 experts
  RouterState s(c, milliseconds(1000), PlacementOptions());
  const std::map<ExpertKey, double> bad[] = {
      {{{1, 0}, 5.0}, {{1000000000, 0}, 1.0}},
      {{{0, 3}, 1.0}},
      {{{1, 16}, 1.0}},
      {{{1, -1}, 1.0}},
      {{{2, 2}, std::numeric_limits<double>::infinity()}},
      {{{2, 2}, std::nan("")}},
      {{{2, 2}, -1.0}},
      {{{2, 2}, 1e300}},
  };
  for (const auto& load : bad) {
    EXPECT_EQ(s.ReportLoad(load).code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_TRUE(s.load().empty());
  ASSERT_TRUE(s.ReportLoad({{{3, 15}, 2.0}, {{1, 0}, 1.0}}).ok());
  EXPECT_EQ(s.load(), (std::map<ExpertKey, double>{{{1, 0}, 1.0}, {{3, 15}, 2.0}}));
}

TEST(RouterState, RestartGraceAndVersionsAboveWhatNodesKnow) {
  const ModelConfig c = *PresetConfig("tiny");
  FakeClock clock;
  RouterState s(
      c, milliseconds(1000), PlacementOptions(), [&] { return clock.now; }, milliseconds(500));
  ASSERT_TRUE(s.Register(Expert("a", 48), 7).ok());
  EXPECT_EQ(s.target().version, 0u);  // grace: b may still come back
  ASSERT_TRUE(s.Register(Expert("b", 48), 7).ok());
  clock.now += milliseconds(300);
  s.ExpireLeases();
  EXPECT_EQ(s.target().version, 0u);
  clock.now += milliseconds(300);
  s.ExpireLeases();
  const PlacementMap m = s.target();
  EXPECT_EQ(m.version, 8u);  // above the 7 the nodes knew
  EXPECT_EQ(m.shards.size(), 2u);
}

TEST(RouterState, FirstMapWaitsForTheExpectedShards) {
  const ModelConfig c = *PresetConfig("tiny");
  RouterState s(c, milliseconds(1000), PlacementOptions());
  s.set_min_shards(3);
  ASSERT_TRUE(s.Register(Expert("a", 48)).ok());  // a alone could hold everything
  ASSERT_TRUE(s.Register(Expert("b", 48)).ok());
  EXPECT_EQ(s.target().version, 0u);
  EXPECT_NE(s.problem().find("waiting for 3 expert shards (2 registered)"), std::string::npos);
  ASSERT_TRUE(s.Register(Expert("c", 48)).ok());
  EXPECT_EQ(s.target().version, 1u);
  EXPECT_EQ(s.target().shards.size(), 3u);
  // Later maps may have fewer (failover).
  ASSERT_TRUE(s.Deregister("c").ok());
  EXPECT_EQ(s.target().shards.size(), 2u);
}

TEST(RouterState, RebalanceAddsReplicasOfHotExperts) {
  const ModelConfig c = *PresetConfig("tiny");
  PlacementOptions o;
  o.max_extra_replicas = 8;
  RouterState s(c, milliseconds(1000), o);
  for (const char* id : {"a", "b", "c", "d"}) ASSERT_TRUE(s.Register(Expert(id, 16)).ok());
  const uint64_t before = s.placement().version;
  std::map<ExpertKey, double> load;
  for (int64_t l = 1; l < 4; ++l) {
    for (int64_t e = 0; e < 16; ++e) load[{l, e}] = e == 0 ? 5000 : 10;
  }
  ASSERT_TRUE(s.ReportLoad(load).ok());
  s.Rebalance();
  const PlacementMap m = s.target();
  EXPECT_GT(m.version, before);
  EXPECT_GT(m.replicas.at({1, 0}).size(), 1u);
}

// Replicas must compute alike: a node whose model or numerics differ is refused, naming both; the
// roles are checked separately, and a node may register again as it was.
TEST(RouterState, RefusesAnotherModelAndUnlikeNumerics) {
  const ModelConfig c = *PresetConfig("tiny");
  FakeClock clock;
  RouterState s(c, milliseconds(1000), PlacementOptions(), [&] { return clock.now; });
  auto with = [&](Node n, const std::string& numerics, NodeRole role = NodeRole::kExpert) {
    n.numerics = numerics;
    n.role = role;
    n.model = ModelFingerprint(c);
    return n;
  };
  ASSERT_TRUE(s.Register(with(Expert("a", 30), "experts=int8 device=cpu")).ok());
  const absl::Status unlike = s.Register(with(Expert("b", 30), "experts=bf16 device=cpu"));
  EXPECT_EQ(unlike.code(), absl::StatusCode::kFailedPrecondition);
  for (const char* part : {"numerics", "expert shard b", "experts=bf16 device=cpu",
                           "expert shard a", "experts=int8 device=cpu", "--expert-dtype"}) {
    EXPECT_NE(unlike.message().find(part), absl::string_view::npos) << part << ": " << unlike;
  }
  EXPECT_EQ(s.nodes().size(), 1u);  // b was not added
  ASSERT_TRUE(s.Register(with(Expert("c", 30), "experts=int8 device=cpu")).ok());
  ASSERT_TRUE(s.Register(with(Expert("a", 30), "experts=int8 device=cpu")).ok());  // again
  // Attention nodes are compared with attention nodes only.
  ASSERT_TRUE(
      s.Register(with(Expert("x", 0), "weights=f32 device=cpu kv=f32", NodeRole::kAttention)).ok());
  const absl::Status attention =
      s.Register(with(Expert("y", 0), "weights=f32 device=cpu kv=bf16", NodeRole::kAttention));
  EXPECT_EQ(attention.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(attention.message().find("--kv-cache-dtype"), absl::string_view::npos) << attention;
  // Another model's config.
  ModelConfig other = c;
  other.n_routed_experts = 8;
  Node d = with(Expert("d", 30), "experts=int8 device=cpu");
  d.model = ModelFingerprint(other);
  EXPECT_NE(d.model, ModelFingerprint(c));
  const absl::Status model = s.Register(d);
  EXPECT_EQ(model.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(model.message().find("model_fingerprint"), absl::string_view::npos) << model;
  // A node that does not say how it computes (an older build) is not compared.
  ASSERT_TRUE(s.Register(with(Expert("e", 30), "")).ok());
  // Once every int8 shard is gone, a bf16 shard may start the role afresh.
  clock.now += milliseconds(1500);
  s.ExpireLeases();
  EXPECT_TRUE(s.Register(with(Expert("b", 30), "experts=bf16 device=cpu")).ok());
}

// The service on 127.0.0.1:0 (its port in *port).
std::unique_ptr<grpc::Server> Serve(RouterServiceImpl* service, int* port) {
  grpc::ServerBuilder b;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), port);
  b.RegisterService(service);
  return b.BuildAndStart();
}

// Over gRPC: a RouterMember whose numerics differ from a registered shard's is refused, stops
// trying and reports why.
TEST(RouterService, MemberWithUnlikeNumericsIsRefused) {
  const ModelConfig c = *PresetConfig("tiny");
  RouterState state(c, milliseconds(5000), PlacementOptions());
  RouterServiceImpl service(&state, "");
  int port = 0;
  auto server = Serve(&service, &port);
  ASSERT_NE(server, nullptr);
  MemberOptions mo;
  mo.router_address = "127.0.0.1:" + std::to_string(port);
  auto registration = [&](const std::string& id, const std::string& numerics) {
    internal::RegisterRequest r;
    r.set_node_id(id);
    r.set_role(internal::EXPERT);
    r.set_grpc_address("127.0.0.1:7");
    r.set_capacity_experts(64);
    r.set_model_fingerprint(ModelFingerprint(c));
    r.set_numerics(numerics);
    return r;
  };
  RouterMember first(mo), second(mo);
  first.StartMembership(registration("s0", "experts=int8 device=cpu"), nullptr);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (state.nodes().empty() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(10));
  }
  ASSERT_EQ(state.nodes().size(), 1u);
  Mutex mu;
  std::string why;
  second.StartMembership(registration("s1", "experts=f32 device=cpu"), nullptr,
                         [&](const std::string& w) {
                           MutexLock l(&mu);
                           why = w;
                         });
  while (!second.refused() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(10));
  }
  EXPECT_TRUE(second.refused());
  {
    MutexLock l(&mu);
    EXPECT_NE(why.find("experts=f32 device=cpu"), std::string::npos) << why;
  }
  EXPECT_FALSE(first.refused());
  EXPECT_EQ(state.nodes().size(), 1u);
  first.Stop();
  second.Stop();
  server->Shutdown();
}

// A node that was registered and is refused later (its lease lapsed and an unlike node registered
// meanwhile, as after a router restart) serves on: no on_refused, and it keeps trying.
TEST(RouterService, MemberRefusedAfterItWasRegisteredServesOn) {
  const ModelConfig c = *PresetConfig("tiny");
  FakeClock clock;
  Mutex clock_mu;
  RouterState state(c, milliseconds(300), PlacementOptions(), [&] {
    MutexLock l(&clock_mu);
    return clock.now;
  });
  RouterServiceImpl service(&state, "");
  int port = 0;
  auto server = Serve(&service, &port);
  ASSERT_NE(server, nullptr);
  MemberOptions mo;
  mo.router_address = "127.0.0.1:" + std::to_string(port);
  internal::RegisterRequest r;
  r.set_node_id("s0");
  r.set_role(internal::EXPERT);
  r.set_grpc_address("127.0.0.1:7");
  r.set_capacity_experts(64);
  r.set_numerics("experts=int8 device=cpu");
  std::atomic<bool> called{false};
  RouterMember member(mo);
  member.StartMembership(r, nullptr, [&](const std::string&) { called = true; });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (state.nodes().empty() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(10));
  }
  ASSERT_EQ(state.nodes().size(), 1u);
  {
    MutexLock l(&clock_mu);
    clock.now += milliseconds(1000);
  }
  state.ExpireLeases();
  Node other = Expert("s1", 64);
  other.numerics = "experts=f32 device=cpu";
  ASSERT_TRUE(state.Register(other).ok());
  // s0's next heartbeats find it gone, register again and are refused: give it a few.
  std::this_thread::sleep_for(milliseconds(600));
  EXPECT_FALSE(called);
  EXPECT_FALSE(member.refused());
  ASSERT_EQ(state.nodes().size(), 1u);
  EXPECT_EQ(state.nodes()[0].id, "s1");
  member.Stop();
  server->Shutdown();
}

TEST(RouterService, TokenRegisterAndWatch) {
  const ModelConfig c = *PresetConfig("tiny");
  RouterState state(c, milliseconds(5000), PlacementOptions());
  RouterServiceImpl service(&state, "secret");
  int port = 0;
  auto server = Serve(&service, &port);
  ASSERT_NE(server, nullptr);
  auto stub = internal::RouterService::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  internal::RegisterRequest req;
  req.set_node_id("shard-0");
  req.set_role(internal::EXPERT);
  req.set_grpc_address("127.0.0.1:7");
  req.set_capacity_experts(64);
  req.set_ucx_address("127.0.0.1:8");
  internal::RegisterReply reply;
  {
    grpc::ClientContext ctx;
    EXPECT_EQ(stub->Register(&ctx, req, &reply).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  // Watch first, then register: the stream delivers the empty map, then version 1.
  grpc::ClientContext wctx;
  wctx.AddMetadata("x-dmoe-cluster-token", "secret");
  auto watch = stub->WatchPlacement(&wctx, internal::WatchRequest());
  internal::PlacementUpdate u;
  ASSERT_TRUE(watch->Read(&u));
  EXPECT_EQ(u.version(), 0u);
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-dmoe-cluster-token", "secret");
    ASSERT_TRUE(stub->Register(&ctx, req, &reply).ok());
  }
  // Active once the shard reports the version ready.
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-dmoe-cluster-token", "secret");
    internal::HeartbeatRequest hb;
    hb.set_node_id("shard-0");
    hb.set_ready_version(1);
    internal::HeartbeatReply hr;
    ASSERT_TRUE(stub->Heartbeat(&ctx, hb, &hr).ok());
  }
  ASSERT_TRUE(watch->Read(&u));
  EXPECT_EQ(u.version(), 1u);
  EXPECT_EQ(u.active_version(), 1u);
  EXPECT_EQ(u.replicas_size(), 48);
  EXPECT_EQ(u.replicas(0).node_ids(0), "shard-0");
  EXPECT_EQ(u.grpc_addresses().at("shard-0"), "127.0.0.1:7");
  EXPECT_EQ(u.ucx_addresses().at("shard-0"), "127.0.0.1:8");
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-dmoe-cluster-token", "secret");
    internal::ListNodesReply nodes;
    ASSERT_TRUE(stub->ListNodes(&ctx, internal::ListNodesRequest(), &nodes).ok());
    ASSERT_EQ(nodes.nodes_size(), 1);
    EXPECT_GT(nodes.nodes(0).lease_remaining_ms(), 0);
  }
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-dmoe-cluster-token", "wrong");
    auto w = stub->WatchPlacement(&ctx, internal::WatchRequest());
    internal::PlacementUpdate x;
    EXPECT_FALSE(w->Read(&x));
    EXPECT_EQ(w->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  wctx.TryCancel();
  while (watch->Read(&u)) {
  }
  watch->Finish();
  server->Shutdown();
}

// Each placement update is the whole map: a watcher that reads slowly gets the newest one, not
// a backlog of every version since (the router queued them all, ~0.5 MB each on V3, without
// bound).
TEST(RouterService, ASlowWatcherGetsTheNewestMapNotABacklog) {
  const ModelConfig c = *PresetConfig("tiny");
  RouterState state(c, milliseconds(600000), PlacementOptions());
  RouterServiceImpl service(&state, "");
  int port = 0;
  auto server = Serve(&service, &port);
  ASSERT_NE(server, nullptr);
  // No BDP probing: the client's receive window stays at its default, so what the transport
  // buffers for a client that does not read is bounded and does not depend on timing.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  auto stub = internal::RouterService::NewStub(grpc::CreateCustomChannel(
      "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials(), args));
  auto big = [](const std::string& id) {  // ~60 KiB of worker address: every update is large
    Node n = Expert(id, 48);
    n.ucx_worker_address = std::string(60000, 'a');
    return n;
  };
  for (const char* id : {"a", "b", "c"}) ASSERT_TRUE(state.Register(big(id)).ok());
  grpc::ClientContext wctx;
  internal::WatchRequest wr;
  wr.set_targets(true);
  auto watch = stub->WatchPlacement(&wctx, wr);
  internal::PlacementUpdate u;
  ASSERT_TRUE(watch->Read(&u));
  const uint64_t first = u.version();
  // 300 new targets (c out, c in, ...), a few ms apart so that each is pushed, none read.
  constexpr int kChanges = 300;
  for (int i = 0; i < kChanges; ++i) {
    if (i % 2 == 0) {
      ASSERT_TRUE(state.Deregister("c").ok());
    } else {
      ASSERT_TRUE(state.Register(big("c")).ok());
    }
    std::this_thread::sleep_for(milliseconds(2));
  }
  const uint64_t last = state.target().version;
  ASSERT_EQ(last, first + kChanges);
  int reads = 0;
  while (u.version() != last && reads < 2 * kChanges && watch->Read(&u)) ++reads;
  EXPECT_EQ(u.version(), last);
  // What the transport had taken before the client stopped reading, then the newest.
  EXPECT_LT(reads, 20) << "read " << reads << " updates to reach the newest";
  std::printf("%d reads to reach version %llu from %llu\n", reads,
              static_cast<unsigned long long>(last), static_cast<unsigned long long>(first));
  wctx.TryCancel();
  while (watch->Read(&u)) {
  }
  watch->Finish();
  server->Shutdown();
}

// A router that takes every registration and forgets it at once (a lease shorter than a round
// trip, or two routers behind one address): every heartbeat is NOT_FOUND.
class ForgetfulRouter final : public internal::RouterService::Service {
 public:
  grpc::Status Register(grpc::ServerContext*, const internal::RegisterRequest*,
                        internal::RegisterReply* reply) override {
    ++registers;
    reply->set_lease_ms(300);
    return grpc::Status::OK;
  }
  grpc::Status Heartbeat(grpc::ServerContext*, const internal::HeartbeatRequest*,
                         internal::HeartbeatReply*) override {
    ++heartbeats;
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "no such node");
  }
  std::atomic<int> registers{0}, heartbeats{0};
};

// A member whose heartbeats the router keeps answering NOT_FOUND registers again and heartbeats
// once more per round, then waits its interval. It recursed (register, heartbeat, register, ...)
// without waiting and without end: a tight RPC loop that overflowed the stack and never stopped.
// (A fake router: the real one cannot be made to forget a node between two calls.)
TEST(RouterMember, ARouterThatForgetsAtOnceCostsTwoCallsPerRound) {
  ForgetfulRouter router;
  int port = 0;
  grpc::ServerBuilder b;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  b.RegisterService(&router);
  auto server = b.BuildAndStart();
  ASSERT_NE(server, nullptr);
  MemberOptions mo;
  mo.router_address = "127.0.0.1:" + std::to_string(port);
  internal::RegisterRequest r;
  r.set_node_id("s0");
  r.set_role(internal::EXPERT);
  {
    RouterMember member(mo);
    member.StartMembership(r, nullptr, nullptr);
    std::this_thread::sleep_for(milliseconds(1000));
    const auto t0 = std::chrono::steady_clock::now();
    member.Stop();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(1000));
  }
  // Rounds every 100 ms (a failed round's retry interval): ~10 in 1 s, 2 registrations and 2
  // heartbeats each.
  std::printf("%d registrations, %d heartbeats in 1 s\n", router.registers.load(),
              router.heartbeats.load());
  EXPECT_GE(router.heartbeats.load(), 2);
  EXPECT_LE(router.heartbeats.load(), 60);
  server->Shutdown();
}

// A TCP proxy on 127.0.0.1 in front of `target_port` whose Freeze() makes every connection it
// carries go silent without closing (what a host that died or was cut off looks like): nothing
// is forwarded on them any more, while connections made afterwards are carried as usual.
class FreezingProxy {
 public:
  explicit FreezingProxy(int target_port) : target_port_(target_port) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    listen(listen_fd_, 64);
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    accepter_ = std::thread([this] { Accept(); });
  }
  ~FreezingProxy() {
    stop_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);
    accepter_.join();
    for (std::thread& t : pumps_) t.join();
    close(listen_fd_);
  }
  int port() const { return port_; }
  void Freeze() { ++generation_; }

 private:
  void Accept() {
    for (;;) {
      const int in = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (in < 0) return;
      const int out = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      a.sin_port = htons(static_cast<uint16_t>(target_port_));
      if (connect(out, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
        close(in);
        close(out);
        continue;
      }
      const int born = generation_;
      pumps_.emplace_back([this, in, out, born] { Pump(in, out, born); });
    }
  }
  // Copies both ways until either side closes, the proxy stops, or (frozen) forever silent.
  void Pump(int a, int b, int born) {
    char buf[16384];
    while (!stop_) {
      if (generation_ != born) {  // frozen: hold both sockets open, forward nothing
        std::this_thread::sleep_for(milliseconds(20));
        continue;
      }
      pollfd p[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
      if (poll(p, 2, 20) <= 0 || generation_ != born) continue;
      bool closed = false;
      for (int i = 0; i < 2; ++i) {
        if ((p[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
        const ssize_t n = read(p[i].fd, buf, sizeof(buf));
        if (n <= 0 || send(p[1 - i].fd, buf, static_cast<size_t>(n), MSG_NOSIGNAL) != n) {
          closed = true;
        }
      }
      if (closed) break;
    }
    close(a);
    close(b);
  }

  const int target_port_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<int> generation_{0};
  std::atomic<bool> stop_{false};
  std::thread accepter_;
  std::vector<std::thread> pumps_;  // only the accepter adds, only the destructor joins
};

// The router's host dies without closing its connections (or is cut off), and a new router is
// reachable at the same address: a member's watch notices within seconds (keepalive pings go
// unanswered) and reconnects, so it sees the maps planned after. Before, its Read waited on the
// dead connection until TCP gave up (about 15 minutes), holding the node to an old map, and its
// heartbeats timed out on the same connection, so its lease lapsed at the new router.
TEST(RouterService, AMemberLeavesADeadRouterConnectionWithinSeconds) {
  const ModelConfig c = *PresetConfig("tiny");
  RouterState state(c, milliseconds(600000), PlacementOptions());
  RouterServiceImpl service(&state, "");
  int port = 0;
  grpc::ServerBuilder b;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  // As dmoe's servers do (common/service.cc): clients' keepalive pings are welcome.
  b.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 500);
  b.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  b.RegisterService(&service);
  auto server = b.BuildAndStart();
  ASSERT_NE(server, nullptr);
  FreezingProxy proxy(port);
  MemberOptions mo;
  mo.router_address = "127.0.0.1:" + std::to_string(proxy.port());
  RouterMember member(mo);
  std::atomic<uint64_t> seen{0};
  member.StartWatch(/*targets=*/true,
                    [&](const internal::PlacementUpdate& u) { seen = u.version(); });
  const auto wait_for = [&](uint64_t v, std::chrono::seconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (seen < v && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(milliseconds(20));
    return seen >= v;
  };
  ASSERT_TRUE(state.Register(Expert("a", 48)).ok());
  ASSERT_TRUE(wait_for(state.target().version, std::chrono::seconds(10)));
  proxy.Freeze();
  const auto frozen = std::chrono::steady_clock::now();
  ASSERT_TRUE(state.Register(Expert("b", 48)).ok());
  const uint64_t next = state.target().version;
  EXPECT_TRUE(wait_for(next, std::chrono::seconds(40)))
      << "the watch still waits on the dead connection";
  std::printf("the next map arrived %.1f s after the connection went silent\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - frozen).count());
  member.Stop();
  // The frozen connection's stream never ends on the server's side: bounded shutdown.
  server->Shutdown(std::chrono::system_clock::now() + milliseconds(500));
}

}  // namespace
}  // namespace dmoe::router
