// In-process tests of the attention side of dispatch/combine (RemoteRoutedExperts): real
// ExpertShard handlers served by ExpertServer over the real in-process transport, a tiny model
// written by WriteTinyModel, and FaultInjectingClient (a wrapper around the real client) for peers
// that refuse, fail, never answer, or answer garbage.
//
// Goldens: LocalRoutedExperts (the in-process implementation, which shares no dispatch/combine code
// with RemoteRoutedExperts), a float64 SwiGLU written here from the raw checkpoint tensors, and
// a bf16 rounding written here; counts and messages are derived by hand from the documented rules
// in remote_experts.h.
#include "attention_service/remote_experts.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
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
#include "transport/fault_transport.h"
#include "transport/inproc.h"

namespace dmoe {
namespace {

using Fault = testing::FaultInjectingClient::Fault;

const ModelConfig& Config() {
  static const ModelConfig c = *PresetConfig("tiny");
  return c;
}

const std::string& ModelDir() {
  static const std::string dir = [] {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string d = std::string(tmp ? tmp : "/tmp") + "/remote_experts_test_tiny";
    TinyModelOptions o;
    o.seed = 11;
    o.dtype = DType::kF32;
    const absl::Status st = WriteTinyModel(d, Config(), o);
    if (!st.ok()) {
      ADD_FAILURE() << st;
      std::abort();
    }
    return d;
  }();
  return dir;
}

const Checkpoint& Ckpt() {
  static const std::unique_ptr<Checkpoint> ck = [] {
    auto c = Checkpoint::Open(ModelDir());
    if (!c.ok()) {
      ADD_FAILURE() << c.status();
      std::abort();
    }
    return std::move(c).value();
  }();
  return *ck;
}

using Keys = std::vector<std::pair<int64_t, int64_t>>;

// Every (MoE layer, expert) with keep(expert).
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

const std::shared_ptr<const ExpertStore>& FullStore() {
  static const auto s = LoadStore(ExpertStore::AllExperts(Config()));
  return s;
}

// One expert shard in this process: the real handler behind the real in-process transport.
class InprocShard {
 public:
  explicit InprocShard(std::shared_ptr<const ExpertStore> store)
      : shard_(Config(), std::move(store)),
        server_(transport::NewInprocServer()),
        loop_(&shard_, server_.get()) {
    auto a = server_->Listen("inproc:0");
    EXPECT_TRUE(a.ok()) << a.status();
    address_ = *a;
    loop_.Start();
  }
  ~InprocShard() {
    loop_.Stop();
    server_->Shutdown();
  }
  const std::string& address() const { return address_; }
  const ExpertShard& shard() const { return shard_; }

 private:
  ExpertShard shard_;
  std::unique_ptr<transport::ServerTransport> server_;
  ExpertServer loop_;
  std::string address_;
};

// Shards, the real client wrapped in a FaultInjectingClient, and a placement over them.
class Cluster {
 public:
  // hosted[s]: the experts shard s really hosts. claimed[s] (default: hosted[s]): the experts the
  // placement says it hosts (a shard may be told to serve what it does not have).
  explicit Cluster(const std::vector<Keys>& hosted, const std::vector<Keys>& claimed = {})
      : placement_(Config().num_hidden_layers, Config().n_routed_experts) {
    for (size_t s = 0; s < hosted.size(); ++s) {
      shards_.push_back(std::make_unique<InprocShard>(LoadStore(hosted[s])));
      auto p = client_.Connect(shards_.back()->address());
      EXPECT_TRUE(p.ok()) << p.status();
      peers_.push_back(*p);
      names_.push_back(std::string("shard-") + static_cast<char>('a' + s));
      placement_.Add(static_cast<int>(s), claimed.empty() ? hosted[s] : claimed[s]);
    }
  }
  std::shared_ptr<const ExpertRouting> Routing() const {
    auto r = std::make_shared<ExpertRouting>();
    r->peers = peers_;
    r->names = names_;
    r->placement = placement_;
    return r;
  }
  std::unique_ptr<RemoteRoutedExperts> Client(RemoteExpertsOptions o,
                                              std::shared_ptr<PeerHealth> health = nullptr) {
    if (!health) health = std::make_shared<PeerHealth>();
    return std::make_unique<RemoteRoutedExperts>(Config(), &client_, Routing(), std::move(health),
                                                 std::move(o));
  }
  testing::FaultInjectingClient& client() { return client_; }
  int peer(size_t s) const { return peers_[s]; }
  const std::string& name(size_t s) const { return names_[s]; }
  InprocShard& shard(size_t s) { return *shards_[s]; }
  std::vector<int>& peers() { return peers_; }

 private:
  std::vector<std::unique_ptr<InprocShard>> shards_;
  std::unique_ptr<transport::ClientTransport> real_ = transport::NewInprocClient();
  testing::FaultInjectingClient client_{real_.get()};
  std::vector<int> peers_;
  std::vector<std::string> names_;
  ExpertPlacement placement_;
};

// A batch of t tokens: x [t, D] ~ N(0, 1), k distinct experts per token (drawn among those
// allowed(token, expert) admits), weights in [0.05, 1).
struct Batch {
  int64_t t = 0, k = 0;
  std::vector<float> x, w;
  std::vector<int32_t> ids;
};

Batch RandomBatch(int64_t t, uint32_t seed,
                  const std::function<bool(int64_t, int32_t)>& allowed = nullptr) {
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
    std::vector<int32_t> pool;
    for (int32_t e = 0; e < c.n_routed_experts; ++e) {
      if (!allowed || allowed(i, e)) pool.push_back(e);
    }
    std::shuffle(pool.begin(), pool.end(), rng);
    EXPECT_GE(static_cast<int64_t>(pool.size()), b.k);
    for (int64_t j = 0; j < b.k; ++j) {
      b.ids.push_back(pool[static_cast<size_t>(j)]);
      b.w.push_back(weight(rng));
    }
  }
  return b;
}

// out [t, D] = 0 + LocalRoutedExperts over the full store.
std::vector<float> RunLocal(const Batch& b, int64_t layer, const std::vector<float>* x = nullptr) {
  LocalRoutedExperts local(Config(), FullStore().get());
  std::vector<float> out(static_cast<size_t>(b.t * Config().hidden_size), 0.0f);
  const float* xs = x ? x->data() : b.x.data();
  EXPECT_TRUE(local.Begin(layer, xs, b.t, b.ids.data(), b.w.data(), b.k).ok());
  const absl::Status st = local.Finish(out.data());
  EXPECT_TRUE(st.ok()) << st;
  return out;
}

absl::Status RunRemote(RemoteRoutedExperts* r, const Batch& b, int64_t layer,
                       std::vector<float>* out) {
  out->assign(static_cast<size_t>(b.t * Config().hidden_size), 0.0f);
  absl::Status st = r->Begin(layer, b.x.data(), b.t, b.ids.data(), b.w.data(), b.k);
  if (!st.ok()) return st;
  return r->Finish(out->data());
}

// Bitwise comparison with the first difference in the message.
::testing::AssertionResult SameBits(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "sizes " << got.size() << " vs " << want.size();
  }
  if (std::memcmp(got.data(), want.data(), sizeof(float) * got.size()) == 0) {
    return ::testing::AssertionSuccess();
  }
  size_t n = 0, first = got.size();
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      if (first == got.size()) first = i;
      ++n;
    }
  }
  return ::testing::AssertionFailure() << n << " of " << got.size() << " values differ; first at "
                                       << first << ": " << got[first] << " vs " << want[first];
}

