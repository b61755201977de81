// In-process tests of ExpertShardSet (the attention node's connection to its expert shards).
//
// ExpertShardSet has no transport seam: it always makes a UCX client, asks each shard's gRPC
// control API (static mode) or watches a router over gRPC (router mode). So these tests run, in
// this one process: real ExpertShard handlers behind real UCX servers (tcp over lo), a minimal
// ExpertControl.GetInfo service per shard (the real one lives in expert_service/main.cc, not in a
// library; this one answers the same fields from the shard's store), and for router mode the real
// RouterState + RouterServiceImpl on 127.0.0.1:0 (no dmoe-router process). The fault wrapper of
// remote_experts_test cannot be put under ExpertShardSet's UCX client, so failures here are real
// ones (a shard's data plane shut down).
#include "attention_service/shard_client.h"

#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "expert_service/expert_server.h"
#include "expert_service/expert_shard.h"
#include "gtest/gtest.h"
#include "model/routed_experts.h"
#include "model/safetensors.h"
#include "model/tiny_model.h"
#include "proto/expert_control.grpc.pb.h"
#include "router/router_service.h"
#include "router/router_state.h"
#include "transport/ucx.h"

namespace dmoe {
namespace {

using std::chrono::milliseconds;
using Keys = std::vector<std::pair<int64_t, int64_t>>;

void UcxOnLoopback() {
  setenv("UCX_TLS", "tcp,self", 1);
  setenv("UCX_NET_DEVICES", "lo", 1);
  setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);
}

const ModelConfig& Config() {
  static const ModelConfig c = *PresetConfig("tiny");
  return c;
}

const Checkpoint& Ckpt() {
  static const std::unique_ptr<Checkpoint> ck = [] {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string d = std::string(tmp ? tmp : "/tmp") + "/shard_client_test_tiny";
    TinyModelOptions o;
    o.seed = 23;
    const absl::Status st = WriteTinyModel(d, Config(), o);
    if (!st.ok()) {
      ADD_FAILURE() << st;
      std::abort();
    }
    auto c = Checkpoint::Open(d);
    if (!c.ok()) {
      ADD_FAILURE() << c.status();
      std::abort();
    }
    return std::move(c).value();
  }();
  return *ck;
}

Keys ExpertsWhere(const std::function<bool(int64_t)>& keep) {
  Keys out;
  for (const auto& key : ExpertStore::AllExperts(Config())) {
    if (keep(key.second)) out.push_back(key);
  }
  return out;
}

std::shared_ptr<const ExpertStore> LoadStore(const Keys& keys) {
  auto s = ExpertStore::Load(Ckpt(), Config(), keys, WeightDType::kF32);
  EXPECT_TRUE(s.ok()) << s.status();
  return std::shared_ptr<const ExpertStore>(std::move(s).value());
}

bool Low(int64_t e) { return e < Config().n_routed_experts / 2; }
bool Any(int64_t) { return true; }

// Answers GetInfo with a fixed reply (GetStats is not used by ExpertShardSet).
class InfoService final : public internal::ExpertControl::CallbackService {
 public:
  explicit InfoService(internal::GetInfoReply info) {
    std::lock_guard<std::mutex> l(mu_);
    info_ = std::move(info);
  }
  ~InfoService() override { std::lock_guard<std::mutex> l(mu_); }
  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* ctx,
                                    const internal::GetInfoRequest*,
                                    internal::GetInfoReply* reply) override {
    std::lock_guard<std::mutex> l(
        mu_);  // orders the read after the constructor for TSan (gRPC's is unseen)
    *reply = info_;
    auto* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }

 private:
  std::mutex
      mu_;  // std::mutex, not absl::Mutex: TSan sees pthread locks, not uninstrumented absl's
  internal::GetInfoReply info_;
};

