// Real processes, real UCX: dmoe-expert shards serving an engine in this process (and in a second
// attention process), over tcp and over shared memory, with UCX_NET_DEVICES=lo.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_join.h"
#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"
#include "proto/expert_control.grpc.pb.h"
#include "tests/process_util.h"
#include "transport/ucx.h"
#include "transport/wire.h"

namespace dmoe {
namespace {

using testing::ChildProcess;
using testing::Runfile;
using testing::TmpDir;

const std::string& ModelDir() {
  static const std::string dir = [] {
    const std::string d = TmpDir() + "/tiny_model";
    TinyModelOptions o;
    o.seed = 17;
    EXPECT_TRUE(WriteTinyModel(d, *PresetConfig("tiny"), o).ok());
    return d;
  }();
  return dir;
}

struct Shard {
  ChildProcess process;
  std::string grpc;
  std::string ucx;
  std::string ucx_worker;
};

class DistributedExperts : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    setenv("UCX_NET_DEVICES", "lo", 1);
    if (sm()) {
      setenv("UCX_TLS", "sm,self", 1);
      setenv("UCX_MM_ERROR_HANDLING", "y", 1);
      setenv("UCX_CMA_MEMORY_INVALIDATE", "y", 1);
      setenv("UCX_KEEPALIVE_INTERVAL", "200ms", 1);
    } else {
      setenv("UCX_TLS", "tcp,self", 1);
      unsetenv("UCX_MM_ERROR_HANDLING");
      unsetenv("UCX_CMA_MEMORY_INVALIDATE");
      unsetenv("UCX_KEEPALIVE_INTERVAL");
    }
  }
  bool sm() const { return GetParam() == "sm"; }

  // Starts `n` shards hosting slice i/n each.
  std::vector<Shard> StartShards(int n, const std::string& tag) {
    std::vector<Shard> shards(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      const std::string ready = TmpDir() + "/" + tag + "_ready" + std::to_string(i) + ".json";
      std::remove(ready.c_str());
      std::vector<std::string> argv = {
          Runfile("expert_service/dmoe-expert"),       "--model",      ModelDir(), "--experts",
          std::to_string(i) + "/" + std::to_string(n), "--ready-file", ready};
      if (sm()) {
        argv.push_back("--ucx-listen");
        argv.push_back("none");
      }
      Shard& s = shards[static_cast<size_t>(i)];
      s.process = ChildProcess(argv, TmpDir() + "/" + tag + "_shard" + std::to_string(i) + ".log");
      auto info = testing::WaitForReadyFile(ready, std::chrono::seconds(30));
      EXPECT_FALSE(info.empty()) << s.process.Log();
      s.grpc = info["grpc"];
      s.ucx = info["ucx"];
      s.ucx_worker = info["ucx_worker"];
    }
    return shards;
  }

  std::vector<std::string> Addresses(const std::vector<Shard>& shards) {
    std::vector<std::string> a;
    for (const Shard& s : shards) a.push_back(s.grpc);
    return a;
  }

  std::unique_ptr<LocalModel> Remote(
      const std::vector<Shard>& shards, wire::WireDType dtype,
      std::chrono::milliseconds deadline = std::chrono::seconds(10)) {
    LocalModelOptions o;
    o.expert_shards = Addresses(shards);
    o.shard_client.remote.dtype = dtype;
    o.shard_client.remote.deadline = deadline;
    o.shard_client.connect = sm() ? UcxConnectMode::kWorkerAddress : UcxConnectMode::kListener;
    auto m = LocalModel::Load(ModelDir(), o);
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(m).value() : nullptr;
  }

  static std::unique_ptr<LocalModel> InProcess() {
    auto m = LocalModel::Load(ModelDir());
    EXPECT_TRUE(m.ok());
    return std::move(m).value();
  }
};

std::vector<int32_t> Prompt(int n, int salt) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back((i * 53 + salt * 97 + 5) % 512);
  return t;
}