// Round to nearest even bf16 (finite inputs), written here independently of model/dtype.h.
float RoundToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// float64 weight * Expert_e(x) straight from the checkpoint's raw tensors:
// down @ (silu(gate @ x) * (up @ x)).
std::vector<double> NaiveExpert(int64_t layer, int64_t e, const float* x) {
  const int64_t d = Config().hidden_size, w = Config().moe_intermediate_size;
  auto name = [&](const char* proj) {
    return absl::StrCat("model.layers.", layer, ".mlp.experts.", e, ".", proj, ".weight");
  };
  const std::vector<float> gate = *Ckpt().ReadFloat(name("gate_proj"), {w, d});
  const std::vector<float> up = *Ckpt().ReadFloat(name("up_proj"), {w, d});
  const std::vector<float> down = *Ckpt().ReadFloat(name("down_proj"), {d, w});
  std::vector<double> h(static_cast<size_t>(w)), y(static_cast<size_t>(d), 0.0);
  for (int64_t o = 0; o < w; ++o) {
    double g = 0, u = 0;
    for (int64_t i = 0; i < d; ++i) {
      g += static_cast<double>(gate[static_cast<size_t>(o * d + i)]) * x[i];
      u += static_cast<double>(up[static_cast<size_t>(o * d + i)]) * x[i];
    }
    h[static_cast<size_t>(o)] = g / (1.0 + std::exp(-g)) * u;
  }
  for (int64_t o = 0; o < d; ++o) {
    for (int64_t i = 0; i < w; ++i) {
      y[static_cast<size_t>(o)] +=
          static_cast<double>(down[static_cast<size_t>(o * w + i)]) * h[static_cast<size_t>(i)];
    }
  }
  return y;
}

RemoteExpertsOptions F32Options() {
  RemoteExpertsOptions o;
  o.dtype = wire::WireDType::kF32;
  o.deadline = std::chrono::milliseconds(10000);  // never reached unless a reply is withheld
  // No hedging: the fault tests count posts, round trips and rerouted pairs, and on a loaded
  // machine a hedge (50 ms before a shard has a record) could race a slow reply and move its
  // pairs first (CI saw rerouted_pairs() 0 instead of 32). HedgingOptions turns it back on.
  o.hedge.factor = 0;
  return o;
}

const std::vector<int64_t>& MoeLayers() {
  static const std::vector<int64_t> layers = [] {
    std::vector<int64_t> l;
    for (int64_t i = 0; i < Config().num_hidden_layers; ++i) {
      if (Config().IsMoeLayer(i)) l.push_back(i);
    }
    return l;
  }();
  return layers;
}

bool Low(int64_t e) { return e < Config().n_routed_experts / 2; }
bool High(int64_t e) { return !Low(e); }
bool Any(int64_t) { return true; }

// ------------------------------------------------------------------------------------------------
// ExpertPlacement (hand-computed).

TEST(ExpertPlacement, AddsReplicasOnceAndIgnoresOutOfRange) {
  ExpertPlacement p(/*layers=*/4, /*experts=*/16);
  p.Add(0, {{1, 3}, {1, 3}, {2, 15}, {1, 16}, {4, 0}, {-1, 0}, {1, -1}});
  p.Add(2, {{1, 3}});
  EXPECT_EQ(p.Replicas(1, 3), (std::vector<int>{0, 2}));
  EXPECT_EQ(p.Replicas(2, 15), (std::vector<int>{0}));
  EXPECT_TRUE(p.Replicas(1, 16).empty());
  EXPECT_TRUE(p.Replicas(4, 0).empty());
  EXPECT_TRUE(p.Replicas(-1, 0).empty());
  EXPECT_TRUE(p.Replicas(1, 4).empty());
}

TEST(ExpertPlacement, CheckCoversNamesTheFirstMissingExpertOfAMoeLayer) {
  ExpertPlacement p(Config().num_hidden_layers, Config().n_routed_experts);
  // Layer 0 is dense (first_k_dense_replace = 1): it needs nothing.
  Keys all = ExpertStore::AllExperts(Config());
  all.erase(std::remove(all.begin(), all.end(), std::make_pair(int64_t{2}, int64_t{5})), all.end());
  p.Add(0, all);
  const absl::Status st = p.CheckCovers(Config());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "no expert shard hosts expert 5 of layer 2");
  p.Add(1, {{2, 5}});
  EXPECT_TRUE(p.CheckCovers(Config()).ok());
}

// ------------------------------------------------------------------------------------------------
// Combine correctness.

// The independent float64 reference agrees with LocalRoutedExperts (so that the bitwise goldens
// below rest on a golden that computes the right function). Bound: each output is a sum of k
// weighted expert outputs, each a chain of f32 dot products of length D and I; 1e-4 of the
// row's largest |value| is ~100x the f32 error of such chains and far below any real mistake
// (a wrong weight, expert or token changes values by O(1) of the row's scale).
TEST(RemoteRoutedExperts, LocalGoldenMatchesFloat64Reference) {
  const Batch b = RandomBatch(3, 1);
  const int64_t d = Config().hidden_size;
  for (int64_t layer : MoeLayers()) {
    const std::vector<float> local = RunLocal(b, layer);
    for (int64_t i = 0; i < b.t; ++i) {
      std::vector<double> ref(static_cast<size_t>(d), 0.0);
      for (int64_t j = 0; j < b.k; ++j) {
        const std::vector<double> y =
            NaiveExpert(layer, b.ids[static_cast<size_t>(i * b.k + j)], b.x.data() + i * d);
        for (int64_t o = 0; o < d; ++o) {
          ref[static_cast<size_t>(o)] += b.w[static_cast<size_t>(i * b.k + j)] * y[o];
        }
      }
      double scale = 0;
      for (double v : ref) scale = std::max(scale, std::fabs(v));
      ASSERT_GT(scale, 1e-3);
      for (int64_t o = 0; o < d; ++o) {
        ASSERT_NEAR(local[static_cast<size_t>(i * d + o)], ref[static_cast<size_t>(o)],
                    1e-4 * scale)
            << "layer " << layer << " token " << i << " column " << o;
      }
    }
  }
}

// f32 wire, every token served by one shard: the shard computes exactly what LocalRoutedExperts
// computes (same expert groups, same row order, the weighted sum accumulated in the same expert
// order from 0) and the client adds that row onto out = 0, so the result must be bit-identical.
TEST(RemoteRoutedExperts, F32WireOneShardEqualsLocalBitwise) {
  Cluster cluster({ExpertsWhere(Any)});
  auto remote = cluster.Client(F32Options());
  for (int64_t t : {1, 5, 16, 40}) {
    for (int64_t layer : MoeLayers()) {
      const Batch b = RandomBatch(t, static_cast<uint32_t>(100 + t + layer));
      std::vector<float> out;
      ASSERT_TRUE(RunRemote(remote.get(), b, layer, &out).ok());
      EXPECT_TRUE(SameBits(out, RunLocal(b, layer))) << "t " << t << " layer " << layer;
    }
  }
  EXPECT_EQ(cluster.client().posts(cluster.peer(0)), 4u * MoeLayers().size());
}