// One expert shard in this process: real handler, real UCX data plane, a GetInfo control API.
class UcxShard {
 public:
  struct Options {
    Keys hosted;
    int64_t hidden_size = 0;  // 0: the model's (reported by GetInfo)
    std::string ucx_address;  // empty: the real one (reported by GetInfo)
    std::string numerics = "experts=f32 device=cpu";
    std::string model_fingerprint;  // reported as is (empty: not checked)
  };
  explicit UcxShard(const Options& o) : shard_(Config(), LoadStore(o.hosted)) {
    auto server = transport::NewUcxServer();
    EXPECT_TRUE(server.ok()) << server.status();
    server_ = std::move(server).value();
    auto a = server_->Listen("127.0.0.1:0");
    EXPECT_TRUE(a.ok()) << a.status();
    ucx_address_ = *a;
    loop_ = std::make_unique<ExpertServer>(&shard_, server_.get());
    loop_->Start();
    internal::GetInfoReply info;
    info.set_node_id("test-shard");
    info.set_ucx_address(o.ucx_address.empty() ? ucx_address_ : o.ucx_address);
    info.set_ucx_worker_address(server_->WorkerAddress());
    info.set_hidden_size(
        static_cast<uint32_t>(o.hidden_size ? o.hidden_size : Config().hidden_size));
    info.set_num_hidden_layers(static_cast<uint32_t>(Config().num_hidden_layers));
    info.set_n_routed_experts(static_cast<uint32_t>(Config().n_routed_experts));
    info.set_numerics(o.numerics);
    info.set_model_fingerprint(o.model_fingerprint);
    for (const auto& [l, e] : o.hosted) {
      auto* id = info.add_experts();
      id->set_layer(static_cast<uint32_t>(l));
      id->set_expert(static_cast<uint32_t>(e));
    }
    control_ = std::make_unique<InfoService>(info);
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(control_.get());
    grpc_ = b.BuildAndStart();
    EXPECT_NE(grpc_, nullptr);
    control_address_ = absl::StrCat("127.0.0.1:", port);
  }
  ~UcxShard() {
    if (grpc_) grpc_->Shutdown();
    StopDataPlane();
  }
  // Clients see the peer fail.
  void StopDataPlane() {
    if (loop_) loop_->Stop();
    if (server_) server_->Shutdown();
  }
  // Hangs: requests still arrive (the connection stays up) and are never answered.
  void StopAnswering() {
    if (loop_) loop_->Stop();
  }
  transport::ServerStats data_plane_stats() const { return server_->stats(); }
  const std::string& control_address() const { return control_address_; }
  const std::string& ucx_address() const { return ucx_address_; }
  std::string worker_address() const { return server_->WorkerAddress(); }
  const ExpertShard& shard() const { return shard_; }

 private:
  ExpertShard shard_;
  std::unique_ptr<transport::UcxServer> server_;
  std::unique_ptr<ExpertServer> loop_;
  std::string ucx_address_;
  std::unique_ptr<InfoService> control_;
  std::unique_ptr<grpc::Server> grpc_;
  std::string control_address_;
};

std::unique_ptr<UcxShard> StartShard(Keys hosted) {
  UcxShard::Options o;
  o.hosted = std::move(hosted);
  return std::make_unique<UcxShard>(o);
}

struct Batch {
  int64_t t = 0, k = 0;
  std::vector<float> x, w;
  std::vector<int32_t> ids;
};

Batch RandomBatch(int64_t t, uint32_t seed) {
  const ModelConfig& c = Config();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> weight(0.05f, 1.0f);
  Batch b;
  b.t = t;
  b.k = c.num_experts_per_tok;
  b.x.resize(static_cast<size_t>(t * c.hidden_size));
  for (float& v : b.x) v = normal(rng);
  for (int64_t i = 0; i < t; ++i) {
    std::vector<int32_t> pool(static_cast<size_t>(c.n_routed_experts));
    for (int32_t e = 0; e < c.n_routed_experts; ++e) pool[static_cast<size_t>(e)] = e;
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int64_t j = 0; j < b.k; ++j) {
      b.ids.push_back(pool[static_cast<size_t>(j)]);
      b.w.push_back(weight(rng));
    }
  }
  return b;
}