std::vector<int32_t> Greedy(LocalModel& m, const std::vector<int32_t>& prompt, int n) {
  GenerateOptions g;
  g.max_tokens = n;
  auto out = Generate(m.engine(), prompt, g);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : std::vector<int32_t>();
}

TEST_P(DistributedExperts, LogitsEqualInProcessWithTwoAndFourShards) {
  auto local = InProcess();
  for (int n : {2, 4}) {
    std::vector<Shard> shards = StartShards(n, "eq" + std::to_string(n));
    auto f32 = Remote(shards, wire::WireDType::kF32);
    auto bf16 = Remote(shards, wire::WireDType::kBF16);
    ASSERT_TRUE(f32 && bf16);
    double worst = 0;
    for (int salt = 0; salt < 3; ++salt) {
      const std::vector<int32_t> prompt = Prompt(12 + 5 * salt, salt);
      auto want = local->engine().Forward(prompt);
      auto got = f32->engine().Forward(prompt);
      ASSERT_TRUE(want.ok() && got.ok()) << got.status();
      for (size_t i = 0; i < want->size(); ++i) {
        worst = std::max(worst, std::fabs(double((*want)[i]) - (*got)[i]));
      }
      EXPECT_EQ(Greedy(*bf16, prompt, 16), Greedy(*local, prompt, 16))
          << n << " shards, prompt " << salt;
      EXPECT_EQ(Greedy(*f32, prompt, 16), Greedy(*local, prompt, 16))
          << n << " shards, prompt " << salt;
    }
    std::printf("[%s] %d shards, fp32 wire: max |dlogit| vs in-process = %.3g\n",
                GetParam().c_str(), n, worst);
    EXPECT_LE(worst, 1e-5);
  }
}

TEST_P(DistributedExperts, TwoAttentionProcessesShareTheShards) {
  std::vector<Shard> shards = StartShards(2, "mn");
  auto local = InProcess();
  const std::vector<int32_t> p1 = Prompt(9, 1), p2 = Prompt(14, 2);
  const std::vector<int32_t> want1 = Greedy(*local, p1, 40), want2 = Greedy(*local, p2, 40);
  // The second attention node is a separate `dmoe generate` process, running at the same time.
  std::vector<std::string> argv = {Runfile("cli/dmoe"),
                                   "generate",
                                   "--model",
                                   ModelDir(),
                                   "--tokens",
                                   absl::StrJoin(p2, ","),
                                   "--max-tokens",
                                   "40",
                                   "--print-token-ids",
                                   "--expert-shards",
                                   absl::StrJoin(Addresses(shards), ","),
                                   "--wire-dtype",
                                   "f32"};
  if (sm()) {
    argv.push_back("--ucx-connect");
    argv.push_back("worker");
  }
  ChildProcess other(argv, TmpDir() + "/mn_other.log");
  auto remote = Remote(shards, wire::WireDType::kF32);
  ASSERT_TRUE(remote);
  for (int round = 0; round < 3; ++round) EXPECT_EQ(Greedy(*remote, p1, 40), want1);
  EXPECT_EQ(other.Wait(std::chrono::seconds(60)), 0) << other.Log();
  // stdout and stderr share the log; the ids are its last line.
  std::string log = other.Log();
  while (!log.empty() && log.back() == '\n') log.pop_back();
  EXPECT_EQ(log.substr(log.rfind('\n') + 1), absl::StrJoin(want2, ",")) << log;
}