// f32 wire, two shards hosting disjoint halves; even tokens use only the low half's experts and
// odd tokens only the high half's, so each token's partial row comes whole from one shard (and
// the experts of each shard see the same rows, in the same order, as locally): bit-identical.
TEST(RemoteRoutedExperts, F32WireTwoShardsDisjointTokensEqualLocalBitwise) {
  Cluster cluster({ExpertsWhere(Low), ExpertsWhere(High)});
  auto remote = cluster.Client(F32Options());
  auto split = [](int64_t token, int32_t e) { return token % 2 == 0 ? Low(e) : High(e); };
  for (int64_t layer : MoeLayers()) {
    const Batch b = RandomBatch(12, static_cast<uint32_t>(200 + layer), split);
    std::vector<float> out;
    ASSERT_TRUE(RunRemote(remote.get(), b, layer, &out).ok());
    EXPECT_TRUE(SameBits(out, RunLocal(b, layer))) << "layer " << layer;
  }
  // Hand count: 12 tokens, 6 per shard per layer, one message per shard per layer.
  for (size_t s = 0; s < 2; ++s) {
    EXPECT_EQ(cluster.client().posts(cluster.peer(s)), MoeLayers().size());
    EXPECT_EQ(cluster.client().tokens(cluster.peer(s)), 6u * MoeLayers().size());
    EXPECT_EQ(cluster.client().pairs(cluster.peer(s)), 6u * 4u * MoeLayers().size());
  }
}

// Each pair's unweighted expert output, rows [t * k, D]: LocalRoutedExperts on one pair per
// token with weight 1 (fma(1, e, 0) == e).
std::vector<float> PairRows(const Batch& b, int64_t layer, const std::vector<float>& x) {
  const int64_t d = Config().hidden_size;
  Batch single;
  single.t = b.t * b.k;
  single.k = 1;
  for (int64_t p = 0; p < b.t * b.k; ++p) {
    single.ids.push_back(b.ids[static_cast<size_t>(p)]);
    single.w.push_back(1.0f);
    single.x.insert(single.x.end(), x.begin() + (p / b.k) * d, x.begin() + (p / b.k + 1) * d);
  }
  return RunLocal(single, layer);
}

// The combine's definition written out independently: start from `init`, then for each rank j in
// order acc = fma(w_j, row_j, acc).
std::vector<float> RankedGolden(const Batch& b, const std::vector<float>& rows, float init) {
  const int64_t d = Config().hidden_size;
  std::vector<float> out(static_cast<size_t>(b.t * d), init);
  for (int64_t i = 0; i < b.t; ++i) {
    for (int64_t j = 0; j < b.k; ++j) {
      const float w = b.w[static_cast<size_t>(i * b.k + j)];
      for (int64_t c = 0; c < d; ++c) {
        float& o = out[static_cast<size_t>(i * d + c)];
        o = std::fma(w, rows[static_cast<size_t>((i * b.k + j) * d + c)], o);
      }
    }
  }
  return out;
}

// f32 wire, a token's experts on both shards: each shard returns one unweighted row per pair and
// the client sums them in top-k rank order, so the result is the local one bit for bit however
// the pairs are split (the old per-shard partial sums differed in the last bits).
TEST(RemoteRoutedExperts, F32WireSplitTokensEqualLocalBitwise) {
  Cluster cluster({ExpertsWhere(Low), ExpertsWhere(High)});
  auto remote = cluster.Client(F32Options());
  auto mixed = [](int64_t, int32_t e) { return e % 4 == 0 || e % 4 == 3; };  // both halves
  for (int64_t layer : MoeLayers()) {
    const Batch b = RandomBatch(6, static_cast<uint32_t>(300 + layer), mixed);
    std::vector<float> out;
    ASSERT_TRUE(RunRemote(remote.get(), b, layer, &out).ok());
    EXPECT_TRUE(SameBits(out, RunLocal(b, layer))) << "layer " << layer;
    EXPECT_TRUE(SameBits(out, RankedGolden(b, PairRows(b, layer, b.x), 0.0f))) << layer;
  }
}

// bf16 wire (the default): the client rounds x to bf16 (x~ = bf16(x)), the shard computes each
// pair's row on x~ and rounds it to bf16, the client sums the rows in rank order. Golden: that
// definition with an independent round-to-nearest-even. The same bits with one shard or with the
// pairs of every token split over two (which shard computed a row never matters).
TEST(RemoteRoutedExperts, Bf16WireEqualsRankedSumOfRoundedRowsOnAnySplit) {
  Cluster one({ExpertsWhere(Any)});
  Cluster two({ExpertsWhere(Low), ExpertsWhere(High)});
  RemoteExpertsOptions o = F32Options();
  o.dtype = wire::WireDType::kBF16;
  auto remote_one = one.Client(o);
  auto remote_two = two.Client(o);
  auto mixed = [](int64_t, int32_t e) { return e % 4 == 1 || e % 4 == 2; };
  for (int64_t layer : MoeLayers()) {
    const Batch b = RandomBatch(10, static_cast<uint32_t>(400 + layer), mixed);
    std::vector<float> x_rounded = b.x;
    for (float& v : x_rounded) v = RoundToBf16(v);
    ASSERT_NE(0, std::memcmp(x_rounded.data(), b.x.data(), sizeof(float) * b.x.size()));
    std::vector<float> rows = PairRows(b, layer, x_rounded);
    for (float& v : rows) v = RoundToBf16(v);
    const std::vector<float> want = RankedGolden(b, rows, 0.0f);
    EXPECT_FALSE(SameBits(want, RunLocal(b, layer, &x_rounded))) << "rounding should show";
    std::vector<float> out;
    ASSERT_TRUE(RunRemote(remote_one.get(), b, layer, &out).ok());
    EXPECT_TRUE(SameBits(out, want)) << "one shard, layer " << layer;
    ASSERT_TRUE(RunRemote(remote_two.get(), b, layer, &out).ok());
    EXPECT_TRUE(SameBits(out, want)) << "two shards, layer " << layer;
  }
}

// 1, 2 and 4 shards, with replicas (every expert on two of the four), and a failover mid-layer
// (shard 1 failing its wait, shard 3 refusing the post -- never both replicas of one expert --:
// their pairs go to the other replica):
// the same bits every time, f32 wire equal to in-process, bf16 wire equal to its one-shard run.
TEST(RemoteRoutedExperts, SameBitsForAnyShardCountReplicaChoiceAndFailover) {
  auto replica = [](int s) {
    return ExpertsWhere([s](int64_t e) { return e % 4 == s || (e + 1) % 4 == s; });
  };
  Cluster one({ExpertsWhere(Any)});
  Cluster two({ExpertsWhere(Low), ExpertsWhere(High)});
  Cluster four({replica(0), replica(1), replica(2), replica(3)});
  for (wire::WireDType dt : {wire::WireDType::kF32, wire::WireDType::kBF16}) {
    RemoteExpertsOptions o = F32Options();
    o.dtype = dt;
    for (int64_t t : {1, 7, 33}) {
      for (int64_t layer : MoeLayers()) {
        const Batch b = RandomBatch(t, static_cast<uint32_t>(600 + t + layer));
        std::vector<float> base;
        ASSERT_TRUE(RunRemote(one.Client(o).get(), b, layer, &base).ok());
        if (dt == wire::WireDType::kF32) {
          EXPECT_TRUE(SameBits(base, RunLocal(b, layer))) << "in-process, t " << t;
        }
        std::vector<float> out;
        ASSERT_TRUE(RunRemote(two.Client(o).get(), b, layer, &out).ok());
        EXPECT_TRUE(SameBits(out, base)) << "two shards, t " << t << " layer " << layer;
        ASSERT_TRUE(RunRemote(four.Client(o).get(), b, layer, &out).ok());
        EXPECT_TRUE(SameBits(out, base)) << "four shards, t " << t << " layer " << layer;
        four.client().SetFault(four.peer(1), testing::FaultInjectingClient::Fault::kFailWait);
        four.client().SetFault(four.peer(3), testing::FaultInjectingClient::Fault::kRefusePost);
        const absl::Status st = RunRemote(four.Client(o).get(), b, layer, &out);
        four.client().SetFault(four.peer(1), testing::FaultInjectingClient::Fault::kNone);
        four.client().SetFault(four.peer(3), testing::FaultInjectingClient::Fault::kNone);
        ASSERT_TRUE(st.ok()) << st;
        EXPECT_TRUE(SameBits(out, base)) << "failover, t " << t << " layer " << layer;
      }
    }
  }
}