std::vector<float> RunLocal(const Batch& b, int64_t layer) {
  static const auto full = LoadStore(ExpertStore::AllExperts(Config()));
  LocalRoutedExperts local(Config(), full.get());
  std::vector<float> out(static_cast<size_t>(b.t * Config().hidden_size), 0.0f);
  EXPECT_TRUE(local.Begin(layer, b.x.data(), b.t, b.ids.data(), b.w.data(), b.k).ok());
  EXPECT_TRUE(local.Finish(out.data()).ok());
  return out;
}

absl::Status RunRemote(RemoteRoutedExperts* r, const Batch& b, int64_t layer,
                       std::vector<float>* out) {
  out->assign(static_cast<size_t>(b.t * Config().hidden_size), 0.0f);
  absl::Status st = r->Begin(layer, b.x.data(), b.t, b.ids.data(), b.w.data(), b.k);
  if (!st.ok()) return st;
  return r->Finish(out->data());
}

// Every value within 1e-5 of the largest |value| (the order of the f32 sum of a token's partial
// rows differs when its experts are on several shards; remote_experts_test bounds that exactly).
::testing::AssertionResult Close(const std::vector<float>& got, const std::vector<float>& want) {
  float scale = 0;
  for (float v : want) scale = std::max(scale, std::fabs(v));
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::fabs(got[i] - want[i]) <= 1e-5f * scale)) {
      return ::testing::AssertionFailure() << "at " << i << ": " << got[i] << " vs " << want[i];
    }
  }
  return ::testing::AssertionSuccess();
}

ShardClientOptions F32Options() {
  ShardClientOptions o;
  o.remote.dtype = wire::WireDType::kF32;
  o.remote.deadline = milliseconds(10000);
  o.control_deadline = milliseconds(5000);
  return o;
}

constexpr int64_t kLayer = 2;  // a MoE layer of "tiny"

// ------------------------------------------------------------------------------------------------
// Static mode (--expert-shards): GetInfo of each shard.

TEST(ExpertShardSetStatic, BuildsReplicasFromWhatShardsHostAndServesLikeLocal) {
  UcxOnLoopback();
  auto a = StartShard(ExpertsWhere(Low));
  auto b = StartShard(ExpertsWhere(Any));
  auto set =
      ExpertShardSet::Connect(Config(), {a->control_address(), b->control_address()}, F32Options());
  ASSERT_TRUE(set.ok()) << set.status();
  const ExpertRouting& r = (*set)->experts()->routing();
  EXPECT_EQ(r.version, 0u);
  EXPECT_EQ(r.names, (std::vector<std::string>{a->control_address(), b->control_address()}));
  ASSERT_EQ(r.peers.size(), 2u);
  EXPECT_NE(r.peers[0], r.peers[1]);
  for (int64_t l = 0; l < Config().num_hidden_layers; ++l) {
    for (int64_t e = 0; e < Config().n_routed_experts; ++e) {
      const std::vector<int> want = !Config().IsMoeLayer(l) ? std::vector<int>{}
                                    : Low(e)                ? std::vector<int>{0, 1}
                                                            : std::vector<int>{1};
      EXPECT_EQ(r.placement.Replicas(l, e), want) << "layer " << l << " expert " << e;
    }
  }
  EXPECT_EQ(&(*set)->experts_b()->routing(), &r);  // one routing for both clients
  EXPECT_EQ((*set)->member(), nullptr);
  EXPECT_FALSE((*set)->SwitchIfChanged());

  for (RemoteRoutedExperts* x : {(*set)->experts(), (*set)->experts_b()}) {
    const Batch batch = RandomBatch(12, 5);
    std::vector<float> out;
    const absl::Status st = RunRemote(x, batch, kLayer, &out);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_TRUE(Close(out, RunLocal(batch, kLayer)));
  }
  EXPECT_GT(a->shard().stats().messages, 0u);
  EXPECT_GT(b->shard().stats().messages, 0u);
  EXPECT_EQ(a->shard().stats().rejected + b->shard().stats().rejected, 0u);
}

