// dmoe-attention with its experts on two dmoe-expert processes (real gRPC, real UCX over tcp):
// greedy generation through the service equals the in-process engine; bad requests are
// INVALID_ARGUMENT naming the field; cancellation frees the KV blocks.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"
#include "proto/attention.grpc.pb.h"
#include "tests/process_util.h"

namespace dmoe {
namespace {

using testing::ChildProcess;
using testing::Runfile;
using testing::TmpDir;

class AttentionServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    setenv("UCX_NET_DEVICES", "lo", 1);
    setenv("UCX_TLS", "tcp,self", 1);
    model_dir_ = new std::string(TmpDir() + "/attn_model");
    TinyModelOptions o;
    o.seed = 31;
    ASSERT_TRUE(WriteTinyModel(*model_dir_, *PresetConfig("tiny"), o).ok());
    std::vector<std::string> grpc;
    for (int i = 0; i < 2; ++i) {
      const std::string ready = TmpDir() + "/attn_shard" + std::to_string(i) + ".json";
      shards_[i] = new ChildProcess({Runfile("expert_service/dmoe-expert"), "--model", *model_dir_,
                                     "--experts", std::to_string(i) + "/2", "--ready-file", ready},
                                    TmpDir() + "/attn_shard" + std::to_string(i) + ".log");
      auto info = testing::WaitForReadyFile(ready, std::chrono::seconds(30));
      ASSERT_FALSE(info.empty()) << shards_[i]->Log();
      grpc.push_back(info["grpc"]);
    }
    const std::string ready = TmpDir() + "/attn.json";
    attention_ =
        new ChildProcess({Runfile("attention_service/dmoe-attention"), "--model", *model_dir_,
                          "--expert-shards", grpc[0] + "," + grpc[1], "--kv-blocks", "512",
                          "--block-tokens", "8", "--wire-dtype", "f32", "--ready-file", ready},
                         TmpDir() + "/attn.log");
    auto info = testing::WaitForReadyFile(ready, std::chrono::seconds(30));
    ASSERT_FALSE(info.empty()) << attention_->Log();
    stub_ = internal::AttentionService::NewStub(
                grpc::CreateChannel(info["grpc"], grpc::InsecureChannelCredentials()))
                .release();
    metrics_ = new std::string(info["metrics"]);
  }
  static void TearDownTestSuite() {
    delete stub_;
    delete attention_;
    delete shards_[0];
    delete shards_[1];
    delete model_dir_;
    delete metrics_;
  }

  // The value of the sample `name` (with its labels, as exposed) on the node's /metrics; -1 when
  // absent or unreachable.
  static double Metric(const std::string& name) {
    const size_t colon = metrics_->rfind(':');
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(std::stoi(metrics_->substr(colon + 1))));
    inet_pton(AF_INET, metrics_->substr(0, colon).c_str(), &a.sin_addr);
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      close(fd);
      return -1;
    }
    const std::string req = "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n";
    if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) < 0) return -1;
    std::string got;
    char buf[65536];
    for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) got.append(buf, size_t(n));
    close(fd);
    const size_t at = got.find("\n" + name + " ");
    return at == std::string::npos ? -1 : std::stod(got.substr(at + name.size() + 2));
  }

  struct Stream {
    uint64_t id = 0;
    std::vector<int32_t> tokens;
    std::string finish;
    grpc::Status status;
  };

  static Stream Generate(const std::vector<int32_t>& prompt, const internal::SamplingParams& p) {
    internal::GenerateRequest req;
    for (int32_t t : prompt) req.add_prompt_token_ids(t);
    *req.mutable_sampling() = p;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub_->Generate(&ctx, req);
    Stream s;
    internal::GenerateResponse r;
    while (reader->Read(&r)) {
      if (r.request_id() != 0) s.id = r.request_id();
      for (const auto& t : r.tokens()) s.tokens.push_back(t.token_id());
      if (!r.finish_reason().empty()) s.finish = r.finish_reason();
    }
    s.status = reader->Finish();
    return s;
  }

  static internal::GetLoadReply Load() {
    grpc::ClientContext ctx;
    internal::GetLoadReply reply;
    EXPECT_TRUE(stub_->GetLoad(&ctx, internal::GetLoadRequest(), &reply).ok());
    return reply;
  }

  static std::string* model_dir_;
  static std::string* metrics_;  // the node's metrics address
  static ChildProcess* shards_[2];
  static ChildProcess* attention_;
  static internal::AttentionService::Stub* stub_;
};
std::string* AttentionServiceTest::model_dir_ = nullptr;
std::string* AttentionServiceTest::metrics_ = nullptr;
ChildProcess* AttentionServiceTest::shards_[2] = {nullptr, nullptr};
ChildProcess* AttentionServiceTest::attention_ = nullptr;
internal::AttentionService::Stub* AttentionServiceTest::stub_ = nullptr;

TEST_F(AttentionServiceTest, GreedyThroughTheServiceEqualsInProcess) {
  auto local = LocalModel::Load(*model_dir_);
  ASSERT_TRUE(local.ok());
  const std::vector<std::vector<int32_t>> prompts = {
      {1, 2, 3}, {100, 200, 300, 400, 5, 6, 7, 8, 9, 10, 11}, {42}, {7, 7, 7, 7, 7, 7, 7, 7, 7}};
  std::vector<Stream> got(prompts.size());
  std::vector<std::thread> clients;
  internal::SamplingParams p;
  p.set_max_tokens(20);
  for (size_t i = 0; i < prompts.size(); ++i) {
    clients.emplace_back([&, i] { got[i] = Generate(prompts[i], p); });
  }
  for (auto& t : clients) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].status.ok()) << got[i].status.error_message();
    GenerateOptions g;
    g.max_tokens = 20;
    auto want = dmoe::Generate((*local)->engine(), prompts[i], g);
    ASSERT_TRUE(want.ok());
    EXPECT_EQ(got[i].tokens, *want) << "prompt " << i;
    EXPECT_EQ(got[i].finish, "length");
    EXPECT_GT(got[i].id, 0u);
  }
}