// A step with more pairs for a shard than one message may carry goes as several messages of at
// most max_pairs_per_call pairs (whole tokens each), with the same bits: on one shard, over
// replicas, and with a shard failing (its messages' pairs go elsewhere).
TEST(RemoteRoutedExperts, ManyPairsGoAsSeveralMessagesWithTheSameBits) {
  const int64_t k = Config().num_experts_per_tok;
  Cluster one({ExpertsWhere(Any)});
  Cluster four({ExpertsWhere([](int64_t e) { return e % 2 == 0; }),
                ExpertsWhere([](int64_t e) { return e % 2 == 0; }),
                ExpertsWhere([](int64_t e) { return e % 2 == 1; }),
                ExpertsWhere([](int64_t e) { return e % 2 == 1; })});
  RemoteExpertsOptions o = F32Options();
  o.max_pairs_per_call = 3 * k;  // three tokens per message
  const int64_t layer = MoeLayers()[0];
  const Batch b = RandomBatch(31, 650);
  const std::vector<float> local = RunLocal(b, layer);
  std::vector<float> out;
  ASSERT_TRUE(RunRemote(one.Client(o).get(), b, layer, &out).ok());
  EXPECT_TRUE(SameBits(out, local));
  // Hand count: 31 tokens, three per message.
  EXPECT_EQ(one.client().posts(one.peer(0)), 11u);
  EXPECT_EQ(one.client().tokens(one.peer(0)), 31u);
  EXPECT_EQ(one.client().pairs(one.peer(0)), 31u * static_cast<uint64_t>(k));
  ASSERT_TRUE(RunRemote(four.Client(o).get(), b, layer, &out).ok());
  EXPECT_TRUE(SameBits(out, local)) << "four shards";
  four.client().SetFault(four.peer(0), Fault::kFailWait);
  const absl::Status st = RunRemote(four.Client(o).get(), b, layer, &out);
  four.client().SetFault(four.peer(0), Fault::kNone);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_TRUE(SameBits(out, local)) << "failover";
}

// With the default, a step whose pairs for one shard are more than a combine message can hold
// (wire::kMaxTokens rows) is split too; before, the shard's reply was refused as too large and
// the step failed.
TEST(RemoteRoutedExperts, AStepOverTheWiresLimitGoesAsTwoMessages) {
  const int64_t k = Config().num_experts_per_tok;
  ASSERT_EQ(MaxPairsPerMessage(Config().hidden_size, wire::WireDType::kF32), wire::kMaxTokens);
  Cluster one({ExpertsWhere(Any)});
  const int64_t t = wire::kMaxTokens / k + 5;
  const int64_t layer = MoeLayers()[0];
  const Batch b = RandomBatch(t, 651);
  std::vector<float> out;
  const absl::Status st = RunRemote(one.Client(F32Options()).get(), b, layer, &out);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_TRUE(SameBits(out, RunLocal(b, layer)));
  EXPECT_EQ(one.client().posts(one.peer(0)), 2u);
}

TEST(MaxPairsPerMessage, IsTheCombinesRowsOrBytesLimit) {
  // V3's width in f32: 2^31 / (7168 * 4 + 12) = 74866 pairs, over the 65536 rows; 16384 wide in
  // f32: 2^31 / (65536 + 12) = 32762.
  EXPECT_EQ(MaxPairsPerMessage(7168, wire::WireDType::kF32), 65536);
  EXPECT_EQ(MaxPairsPerMessage(16384, wire::WireDType::kF32), 32762);
  EXPECT_EQ(MaxPairsPerMessage(16384, wire::WireDType::kBF16), 65512);
}

// out is accumulated into, not overwritten (RoutedExperts::Finish: out += routed output): the
// ranked chain starts from out's values.
TEST(RemoteRoutedExperts, FinishAddsIntoOut) {
  Cluster cluster({ExpertsWhere(Any)});
  auto remote = cluster.Client(F32Options());
  const Batch b = RandomBatch(4, 7);
  const int64_t layer = MoeLayers()[0];
  std::vector<float> out(static_cast<size_t>(b.t * Config().hidden_size), 1.0f);
  ASSERT_TRUE(remote->Begin(layer, b.x.data(), b.t, b.ids.data(), b.w.data(), b.k).ok());
  ASSERT_TRUE(remote->Finish(out.data()).ok());
  EXPECT_TRUE(SameBits(out, RankedGolden(b, PairRows(b, layer, b.x), 1.0f)));
}

// ------------------------------------------------------------------------------------------------
// Replica choice.

// Every expert on both shards. Rule (remote_experts.h): a token goes to a replica it already
// reaches, else to the replica with the fewest tokens so far. So each token's k pairs go to one
// shard, and the tokens alternate: t = 16 gives 8 tokens (32 pairs) to each, one message each.
TEST(RemoteRoutedExperts, TwoReplicasSpreadTokensOverBothShards) {
  Cluster cluster({ExpertsWhere(Any), ExpertsWhere(Any)});
  auto remote = cluster.Client(F32Options());
  for (int64_t layer : MoeLayers()) {
    cluster.client().ResetCounts();
    const Batch b = RandomBatch(16, static_cast<uint32_t>(600 + layer));
    std::vector<float> out;
    ASSERT_TRUE(RunRemote(remote.get(), b, layer, &out).ok());
    for (size_t s = 0; s < 2; ++s) {
      EXPECT_EQ(cluster.client().posts(cluster.peer(s)), 1u) << "shard " << s;
      EXPECT_EQ(cluster.client().tokens(cluster.peer(s)), 8u) << "shard " << s;
      EXPECT_EQ(cluster.client().pairs(cluster.peer(s)), 32u) << "shard " << s;
    }
    // Each token is served whole by one shard, so the sum is local's, bit for bit.
    EXPECT_TRUE(SameBits(out, RunLocal(b, layer))) << "layer " << layer;
  }
  EXPECT_EQ(remote->round_trips(), 2u * MoeLayers().size());
  EXPECT_EQ(remote->rerouted_pairs(), 0u);
}