TEST(ExpertShardSetStatic, NoAddressesIsInvalidArgument) {
  UcxOnLoopback();
  auto set = ExpertShardSet::Connect(Config(), {}, F32Options());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(set.status().message(), "no expert shard addresses");
}

TEST(ExpertShardSetStatic, UnreachableControlApiNamesTheShard) {
  UcxOnLoopback();
  auto a = StartShard(ExpertsWhere(Any));
  // A port nobody listens on: a listener opened and closed again.
  std::string dead;
  {
    InfoService unused{internal::GetInfoReply()};
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(&unused);
    auto s = b.BuildAndStart();
    ASSERT_NE(s, nullptr);
    dead = absl::StrCat("127.0.0.1:", port);
    s->Shutdown();
  }
  ShardClientOptions o = F32Options();
  o.control_deadline = milliseconds(1000);
  auto set = ExpertShardSet::Connect(Config(), {dead, a->control_address()}, o);
  EXPECT_EQ(set.status().code(), absl::StatusCode::kUnavailable) << set.status();
  EXPECT_TRUE(absl::StartsWith(set.status().message(),
                               absl::StrCat("expert shard ", dead, ": control API: ")))
      << set.status();
}

TEST(ExpertShardSetStatic, OtherModelShapeIsFailedPreconditionNamingTheShard) {
  UcxOnLoopback();
  UcxShard::Options o;
  o.hosted = ExpertsWhere(Any);
  o.hidden_size = 128;
  UcxShard a(o);
  auto set = ExpertShardSet::Connect(Config(), {a.control_address()}, F32Options());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(
      set.status().message(),
      absl::StrCat("expert shard ", a.control_address(),
                   " serves a different model shape (hidden_size 128, layers 4, experts 16)"));
}

// Shards that compute otherwise (another --expert-dtype) would make a request's output depend on
// which replica serves it: refused, naming both shards and both numerics.
TEST(ExpertShardSetStatic, ShardsThatComputeUnlikeTheFirstAreFailedPrecondition) {
  UcxOnLoopback();
  UcxShard::Options o;
  o.hosted = ExpertsWhere(Any);
  o.model_fingerprint = ModelFingerprint(Config());
  UcxShard a(o);
  o.numerics = "experts=int8 device=cpu";
  UcxShard b(o);
  auto set =
      ExpertShardSet::Connect(Config(), {a.control_address(), b.control_address()}, F32Options());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kFailedPrecondition);
  for (const std::string& part :
       {absl::StrCat("expert shard ", b.control_address(), " computes as \"experts=int8"),
        absl::StrCat("expert shard ", a.control_address(), " computes as \"experts=f32"),
        std::string("--expert-dtype")}) {
    EXPECT_NE(set.status().message().find(part), absl::string_view::npos) << set.status();
  }
  // Alike, they connect.
  o.numerics = "experts=f32 device=cpu";
  UcxShard c(o);
  EXPECT_TRUE(
      ExpertShardSet::Connect(Config(), {a.control_address(), c.control_address()}, F32Options())
          .ok());
}

TEST(ExpertShardSetStatic, AnotherModelIsFailedPrecondition) {
  UcxOnLoopback();
  ModelConfig other = Config();
  other.vocab_size += 1;  // the same MoE shape, another model
  UcxShard::Options o;
  o.hosted = ExpertsWhere(Any);
  o.model_fingerprint = ModelFingerprint(other);
  UcxShard a(o);
  auto set = ExpertShardSet::Connect(Config(), {a.control_address()}, F32Options());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(set.status().message().find("config.json differs"), absl::string_view::npos)
      << set.status();
}

TEST(ExpertShardSetStatic, UnreachableDataPlaneNamesTheShard) {
  UcxOnLoopback();
  // The control API answers, but points at a data plane that has gone away.
  auto gone = StartShard(ExpertsWhere(Any));
  const std::string gone_address = gone->ucx_address();
  gone.reset();
  UcxShard::Options o;
  o.hosted = ExpertsWhere(Any);
  o.ucx_address = gone_address;
  UcxShard a(o);
  auto set = ExpertShardSet::Connect(Config(), {a.control_address()}, F32Options());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kUnavailable) << set.status();
  EXPECT_TRUE(absl::StartsWith(
      set.status().message(),
      absl::StrCat("expert shard ", a.control_address(), ": data plane ", gone_address, ": ")))
      << set.status();
}