internal::GetStatsReply Stats(const std::string& grpc_addr) {
  auto stub = internal::ExpertControl::NewStub(
      grpc::CreateChannel(grpc_addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  internal::GetStatsReply reply;
  EXPECT_TRUE(stub->GetStats(&ctx, internal::GetStatsRequest(), &reply).ok());
  return reply;
}

// Sends one dispatch for `expert` of layer 1 straight to a shard; returns the reply's kind.
wire::Kind RawDispatch(transport::ClientTransport& client, int peer, uint32_t expert,
                       std::string* error = nullptr) {
  std::vector<float> row(256, 0.5f);
  wire::Header h;
  h.layer = 1;
  h.token_count = 1;
  h.hidden_size = 256;
  h.dtype = wire::WireDType::kF32;
  std::vector<uint8_t> msg;
  wire::EncodeDispatch(h, row.data(), {{0, expert, 1.0f}}, &msg);
  auto id = client.Post(peer, msg);
  EXPECT_TRUE(id.ok());
  std::vector<uint8_t> reply;
  const absl::Status st =
      client.Wait(*id, transport::Clock::now() + std::chrono::seconds(10), &reply);
  EXPECT_TRUE(st.ok()) << st;
  auto v = wire::DecodeMessage(reply.data(), reply.size());
  EXPECT_TRUE(v.ok()) << v.status();
  if (!v.ok()) return wire::Kind::kError;
  if (error) *error = v->error;
  return v->header.kind;
}

TEST_P(DistributedExperts, KilledShardGivesAClearErrorWithinTheDeadline) {
  std::vector<Shard> shards = StartShards(2, "kill");
  const auto deadline = std::chrono::milliseconds(2000);
  auto remote = Remote(shards, wire::WireDType::kBF16, deadline);
  ASSERT_TRUE(remote);
  std::atomic<int> steps{0};
  absl::Status result;
  std::chrono::steady_clock::time_point ended;
  std::thread gen([&] {
    GenerateOptions g;
    g.max_tokens = 480;
    SequenceKvCache cache(remote->config());
    std::vector<SequenceStep> batch(1);
    batch[0].cache = &cache;
    batch[0].tokens = {1, 2, 3};
    std::vector<std::vector<float>> logits;
    // Runs until the kill is noticed (bounded: a shard that never fails ends the loop too).
    for (int i = 0; i < 100000; ++i) {
      result = remote->engine().Step(batch, &logits);
      if (!result.ok()) break;
      ++steps;
      batch[0].tokens = {ArgMax(logits[0].data(), 512)};
      if (cache.length() >= 500) cache = SequenceKvCache(remote->config());
    }
    ended = std::chrono::steady_clock::now();
  });
  // Kill mid-generation: after 10 steps went through both shards.
  for (int i = 0; i < 60000 && steps < 10; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_GE(steps.load(), 10) << "generation did not get going";
  const auto killed = std::chrono::steady_clock::now();
  shards[1].process.Kill(SIGKILL);
  gen.join();
  ASSERT_FALSE(result.ok());
  const double seconds = std::chrono::duration<double>(ended - killed).count();
  std::printf("[%s] SIGKILL of a shard mid-generation: error after %.3f s: %s\n",
              GetParam().c_str(), seconds, std::string(result.message()).c_str());
  if (GetParam() == "tcp") {
    // The socket closes: the kill is noticed, not waited out.
    EXPECT_EQ(result.code(), absl::StatusCode::kUnavailable) << result;
  } else {
    // sm: UCX's keepalive (1 s) or the 2 s round-trip deadline, whichever comes first.
    EXPECT_TRUE(result.code() == absl::StatusCode::kUnavailable ||
                result.code() == absl::StatusCode::kDeadlineExceeded)
        << result;
  }
  EXPECT_NE(result.message().find("expert shard " + shards[1].grpc), absl::string_view::npos)
      << result;
  // A generous bound (the error came, it did not hang): the deadline is 2 s.
  EXPECT_LT(seconds, 20.0);
  // The survivor keeps serving other callers: it answers, and counts exactly that one message.
  auto client = transport::NewUcxClient();
  ASSERT_TRUE(client.ok());
  auto peer = (*client)->Connect(sm() ? shards[0].ucx_worker : shards[0].ucx);
  ASSERT_TRUE(peer.ok());
  const uint64_t before = Stats(shards[0].grpc).messages();
  EXPECT_EQ(RawDispatch(**client, *peer, 0), wire::Kind::kCombine);
  EXPECT_EQ(Stats(shards[0].grpc).messages(), before + 1);
}

TEST_P(DistributedExperts, MalformedMessagesAreRejectedAndCounted) {
  std::vector<Shard> shards = StartShards(2, "bad");
  auto client = transport::NewUcxClient();
  ASSERT_TRUE(client.ok());
  auto peer = (*client)->Connect(sm() ? shards[0].ucx_worker : shards[0].ucx);
  ASSERT_TRUE(peer.ok());
  std::vector<float> row(256, 1.0f);
  wire::Header h;
  h.layer = 1;
  h.token_count = 1;
  h.hidden_size = 256;
  std::vector<uint8_t> good;
  wire::EncodeDispatch(h, row.data(), {{0, 0, 1.0f}}, &good);
  std::vector<std::vector<uint8_t>> bad = {
      std::vector<uint8_t>(100, 0xab),                        // garbage
      std::vector<uint8_t>(good.begin(), good.begin() + 70),  // truncated
      std::vector<uint8_t>(good.begin(), good.end()),         // oversized: patched below
      std::vector<uint8_t>(good.begin(), good.end()),         // hidden size of another model
  };
  const uint32_t many = 60000;
  std::memcpy(bad[2].data() + 28, &many, 4);  // token_count far beyond the payload
  const uint32_t other_hidden = 128;
  std::vector<float> row128(128, 1.0f);
  h.hidden_size = other_hidden;
  wire::EncodeDispatch(h, row128.data(), {{0, 0, 1.0f}}, &bad[3]);
  for (auto& b : bad) {
    auto id = (*client)->Post(*peer, b);
    ASSERT_TRUE(id.ok());
    std::vector<uint8_t> reply;
    ASSERT_TRUE(
        (*client)->Wait(*id, transport::Clock::now() + std::chrono::seconds(10), &reply).ok());
    auto v = wire::DecodeMessage(reply.data(), reply.size());
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(v->header.kind, wire::Kind::kError);
  }
  std::string error;
  EXPECT_EQ(RawDispatch(**client, *peer, 15, &error), wire::Kind::kError);  // not hosted here
  EXPECT_NE(error.find("expert 15 of layer 1 is not hosted"), std::string::npos) << error;
  EXPECT_EQ(RawDispatch(**client, *peer, 3), wire::Kind::kCombine);  // still serving
  const internal::GetStatsReply s = Stats(shards[0].grpc);
  EXPECT_EQ(s.rejected_messages(), 5u);
  EXPECT_EQ(s.messages(), 6u);
}

// Memory accounting does not depend on the transport: checked over tcp only.
class DistributedExpertsTcp : public DistributedExperts {};

TEST_P(DistributedExpertsTcp, ShardReadsAndHoldsOnlyItsExperts) {
  std::vector<Shard> quarter = StartShards(4, "mem");
  const ModelConfig c = *PresetConfig("tiny");
  const uint64_t one_expert = 3ull * c.hidden_size * c.moe_intermediate_size * 4;
  const uint64_t all =
      one_expert * c.n_routed_experts * (c.num_hidden_layers - c.first_k_dense_replace);
  for (const Shard& s : quarter) {
    const internal::GetStatsReply st = Stats(s.grpc);
    EXPECT_EQ(st.expert_weight_bytes(), all / 4);
    EXPECT_EQ(st.checkpoint_bytes_read(), all / 4);  // no other tensor was read
    std::printf("shard hosting 1/4 of the experts: %.2f MiB of expert weights, RSS %.1f MiB\n",
                st.expert_weight_bytes() / 1048576.0, st.resident_set_bytes() / 1048576.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Ucx, DistributedExperts, ::testing::Values("tcp", "sm"),
                         [](const auto& info) { return info.param; });
INSTANTIATE_TEST_SUITE_P(Ucx, DistributedExpertsTcp, ::testing::Values("tcp"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace dmoe