// A peer marked dead gets nothing: every token goes to the other replica, over several steps.
// PeerHealth never forgets (there is no time-based recovery): a peer comes back only as a new
// connection, which is what ExpertShardSet::Apply does for a dead shard a new map (or a revival)
// names -- here done by hand: Connect again, SetRouting with the new peer index.
TEST(RemoteRoutedExperts, DeadPeerGetsNothingUntilConnectedAgain) {
  Cluster cluster({ExpertsWhere(Any), ExpertsWhere(Any)});
  auto health = std::make_shared<PeerHealth>();
  auto remote = cluster.Client(F32Options(), health);
  health->MarkDead(cluster.peer(1));
  for (int step = 0; step < 3; ++step) {
    for (int64_t layer : MoeLayers()) {
      const Batch b = RandomBatch(9, static_cast<uint32_t>(700 + 10 * step + layer));
      std::vector<float> out;
      ASSERT_TRUE(RunRemote(remote.get(), b, layer, &out).ok());
      EXPECT_TRUE(SameBits(out, RunLocal(b, layer)));
    }
  }
  EXPECT_EQ(cluster.client().posts(cluster.peer(1)), 0u);
  EXPECT_EQ(cluster.client().tokens(cluster.peer(0)), 3u * 9u * MoeLayers().size());
  EXPECT_EQ(cluster.shard(1).shard().stats().messages, 0u);
  EXPECT_TRUE(health->Dead(cluster.peer(1)));
  EXPECT_FALSE(health->Dead(cluster.peer(0)));

  // Alive again: a new connection to the same shard, a new routing naming it.
  auto again = cluster.client().Connect(cluster.shard(1).address());
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_NE(*again, cluster.peer(1));
  auto routing = std::make_shared<ExpertRouting>(*cluster.Routing());
  routing->version = 2;
  routing->peers[1] = *again;
  remote->SetRouting(routing);
  EXPECT_EQ(remote->routing().version, 2u);
  cluster.client().ResetCounts();
  const Batch b = RandomBatch(16, 777);
  std::vector<float> out;
  ASSERT_TRUE(RunRemote(remote.get(), b, MoeLayers()[0], &out).ok());
  EXPECT_EQ(cluster.client().tokens(*again), 8u);
  EXPECT_EQ(cluster.client().tokens(cluster.peer(0)), 8u);
  EXPECT_EQ(cluster.client().posts(cluster.peer(1)), 0u);  // the old index stays dead
  EXPECT_TRUE(SameBits(out, RunLocal(b, MoeLayers()[0])));
}

// PeerHealth is shared by the clients of one ExpertShardSet (micro-batches a and b): a failure
// one of them sees keeps the other away from that peer.
TEST(RemoteRoutedExperts, FailureSeenByOneClientSteersTheOtherSharingHealth) {
  Cluster cluster({ExpertsWhere(Any), ExpertsWhere(Any)});
  auto health = std::make_shared<PeerHealth>();
  auto a = cluster.Client(F32Options(), health);
  auto b_client = cluster.Client(F32Options(), health);
  cluster.client().SetFault(cluster.peer(0), Fault::kFailWait);
  const Batch b = RandomBatch(8, 800);
  const int64_t layer = MoeLayers()[0];
  std::vector<float> out;
  ASSERT_TRUE(RunRemote(a.get(), b, layer, &out).ok());
  EXPECT_TRUE(health->Dead(cluster.peer(0)));
  cluster.client().SetFault(cluster.peer(0), Fault::kNone);
  cluster.client().ResetCounts();
  ASSERT_TRUE(RunRemote(b_client.get(), b, layer, &out).ok());
  EXPECT_EQ(cluster.client().posts(cluster.peer(0)), 0u);
  EXPECT_EQ(cluster.client().tokens(cluster.peer(1)), 8u);
  EXPECT_TRUE(SameBits(out, RunLocal(b, layer)));
}

// ------------------------------------------------------------------------------------------------
// Failures with a replica to fall back on: the call succeeds, with local's result.

struct RetryCase {
  const char* name;
  Fault fault;
  bool marks_dead;  // endpoint errors and deadlines mark the peer dead; a bad reply does not
};

class RetryOnOtherReplica : public ::testing::TestWithParam<RetryCase> {};

TEST_P(RetryOnOtherReplica, PairsGoToTheOtherShardAndTheResultIsLocals) {
  const RetryCase& rc = GetParam();
  Cluster cluster({ExpertsWhere(Any), ExpertsWhere(Any)});
  auto health = std::make_shared<PeerHealth>();
  RemoteExpertsOptions o = F32Options();
  std::vector<std::pair<std::string, bool>> trips;
  o.observer = [&](const std::string& shard, double, int64_t, uint64_t, uint64_t, bool ok) {
    trips.emplace_back(shard, ok);
  };
  auto remote = cluster.Client(o, health);
  cluster.client().SetFault(cluster.peer(0), rc.fault);
  const Batch b = RandomBatch(16, 900);
  const int64_t layer = MoeLayers()[1];
  std::vector<float> out;
  const absl::Status st = RunRemote(remote.get(), b, layer, &out);
  ASSERT_TRUE(st.ok()) << st;
  // 8 tokens (32 pairs) first went to shard a and were sent again to shard b, alone.
  EXPECT_EQ(remote->rerouted_pairs(), 32u);
  EXPECT_EQ(cluster.client().tokens(cluster.peer(1)), 16u);
  EXPECT_EQ(cluster.client().posts(cluster.peer(1)), 2u);
  EXPECT_TRUE(SameBits(out, RunLocal(b, layer)));
  EXPECT_EQ(health->Dead(cluster.peer(0)), rc.marks_dead);
  EXPECT_FALSE(health->Dead(cluster.peer(1)));
  // The observer saw every round trip (a refused post makes none); the failed one -- a transport
  // failure or a bad reply alike -- is reported as not ok (it feeds dmoe_transport_errors_total).
  std::sort(trips.begin(), trips.end());
  std::vector<std::pair<std::string, bool>> want_b = {{cluster.name(1), true},
                                                      {cluster.name(1), true}};
  if (rc.fault == Fault::kRefusePost) {
    EXPECT_EQ(trips, want_b);
  } else {
    ASSERT_EQ(trips.size(), 3u);
    EXPECT_EQ(trips[0].first, cluster.name(0));
    EXPECT_FALSE(trips[0].second) << rc.name;
    trips.erase(trips.begin());
    EXPECT_EQ(trips, want_b);
  }

  // Next step, fault gone: a dead peer still gets nothing; a live one serves again.
  cluster.client().SetFault(cluster.peer(0), Fault::kNone);
  cluster.client().ResetCounts();
  ASSERT_TRUE(RunRemote(remote.get(), b, layer, &out).ok());
  EXPECT_EQ(cluster.client().tokens(cluster.peer(0)), rc.marks_dead ? 0u : 8u);
  EXPECT_TRUE(SameBits(out, RunLocal(b, layer)));
}

INSTANTIATE_TEST_SUITE_P(
    Faults, RetryOnOtherReplica,
    ::testing::Values(RetryCase{"RefusedPost", Fault::kRefusePost, true},
                      RetryCase{"PeerFailsDuringCall", Fault::kFailWait, true},
                      RetryCase{"CorruptReply", Fault::kCorruptReply, false},
                      RetryCase{"TruncatedReply", Fault::kTruncateReply, false},
                      RetryCase{"ReplyToAnotherDispatch", Fault::kStaleReply, false}),
    [](const ::testing::TestParamInfo<RetryCase>& i) { return std::string(i.param.name); });

// A shard told to serve experts it does not host answers with an error message (the real
// handler, no injected fault): the client sends those tokens to the other replica and does not
// mark the shard dead (it is alive; the placement was stale).
TEST(RemoteRoutedExperts, ShardErrorReplyIsRetriedOnAnotherReplica) {
  Cluster cluster({ExpertsWhere(Low), ExpertsWhere(Any)},
                  /*claimed=*/{ExpertsWhere(Any), ExpertsWhere(Any)});
  auto health = std::make_shared<PeerHealth>();
  auto remote = cluster.Client(F32Options(), health);
  const Batch b = RandomBatch(16, 1000);
  const int64_t layer = MoeLayers()[2];
  std::vector<float> out;
  const absl::Status st = RunRemote(remote.get(), b, layer, &out);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_TRUE(SameBits(out, RunLocal(b, layer)));
  EXPECT_EQ(remote->rerouted_pairs(), 32u);
  EXPECT_FALSE(health->Dead(cluster.peer(0)));
  EXPECT_EQ(cluster.shard(0).shard().stats().rejected, 1u);
}