// Connect reaches CheckCovers only after it has connected every data plane, and on failure
// destroys its UCX client at once. Found by this test: a force-close while the endpoint's wireup
// was in flight made the shard's UCX 1.13.1 server abort its process (ucp_request.c:684 "got REP
// message", in about half of the runs); the client now flushes (bounded) before it closes.
TEST(ExpertShardSetStatic, ExpertWithoutShardIsInvalidArgumentNamingIt) {
  UcxOnLoopback();
  auto a = StartShard(ExpertsWhere(Low));
  auto set = ExpertShardSet::Connect(Config(), {a->control_address()}, F32Options());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  // Layer 0 is dense; the first MoE layer is 1, the first expert no shard hosts is 8.
  EXPECT_EQ(set.status().message(), "no expert shard hosts expert 8 of layer 1");
}

// The two clients (micro-batches a and b) share one PeerHealth: a shard that failed under one of
// them is not tried by the other. The failure is real: the shard's UCX server shuts down.
TEST(ExpertShardSetStatic, ClientsShareWhatTheyLearnAboutFailedShards) {
  UcxOnLoopback();
  auto a = StartShard(ExpertsWhere(Any));
  auto b = StartShard(ExpertsWhere(Any));
  std::vector<std::pair<std::string, bool>> trips;
  ShardClientOptions o = F32Options();
  o.remote.observer = [&](const std::string& shard, double, int64_t, uint64_t, uint64_t, bool ok) {
    trips.emplace_back(shard, ok);
  };
  auto set = ExpertShardSet::Connect(Config(), {a->control_address(), b->control_address()}, o);
  ASSERT_TRUE(set.ok()) << set.status();
  const Batch batch = RandomBatch(8, 9);
  std::vector<float> out;
  ASSERT_TRUE(RunRemote((*set)->experts(), batch, kLayer, &out).ok());
  EXPECT_EQ(trips.size(), 2u);  // both replicas served
  b->StopDataPlane();
  trips.clear();
  absl::Status st = RunRemote((*set)->experts(), batch, kLayer, &out);
  ASSERT_TRUE(st.ok()) << st;  // retried on a
  EXPECT_TRUE(Close(out, RunLocal(batch, kLayer)));
  EXPECT_GT((*set)->experts()->rerouted_pairs(), 0u);
  trips.clear();
  st = RunRemote((*set)->experts_b(), batch, kLayer, &out);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_TRUE(Close(out, RunLocal(batch, kLayer)));
  EXPECT_EQ(trips, (std::vector<std::pair<std::string, bool>>{{a->control_address(), true}}));
  EXPECT_EQ((*set)->experts_b()->rerouted_pairs(), 0u);
}

// ------------------------------------------------------------------------------------------------
// Router mode: the real RouterState and RouterServiceImpl in this process.

class InprocRouter {
 public:
  InprocRouter()
      : state_(Config(), milliseconds(600000), router::PlacementOptions()), service_(&state_, "") {
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(&service_);
    server_ = b.BuildAndStart();
    EXPECT_NE(server_, nullptr);
    address_ = absl::StrCat("127.0.0.1:", port);
  }
  ~InprocRouter() { server_->Shutdown(std::chrono::system_clock::now()); }
  // Registers an expert shard that can hold every expert (the test shards host all of them, so
  // any target is "loaded" at once).
  void Register(const std::string& id, const UcxShard& s) {
    router::Node n;
    n.id = id;
    n.role = router::NodeRole::kExpert;
    n.grpc_address = s.control_address();
    n.ucx_address = s.ucx_address();
    n.ucx_worker_address = s.worker_address();
    n.capacity = static_cast<int64_t>(ExpertStore::AllExperts(Config()).size());
    ASSERT_TRUE(state_.Register(n).ok());
  }
  // Every registered shard reports the newest target ready; returns the then active version.
  uint64_t AllReady() {
    const uint64_t v = state_.target().version;
    for (const router::Node& n : state_.nodes()) EXPECT_TRUE(state_.Heartbeat(n.id, v).ok());
    EXPECT_EQ(state_.placement().version, v);
    return v;
  }
  const std::string& address() const { return address_; }
  router::RouterState& state() { return state_; }