TEST_F(AttentionServiceTest, SixtyFourConcurrentStreamsWithMixedLengths) {
  auto local = LocalModel::Load(*model_dir_);
  ASSERT_TRUE(local.ok());
  std::vector<std::vector<int32_t>> prompts;
  std::vector<internal::SamplingParams> params;
  for (int i = 0; i < 64; ++i) {
    std::vector<int32_t> p;
    const int len = 1 + (i * 53) % 300;
    for (int j = 0; j < len; ++j) p.push_back((i * 131 + j * 29 + 7) % 512);
    prompts.push_back(p);
    internal::SamplingParams sp;
    sp.set_max_tokens(3 + (i * 7) % 17);
    if (i % 4 == 3) {  // some seeded sampling too
      sp.set_temperature(0.8);
      sp.set_seed(1000 + i);
    }
    params.push_back(sp);
  }
  std::vector<Stream> got(prompts.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < prompts.size(); ++i) {
    clients.emplace_back([&, i] { got[i] = Generate(prompts[i], params[i]); });
  }
  for (auto& t : clients) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].status.ok()) << i << ": " << got[i].status.error_message();
    GenerateOptions g;
    g.max_tokens = params[i].max_tokens();
    g.temperature = params[i].temperature();
    g.seed = params[i].seed();
    auto want = dmoe::Generate((*local)->engine(), prompts[i], g);
    ASSERT_TRUE(want.ok());
    EXPECT_EQ(got[i].tokens, *want) << "request " << i << ", prompt of " << prompts[i].size();
  }
  const internal::GetLoadReply load = Load();
  std::printf("64 streams: prefilled %llu tokens, %llu from the prefix cache, %llu preemptions\n",
              static_cast<unsigned long long>(load.prefilled_tokens()),
              static_cast<unsigned long long>(load.prefix_hit_tokens()),
              static_cast<unsigned long long>(load.preemptions()));
}

TEST_F(AttentionServiceTest, ReportsLatentCacheBytesPerToken) {
  const ModelConfig c = *PresetConfig("tiny");
  const internal::GetLoadReply load = Load();
  // (kv_lora_rank + qk_rope_head_dim) x fp32 x layers: 80 x 4 x 4.
  EXPECT_EQ(load.kv_bytes_per_token(),
            static_cast<uint64_t>((c.kv_lora_rank + c.qk_rope_head_dim) * 4 * c.num_hidden_layers));
  EXPECT_EQ(load.block_tokens(), 8);
  EXPECT_EQ(load.total_blocks(), 512);
}

// Each is refused naming its field, and counted as dmoe_attention_requests_total{outcome=
// "invalid"} (refused requests were counted under no outcome).
TEST_F(AttentionServiceTest, InvalidRequestsNameTheField) {
  const std::string invalid = "dmoe_attention_requests_total{outcome=\"invalid\"}";
  const double before = Metric(invalid);
  ASSERT_GE(before, 0);
  internal::SamplingParams p;
  p.set_max_tokens(4);
  p.set_top_p(2.0);
  Stream s = Generate({1, 2}, p);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.status.error_message().find("top_p"), std::string::npos) << s.status.error_message();
  p.set_top_p(1.0);
  s = Generate({1, 600}, p);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.status.error_message().find("prompt[1]"), std::string::npos);
  s = Generate({}, p);
  EXPECT_NE(s.status.error_message().find("prompt: is empty"), std::string::npos);
  p.set_max_tokens(0);
  s = Generate({1}, p);
  EXPECT_NE(s.status.error_message().find("max_tokens"), std::string::npos);
  EXPECT_EQ(Metric(invalid), before + 4);
}

TEST_F(AttentionServiceTest, CancelMidStreamFreesTheBlocks) {
  const int64_t total = Load().total_blocks();
  internal::GenerateRequest req;
  for (int i = 0; i < 30; ++i) req.add_prompt_token_ids(i + 3);
  req.mutable_sampling()->set_max_tokens(400);
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, req);
  internal::GenerateResponse r;
  uint64_t id = 0;
  int tokens = 0;
  std::string finish;
  while (reader->Read(&r)) {
    if (r.request_id() != 0) id = r.request_id();
    tokens += r.tokens_size();
    if (tokens >= 5 && id != 0) {
      grpc::ClientContext cctx;
      internal::CancelRequest c;
      c.set_request_id(id);
      internal::CancelReply reply;
      ASSERT_TRUE(stub_->Cancel(&cctx, c, &reply).ok());
      id = 0;
      tokens = -1000000;  // cancel once
    }
    if (!r.finish_reason().empty()) finish = r.finish_reason();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(finish, "cancelled");
  // The scheduler frees the blocks in the step that sees the cancellation (asynchronous to this
  // thread: wait for it, bounded generously at 30 s).
  int64_t free_blocks = -1;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < until) {
    free_blocks = Load().free_blocks();
    if (free_blocks == total) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(free_blocks, total) << "blocks still in use 30 s after the cancel";
}

}  // namespace
}  // namespace dmoe