// ------------------------------------------------------------------------------------------------
// Failures without a replica: the layer fails with the documented code and a message naming the
// shard that failed, and the expert and layer left without a live replica.

// The first pair (in token-major order) whose expert satisfies pred.
int32_t FirstExpertWhere(const Batch& b, const std::function<bool(int64_t)>& pred) {
  for (int32_t e : b.ids) {
    if (pred(e)) return e;
  }
  ADD_FAILURE() << "no such expert in the batch";
  return -1;
}

TEST(RemoteRoutedExperts, PeerFailureWithoutReplicaIsUnavailableNamingShardExpertLayer) {
  Cluster cluster({ExpertsWhere(Low), ExpertsWhere(High)});
  auto remote = cluster.Client(F32Options());
  cluster.client().SetFault(cluster.peer(1), Fault::kFailWait);
  const Batch b = RandomBatch(8, 1100);
  const int64_t layer = MoeLayers()[0];
  std::vector<float> out;
  const absl::Status st = RunRemote(remote.get(), b, layer, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_EQ(st.message(),
            absl::StrCat("expert shard shard-b (layer ", layer,
                         "): injected: peer failed during the call; no live expert shard serves "
                         "expert ",
                         FirstExpertWhere(b, High), " of layer ", layer, " (shard-b: failed)"));
}

TEST(RemoteRoutedExperts, RefusedPostWithoutReplicaIsUnavailableNamingShardExpertLayer) {
  Cluster cluster({ExpertsWhere(Low), ExpertsWhere(High)});
  auto remote = cluster.Client(F32Options());
  cluster.client().SetFault(cluster.peer(0), Fault::kRefusePost);
  const Batch b = RandomBatch(8, 1200);
  const int64_t layer = MoeLayers()[1];
  std::vector<float> out;
  const absl::Status st = RunRemote(remote.get(), b, layer, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_EQ(st.message(),
            absl::StrCat("expert shard shard-a: injected: peer ", cluster.peer(0),
                         " refused the post; no live expert shard serves expert ",
                         FirstExpertWhere(b, Low), " of layer ", layer, " (shard-a: failed)"));
}

TEST(RemoteRoutedExperts, BadReplyWithoutReplicaIsUnavailable) {
  Cluster cluster({ExpertsWhere(Low), ExpertsWhere(High)});
  auto health = std::make_shared<PeerHealth>();
  auto remote = cluster.Client(F32Options(), health);
  cluster.client().SetFault(cluster.peer(1), Fault::kCorruptReply);
  const Batch b = RandomBatch(8, 1300);
  const int64_t layer = MoeLayers()[2];
  std::vector<float> out;
  const absl::Status st = RunRemote(remote.get(), b, layer, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_TRUE(
      absl::StartsWith(st.message(), absl::StrCat("expert shard shard-b (layer ", layer, "): ")))
      << st;
  EXPECT_TRUE(absl::EndsWith(
      st.message(), absl::StrCat("; no live expert shard serves expert ", FirstExpertWhere(b, High),
                                 " of layer ", layer, " (shard-b: failed in this step)")))
      << st;
  EXPECT_FALSE(health->Dead(cluster.peer(1)));  // alive, only its reply was bad
}

// Known dead before the call: Begin itself fails, naming the expert and layer.
TEST(RemoteRoutedExperts, DeadOnlyReplicaFailsBegin) {
  Cluster cluster({ExpertsWhere(Low), ExpertsWhere(High)});
  auto health = std::make_shared<PeerHealth>();
  auto remote = cluster.Client(F32Options(), health);
  health->MarkDead(cluster.peer(0));
  const Batch b = RandomBatch(5, 1400);
  const int64_t layer = MoeLayers()[0];
  const absl::Status st = remote->Begin(layer, b.x.data(), b.t, b.ids.data(), b.w.data(), b.k);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(st.message(),
            absl::StrCat("no live expert shard serves expert ", FirstExpertWhere(b, Low),
                         " of layer ", layer, " (shard-a: failed)"));
  EXPECT_EQ(cluster.client().posts(cluster.peer(1)), 0u);  // nothing was sent
}

// A peer that never answers: Wait ends at the deadline and the layer fails with UNAVAILABLE (as
// remote_experts.h says; it was DEADLINE_EXCEEDED, which told the client its own deadline had
// passed), naming the shard. The wait is bounded by the 200 ms deadline; the test checks that the
// call returned after it, not before (no upper timing bound is asserted).
TEST(RemoteRoutedExperts, DeadlineWithoutReplicaNamesShardAndLayer) {
  Cluster cluster({ExpertsWhere(Low), ExpertsWhere(High)});
  auto health = std::make_shared<PeerHealth>();
  RemoteExpertsOptions o = F32Options();
  o.deadline = std::chrono::milliseconds(200);
  auto remote = cluster.Client(o, health);
  cluster.client().SetFault(cluster.peer(1), Fault::kWithholdReply);
  const Batch b = RandomBatch(8, 1500);
  const int64_t layer = MoeLayers()[1];
  std::vector<float> out;
  const auto start = transport::Clock::now();
  const absl::Status st = RunRemote(remote.get(), b, layer, &out);
  EXPECT_GE(transport::Clock::now() - start, o.deadline);
  // UNAVAILABLE, not DEADLINE_EXCEEDED: the caller's own deadline has not passed.
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_EQ(st.message(),
            absl::StrCat("expert shard shard-b (layer ", layer,
                         "): injected: no reply before the deadline; no live expert shard serves "
                         "expert ",
                         FirstExpertWhere(b, High), " of layer ", layer, " (shard-b: failed)"));
  EXPECT_TRUE(health->Dead(cluster.peer(1)));
  EXPECT_FALSE(health->Dead(cluster.peer(0)));
}

// A deadline on one replica is retried on the other (remote_experts.h: "A shard that fails
// (endpoint error or deadline) is marked dead ... and its pairs are sent again to other live
// replicas in the same Finish"). Found by this test: the retry was waited for with the first
// round trip's deadline, already passed, so the healthy replica was failed at once and marked dead
// too, and the layer failed -- and in static mode every later step as well.
TEST(RemoteRoutedExperts, DeadlineOnOneReplicaIsRetriedOnTheOther) {
  Cluster cluster({ExpertsWhere(Any), ExpertsWhere(Any)});
  auto health = std::make_shared<PeerHealth>();
  RemoteExpertsOptions o = F32Options();
  o.deadline = std::chrono::milliseconds(200);
  auto remote = cluster.Client(o, health);
  cluster.client().SetFault(cluster.peer(0), Fault::kWithholdReply);
  const Batch b = RandomBatch(16, 1600);
  const int64_t layer = MoeLayers()[0];
  std::vector<float> out;
  const absl::Status st = RunRemote(remote.get(), b, layer, &out);
  EXPECT_TRUE(st.ok()) << st;
  EXPECT_FALSE(health->Dead(cluster.peer(1))) << "the healthy replica was marked dead";
  if (st.ok()) {
    EXPECT_TRUE(SameBits(out, RunLocal(b, layer)));
  }
  // The next step must still be served (by the healthy replica).
  cluster.client().SetFault(cluster.peer(0), Fault::kNone);
  const absl::Status next = RunRemote(remote.get(), b, layer, &out);
  EXPECT_TRUE(next.ok()) << next;
}

// ------------------------------------------------------------------------------------------------
// Hedging: a late shard's pairs also go to another replica; the first answer wins.

// The threshold is factor x the second longest of the last 128 round trips (hand-computed).
TEST(PeerHealth, HedgeAfterIsFactorTimesRecentP99WithFloorAndInitial) {
  using std::chrono::microseconds;
  PeerHealth h;
  HedgeOptions o;
  o.factor = 3;
  o.floor = microseconds(2000);
  o.initial = microseconds(50000);
  EXPECT_EQ(h.HedgeAfter(4, o), microseconds(50000));  // nothing on record
  for (int i = 0; i < 15; ++i) h.RecordRoundTrip(4, microseconds(1000));
  EXPECT_EQ(h.HedgeAfter(4, o), microseconds(50000));  // 15 < 16 round trips
  h.RecordRoundTrip(4, microseconds(10000));
  h.RecordRoundTrip(4, microseconds(5000));
  EXPECT_EQ(h.HedgeAfter(4, o), microseconds(15000));  // 3 x 5 ms (10 ms is the longest)
  // 128 more round trips push both out of the ring: 3 x 1 ms is under the floor.
  for (int i = 0; i < 128; ++i) h.RecordRoundTrip(4, microseconds(1000));
  EXPECT_EQ(h.HedgeAfter(4, o), microseconds(3000));
  for (int i = 0; i < 128; ++i) h.RecordRoundTrip(4, microseconds(100));
  EXPECT_EQ(h.HedgeAfter(4, o), microseconds(2000));
  o.factor = 0;
  EXPECT_EQ(h.HedgeAfter(4, o), transport::Clock::duration::max());
  EXPECT_EQ(h.HedgeAfter(5, HedgeOptions()), HedgeOptions().initial);  // another peer
}

RemoteExpertsOptions HedgingOptions() {
  RemoteExpertsOptions o = F32Options();  // 10 s deadline: far beyond any hedge below
  o.hedge = HedgeOptions();
  o.hedge.initial = std::chrono::milliseconds(20);
  o.hedge.set_aside_after = 2;
  return o;
}

// A stopped replica (its replies held back, as by SIGSTOP): each call to it is hedged to the other
// replica after HedgeOptions::initial, the result is local's bit for bit, and nothing waits for
// the 10 s deadline. After two lost races it is set aside (no more posts); once its held reply
// arrives (SIGCONT) it is live again and gets work.
TEST(RemoteRoutedExperts, StoppedReplicaIsHedgedSetAsideAndRevivedByItsLateReply) {
  Cluster cluster({ExpertsWhere(Any), ExpertsWhere(Any)});
  auto health = std::make_shared<PeerHealth>();
  auto remote = cluster.Client(HedgingOptions(), health);
  cluster.client().SetFault(cluster.peer(0), Fault::kHoldReply);
  const int64_t layer = MoeLayers()[1];
  auto run = [&](uint32_t seed) {
    const Batch b = RandomBatch(16, seed);
    std::vector<float> out;
    const auto start = transport::Clock::now();
    const absl::Status st = RunRemote(remote.get(), b, layer, &out);
    EXPECT_TRUE(st.ok()) << st;
    EXPECT_LT(transport::Clock::now() - start, std::chrono::seconds(5)) << "waited for a deadline";
    EXPECT_TRUE(SameBits(out, RunLocal(b, layer)));
  };
  run(2000);
  EXPECT_EQ(remote->hedged_calls(), 1u);
  EXPECT_EQ(remote->late_replies_dropped(), 1u);
  EXPECT_FALSE(health->SetAside(cluster.peer(0)));  // one lost race
  EXPECT_FALSE(health->Dead(cluster.peer(0)));
  run(2001);
  EXPECT_EQ(remote->hedged_calls(), 2u);
  EXPECT_TRUE(health->SetAside(cluster.peer(0)));
  EXPECT_EQ(health->set_aside_total(), 1u);
  EXPECT_EQ(health->set_aside_now(), 1);

  // Set aside: every token goes to the live replica; nothing is hedged.
  cluster.client().ResetCounts();
  run(2002);
  EXPECT_EQ(cluster.client().posts(cluster.peer(0)), 0u);
  EXPECT_EQ(cluster.client().tokens(cluster.peer(1)), 16u);
  EXPECT_EQ(remote->hedged_calls(), 2u);

  // SIGCONT: the probe (the second late call) completes; the next Begin revives the shard.
  cluster.client().SetFault(cluster.peer(0), Fault::kNone);
  cluster.client().ReleaseHeld();
  const auto give_up = transport::Clock::now() + std::chrono::seconds(20);
  while (health->SetAside(cluster.peer(0)) && transport::Clock::now() < give_up) {
    health->CheckProbes(&cluster.client());
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_FALSE(health->SetAside(cluster.peer(0)));
  EXPECT_FALSE(health->Dead(cluster.peer(0)));
  EXPECT_EQ(health->revived_total(), 1u);
  EXPECT_EQ(health->set_aside_now(), 0);
  cluster.client().ResetCounts();
  run(2003);
  EXPECT_EQ(cluster.client().tokens(cluster.peer(0)), 8u);
  EXPECT_EQ(cluster.client().tokens(cluster.peer(1)), 8u);
}

// A hedge delay longer than the deadline (an inflated p99; here the initial delay) is capped at a
// quarter of the deadline: a stopped replica's calls are still saved by the other replica.
TEST(RemoteRoutedExperts, HedgeComesWithinAQuarterOfTheDeadline) {
  Cluster cluster({ExpertsWhere(Any), ExpertsWhere(Any)});
  RemoteExpertsOptions o = HedgingOptions();
  o.deadline = std::chrono::milliseconds(2000);
  o.hedge.initial = std::chrono::seconds(60);
  auto remote = cluster.Client(o, std::make_shared<PeerHealth>());
  cluster.client().SetFault(cluster.peer(0), Fault::kHoldReply);
  const int64_t layer = MoeLayers()[1];
  const Batch b = RandomBatch(16, 3000);
  std::vector<float> out;
  const auto start = transport::Clock::now();
  const absl::Status st = RunRemote(remote.get(), b, layer, &out);
  const auto took = transport::Clock::now() - start;
  EXPECT_TRUE(st.ok()) << st << " (without the hedge the call fails at its deadline)";
  EXPECT_EQ(remote->hedged_calls(), 1u);
  EXPECT_GE(took, std::chrono::milliseconds(500));  // not before a quarter of the deadline
  EXPECT_TRUE(SameBits(out, RunLocal(b, layer)));
  cluster.client().SetFault(cluster.peer(0), Fault::kNone);
  cluster.client().ReleaseHeld();
}

// A stopped replica whose only other replica is slow (as on a loaded machine): whichever of the
// two calls is hedged first, the stopped shard's pairs end up at the slow one -- hedged away from,
// yet still serving -- not waiting out the 10 s deadline. (Before, when the slow shard's call was
// hedged first, to the stopped one, the stopped shard's own call had nowhere to go: the faults
// test saw a 4 s stall under CI load.) The result is local's bit for bit.
TEST(RemoteRoutedExperts, StoppedReplicaIsHedgedToASlowOneRatherThanWaitingItsDeadline) {
  for (size_t stopped = 0; stopped < 2; ++stopped) {
    SCOPED_TRACE(stopped == 0 ? "the stopped shard's call first" : "the slow shard's call first");
    Cluster cluster({ExpertsWhere(Any), ExpertsWhere(Any)});
    auto remote = cluster.Client(HedgingOptions(), std::make_shared<PeerHealth>());
    cluster.client().SetFault(cluster.peer(stopped), Fault::kHoldReply);
    cluster.client().SetDelay(cluster.peer(1 - stopped), std::chrono::milliseconds(300));
    cluster.client().SetFault(cluster.peer(1 - stopped), Fault::kDelayReply);
    const int64_t layer = MoeLayers()[1];
    const Batch b = RandomBatch(16, 3100 + static_cast<uint32_t>(stopped));
    std::vector<float> out;
    const auto start = transport::Clock::now();
    const absl::Status st = RunRemote(remote.get(), b, layer, &out);
    const auto took = transport::Clock::now() - start;
    EXPECT_TRUE(st.ok()) << st;
    EXPECT_LT(took, std::chrono::seconds(5)) << "waited for the deadline";
    EXPECT_GE(took, std::chrono::milliseconds(300));  // the slow shard answered every pair
    EXPECT_GE(remote->hedged_calls(), 2u);
    EXPECT_TRUE(SameBits(out, RunLocal(b, layer)));
    EXPECT_GE(cluster.client().tokens(cluster.peer(1 - stopped)), 16u);  // its own, then the rest
    cluster.client().ReleaseHeld();
  }
}

// Both replicas set aside (one lost race each, as on a loaded machine), one of them stopped: a
// call to the stopped one is hedged to the other, which still serves, instead of waiting out the
// deadline (a set-aside shard's calls were never hedged: the faults test saw 4 s stalls).
TEST(RemoteRoutedExperts, CallToASetAsideStoppedShardIsHedgedToAnotherSetAsideOne) {
  Cluster cluster({ExpertsWhere(Any), ExpertsWhere(Any)});
  RemoteExpertsOptions o = HedgingOptions();
  o.hedge.set_aside_after = 1;
  auto health = std::make_shared<PeerHealth>();
  auto remote = cluster.Client(o, health);
  const int a = cluster.peer(0), b = cluster.peer(1);
  const int64_t layer = MoeLayers()[1];
  auto run = [&](uint32_t seed) {
    const Batch batch = RandomBatch(16, seed);
    std::vector<float> out;
    const auto start = transport::Clock::now();
    const absl::Status st = RunRemote(remote.get(), batch, layer, &out);
    EXPECT_TRUE(st.ok()) << st;
    EXPECT_LT(transport::Clock::now() - start, std::chrono::seconds(3)) << "waited for a deadline";
    EXPECT_TRUE(SameBits(out, RunLocal(batch, layer)));
  };
  // b is slow (its reply, the probe that would bring it back, comes after 5 s): it loses a race.
  cluster.client().SetDelay(b, std::chrono::seconds(5));
  cluster.client().SetFault(b, Fault::kDelayReply);
  run(3200);
  ASSERT_TRUE(health->SetAside(b));
  // a stops: its calls are hedged to b (set aside, yet serving), and a loses a race too.
  cluster.client().SetFault(b, Fault::kNone);
  cluster.client().SetFault(a, Fault::kHoldReply);
  run(3201);
  ASSERT_TRUE(health->SetAside(a));
  ASSERT_TRUE(health->SetAside(b));
  // Both set aside: tokens go to both, and a's share is hedged to b.
  cluster.client().ResetCounts();
  const uint64_t hedged = remote->hedged_calls();
  run(3202);
  EXPECT_GT(cluster.client().tokens(a), 0u);
  EXPECT_GT(remote->hedged_calls(), hedged);
  cluster.client().ReleaseHeld();
}

// Every call hedged at once (threshold 0): each pair's row comes from whichever replica answers
// first, and the result is the same bits as without hedging (replicas run the same
// batch-invariant kernels on different batches of tokens).
TEST(RemoteRoutedExperts, HedgedOrNotTheResultIsTheSameBits) {
  Cluster cluster({ExpertsWhere(Any), ExpertsWhere(Any), ExpertsWhere(Any)});
  RemoteExpertsOptions o = HedgingOptions();
  o.hedge.initial = std::chrono::microseconds(0);  // hedge every call at once
  o.hedge.floor = std::chrono::microseconds(0);
  auto hedging = cluster.Client(o);
  o.hedge.factor = 0;  // never hedge
  auto plain = cluster.Client(o);
  for (uint32_t seed = 2100; seed < 2106; ++seed) {
    const Batch b = RandomBatch(24, seed);
    const int64_t layer = MoeLayers()[seed % MoeLayers().size()];
    std::vector<float> a, c;
    ASSERT_TRUE(RunRemote(hedging.get(), b, layer, &a).ok());
    ASSERT_TRUE(RunRemote(plain.get(), b, layer, &c).ok());
    EXPECT_TRUE(SameBits(a, c));
    EXPECT_TRUE(SameBits(a, RunLocal(b, layer)));
  }
  EXPECT_GT(hedging->hedged_calls(), 0u);
  EXPECT_EQ(plain->hedged_calls(), 0u);
}

// ------------------------------------------------------------------------------------------------
// Load accounting.

TEST(RemoteRoutedExperts, CountsTokensPerExpert) {
  Cluster cluster({ExpertsWhere(Any)});
  auto remote = cluster.Client(F32Options());
  const Batch b = RandomBatch(7, 1700);
  const int64_t layer = MoeLayers()[2];
  std::vector<float> out;
  ASSERT_TRUE(RunRemote(remote.get(), b, layer, &out).ok());
  ASSERT_TRUE(RunRemote(remote.get(), b, layer, &out).ok());
  for (int32_t e = 0; e < Config().n_routed_experts; ++e) {
    const uint64_t n = static_cast<uint64_t>(std::count(b.ids.begin(), b.ids.end(), e));
    EXPECT_EQ(remote->expert_tokens(layer, e), 2 * n) << "expert " << e;
    EXPECT_EQ(remote->expert_tokens(MoeLayers()[0], e), 0u);
    EXPECT_EQ(cluster.shard(0).shard().expert_tokens(layer, e), 2 * n);
  }
}

// A dispatch with more (token, expert) pairs than its tokens can route (token_count x
// num_experts_per_tok) is answered with an error and computes nothing: each pair is an output row,
// so a few tokens carrying a million pairs (the wire allows 2^20) would make the shard allocate
// gigabytes. One pair fewer, the most a token routes, is served.
TEST(ExpertShard, MorePairsThanTheTokensRouteIsRefused) {
  ExpertShard shard(Config(), FullStore());
  const int64_t d = Config().hidden_size, k = Config().num_experts_per_tok;
  std::vector<float> row(static_cast<size_t>(d), 0.5f);
  for (const int64_t pairs : {k, k + 1}) {
    wire::Header h;
    h.kind = wire::Kind::kDispatch;
    h.layer = static_cast<uint32_t>(MoeLayers()[0]);
    h.token_count = 1;
    h.hidden_size = static_cast<uint32_t>(d);
    h.dtype = wire::WireDType::kF32;
    std::vector<wire::Pair> ps;
    for (int64_t p = 0; p < pairs; ++p) ps.push_back({0, static_cast<uint32_t>(p), 0.1f});
    std::vector<uint8_t> msg;
    wire::EncodeDispatch(h, row.data(), ps, &msg);
    std::vector<std::vector<uint8_t>> replies(1);
    const uint64_t rejected = shard.stats().rejected;
    shard.Process({&msg}, &replies);
    auto v = wire::DecodeMessage(replies[0].data(), replies[0].size());
    ASSERT_TRUE(v.ok()) << v.status();
    if (pairs == k) {
      EXPECT_EQ(v->header.kind, wire::Kind::kCombine);
      EXPECT_EQ(shard.stats().rejected, rejected);
    } else {
      EXPECT_EQ(v->header.kind, wire::Kind::kError);
      EXPECT_NE(v->error.find("num_experts_per_tok"), std::string::npos) << v->error;
      EXPECT_EQ(shard.stats().rejected, rejected + 1);
    }
  }
}

}  // namespace
}  // namespace dmoe