 private:
  router::RouterState state_;
  router::RouterServiceImpl service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

// Router mode with no revival or load report during the test.
ShardClientOptions RouterOptions(const InprocRouter& router) {
  ShardClientOptions o = F32Options();
  o.router = router.address();
  o.first_map_timeout = milliseconds(10000);
  o.revive_interval = milliseconds(3600000);
  o.load_report_interval = milliseconds(3600000);
  return o;
}

// Polls `done` (which may act, e.g. SwitchIfChanged) until it is true or `limit` passes. The
// engine calls SwitchIfChanged between steps; here the steps are as fast as the CPU allows.
bool Within(std::chrono::seconds limit, const std::function<bool()>& done) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < until) {
    if (done()) return true;
    std::this_thread::yield();
  }
  return done();
}

TEST(ExpertShardSetRouter, NoActiveMapIsUnavailableNamingTheRouter) {
  UcxOnLoopback();
  InprocRouter router;
  ShardClientOptions o = F32Options();
  o.router = router.address();
  o.first_map_timeout = milliseconds(300);
  auto set = ExpertShardSet::ConnectRouter(Config(), o);
  EXPECT_EQ(set.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StartsWith(
      set.status().message(),
      absl::StrCat("router ", router.address(), ": no active placement map within 300 ms")))
      << set.status();
}

// A shard joins: the router plans and activates a new map; both clients switch to it between
// steps, the new shard gets work, results stay local's.
TEST(ExpertShardSetRouter, SwitchesToTheNewActiveMapWhenAShardJoins) {
  UcxOnLoopback();
  InprocRouter router;
  auto s0 = StartShard(ExpertsWhere(Any));
  auto s1 = StartShard(ExpertsWhere(Any));
  router.Register("shard-0", *s0);
  const uint64_t v1 = router.AllReady();
  ASSERT_GT(v1, 0u);

  auto set = ExpertShardSet::ConnectRouter(Config(), RouterOptions(router));
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ((*set)->version(), v1);
  EXPECT_EQ((*set)->experts()->routing().version, v1);
  EXPECT_EQ((*set)->experts()->routing().names,
            (std::vector<std::string>{"shard-0@" + s0->control_address()}));
  const Batch batch = RandomBatch(10, 13);
  std::vector<float> out;
  ASSERT_TRUE(RunRemote((*set)->experts(), batch, kLayer, &out).ok());
  EXPECT_TRUE(Close(out, RunLocal(batch, kLayer)));
  EXPECT_EQ(s1->shard().stats().messages, 0u);

  router.Register("shard-1", *s1);
  const uint64_t v2 = router.AllReady();
  ASSERT_GT(v2, v1);
  ASSERT_TRUE(Within(std::chrono::seconds(20), [&] { return (*set)->SwitchIfChanged(); }))
      << "no switch to version " << v2;
  EXPECT_EQ((*set)->version(), v2);
  EXPECT_EQ((*set)->switches(), 1u);
  for (RemoteRoutedExperts* x : {(*set)->experts(), (*set)->experts_b()}) {
    EXPECT_EQ(x->routing().version, v2);
    EXPECT_EQ(x->routing().peers.size(), 2u);
    ASSERT_TRUE(RunRemote(x, batch, kLayer, &out).ok());
    EXPECT_TRUE(Close(out, RunLocal(batch, kLayer)));
  }
  EXPECT_GT(s1->shard().stats().messages, 0u);
  EXPECT_FALSE((*set)->SwitchIfChanged());  // nothing new
}

// A shard that hangs (its connection up, nothing answered) is marked failed by its deadline;
// once the router's map no longer names it, the switch to that map ends the connection (which
// would otherwise be kept, holding the hung requests' slots, for as long as the node runs): the
// shard sees its client's endpoint close.
TEST(ExpertShardSetRouter, AFailedShardTheMapDropsIsDisconnected) {
  UcxOnLoopback();
  InprocRouter router;
  auto s0 = StartShard(ExpertsWhere(Any));
  auto s1 = StartShard(ExpertsWhere(Any));
  router.Register("shard-0", *s0);
  router.Register("shard-1", *s1);
  const uint64_t v1 = router.AllReady();
  ShardClientOptions o = RouterOptions(router);
  o.remote.deadline = milliseconds(500);
  o.remote.hedge.factor = 0;
  auto set = ExpertShardSet::ConnectRouter(Config(), o);
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ((*set)->experts()->routing().peers.size(), 2u);
  const Batch batch = RandomBatch(16, 17);
  std::vector<float> out;
  ASSERT_TRUE(RunRemote((*set)->experts(), batch, kLayer, &out).ok());
  ASSERT_GT(s1->shard().stats().messages, 0u);  // both shards serve

  // The router's map puts each expert on one of the two: shard-1's are unserved until it drops.
  s1->StopAnswering();
  const absl::Status st = RunRemote((*set)->experts(), batch, kLayer, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_TRUE((*set)->health().Dead((*set)->experts()->routing().peers[1]));
  EXPECT_EQ(s1->data_plane_stats().peer_errors, 0u);  // its connection is still up

  ASSERT_TRUE(router.state().Deregister("shard-1").ok());
  const uint64_t v2 = router.AllReady();
  ASSERT_GT(v2, v1);
  ASSERT_TRUE(Within(std::chrono::seconds(20),
                     [&] {
                       (*set)->SwitchIfChanged();
                       return (*set)->version() == v2;
                     }))
      << "no switch to version " << v2;
  EXPECT_EQ((*set)->experts()->routing().peers.size(), 1u);
  EXPECT_TRUE(Within(std::chrono::seconds(10), [&] {
    return s1->data_plane_stats().peer_errors > 0;
  })) << "shard-1's connection was not ended";
  ASSERT_TRUE(RunRemote((*set)->experts(), batch, kLayer, &out).ok());
  EXPECT_TRUE(Close(out, RunLocal(batch, kLayer)));
}

// A map naming a shard whose UCX listener accepts and never answers: connecting to it waits out
// the address exchange's timeout (a host that lost power is like it). That wait is on the
// background thread; the engine's SwitchIfChanged never blocks (it waited for every connect).
TEST(ExpertShardSetRouter, SwitchIfChangedNeverWaitsForAConnect) {
  UcxOnLoopback();
  InprocRouter router;
  auto s0 = StartShard(ExpertsWhere(Any));
  router.Register("shard-0", *s0);
  const uint64_t v1 = router.AllReady();
  auto set = ExpertShardSet::ConnectRouter(Config(), RouterOptions(router));
  ASSERT_TRUE(set.ok()) << set.status();
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(listen(fd, 16), 0);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  router::Node x;
  x.id = "shard-x";
  x.grpc_address = "127.0.0.1:1";
  x.ucx_address = absl::StrCat("127.0.0.1:", ntohs(a.sin_port));
  x.capacity = static_cast<int64_t>(ExpertStore::AllExperts(Config()).size());
  ASSERT_TRUE(router.state().Register(x).ok());
  const uint64_t v2 = router.AllReady();
  ASSERT_GT(v2, v1);
  std::chrono::steady_clock::duration longest{0};
  ASSERT_TRUE(Within(std::chrono::seconds(20),
                     [&] {
                       const auto t0 = std::chrono::steady_clock::now();
                       (*set)->SwitchIfChanged();
                       longest = std::max(longest, std::chrono::steady_clock::now() - t0);
                       return (*set)->version() == v2;
                     }))
      << "no switch to version " << v2;
  EXPECT_LT(longest, milliseconds(200))
      << std::chrono::duration<double>(longest).count() << " s in one SwitchIfChanged";
  close(fd);
}

}  // namespace
}  // namespace dmoe
