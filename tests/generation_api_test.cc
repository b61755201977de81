// What a client of the public API sees of generation, through real dmoe-attention and dmoe-gateway
// processes (and in process where dmoe generate has the same path):
// - Generation stops at the model's end-of-sequence token: a checkpoint whose
// generation_config.json
//   names as eos the token the model emits at step k ends at step k with finish reason "stop";
//   ignore_eos runs on to max_tokens. The token at step k comes from a run of the unmodified model.
// - Top logprobs reach the client: N per token, most likely first, equal to a float64 log-softmax
//   of the model's logits computed here.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "model/config.h"
#include "model/tiny_model.h"
#include "proto/attention.grpc.pb.h"
#include "proto/dmoe/v1/dmoe.grpc.pb.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "tests/process_util.h"

namespace dmoe {
namespace {

using testing::ChildProcess;
using testing::Runfile;
using testing::TmpDir;

constexpr int64_t kMaxTokens = 12;
const std::vector<int32_t> kPrompt = {5, 6, 7, 8};

std::vector<int32_t> GenerateInProcess(const std::string& dir, bool ignore_eos) {
  auto model = LocalModel::Load(dir, LocalModelOptions());
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  GenerateOptions g;
  g.max_tokens = kMaxTokens;
  g.ignore_eos = ignore_eos;
  auto out = Generate((*model)->engine(), kPrompt, g);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : std::vector<int32_t>{};
}

struct Streamed {
  std::vector<int32_t> ids;
  std::string finish;
  grpc::Status status;
};

Streamed ViaGateway(v1::Dmoe::Stub* gateway, bool ignore_eos) {
  v1::GenerateRequest req;
  for (int32_t t : kPrompt) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_max_tokens(kMaxTokens);
  req.mutable_sampling()->set_ignore_eos(ignore_eos);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = gateway->Generate(&ctx, req);
  Streamed s;
  v1::GenerateResponse r;
  while (reader->Read(&r)) {
    s.ids.insert(s.ids.end(), r.token_ids().begin(), r.token_ids().end());
    if (!r.finish_reason().empty()) s.finish = r.finish_reason();
  }
  s.status = reader->Finish();
  return s;
}

// A dmoe-attention (experts in process) and a dmoe-gateway over it, on `dir`.
class Serving {
 public:
  explicit Serving(const std::string& dir, const std::vector<std::string>& attention_flags = {}) {
    const std::string tag = std::to_string(++count_);
    std::vector<std::string> argv = {Runfile("attention_service/dmoe-attention"),
                                     "--model",
                                     dir,
                                     "--kv-blocks",
                                     "64",
                                     "--block-tokens",
                                     "8",
                                     "--blas-threads",
                                     "1",
                                     "--ready-file",
                                     TmpDir() + "/attn" + tag + ".json"};
    argv.insert(argv.end(), attention_flags.begin(), attention_flags.end());
    attention_ = ChildProcess(argv, TmpDir() + "/attn" + tag + ".log");
    auto attn =
        testing::WaitForReadyFile(TmpDir() + "/attn" + tag + ".json", std::chrono::seconds(60));
    EXPECT_FALSE(attn.empty()) << attention_.Log();
    if (attn.empty()) return;
    attention_address_ = attn["grpc"];
    gateway_ = ChildProcess({Runfile("gateway/dmoe-gateway"), "--attention", attn["grpc"],
                             "--model", dir, "--ready-file", TmpDir() + "/gw" + tag + ".json"},
                            TmpDir() + "/gw" + tag + ".log");
    auto gw = testing::WaitForReadyFile(TmpDir() + "/gw" + tag + ".json", std::chrono::seconds(60));
    EXPECT_FALSE(gw.empty()) << gateway_.Log();
    if (gw.empty()) return;
    gateway_address_ = gw["grpc"];
    stub_ = v1::Dmoe::NewStub(grpc::CreateChannel(gw["grpc"], grpc::InsecureChannelCredentials()));
  }
  v1::Dmoe::Stub* stub() { return stub_.get(); }
  ChildProcess& attention() { return attention_; }
  const std::string& attention_address() const { return attention_address_; }
  const std::string& gateway_address() const { return gateway_address_; }

 private:
  static inline int count_ = 0;
  ChildProcess attention_, gateway_;
  std::unique_ptr<v1::Dmoe::Stub> stub_;
  std::string attention_address_, gateway_address_;
};

// grpc.health.v1 Check of `service` at `address`; UNKNOWN when the call fails.
grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& address,
                                                            const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse reply;
  if (!stub->Check(&ctx, req, &reply).ok()) return grpc::health::v1::HealthCheckResponse::UNKNOWN;
  return reply.status();
}

TEST(EosTest, StopsAtEosInProcessAndThroughTheGateway) {
  const std::string plain = TmpDir() + "/plain";
  ASSERT_TRUE(WriteTinyModel(plain, *PresetConfig("tiny"), TinyModelOptions()).ok());
  // config.json's eos (1) must not occur in the plain run, or it would already stop there.
  const std::vector<int32_t> full = GenerateInProcess(plain, /*ignore_eos=*/true);
  ASSERT_EQ(full.size(), static_cast<size_t>(kMaxTokens));
  ASSERT_EQ(GenerateInProcess(plain, /*ignore_eos=*/false), full)
      << "the tiny model emits its config eos (1); pick another prompt";
  // Step k: the first position >= 3 whose token did not occur before it.
  size_t k = 3;
  while (k < full.size() && std::find(full.begin(), full.begin() + static_cast<long>(k), full[k]) !=
                                full.begin() + static_cast<long>(k)) {
    ++k;
  }
  ASSERT_LT(k, full.size() - 1) << "no fresh token to use as eos";
  const int32_t eos = full[k];

  // The same weights; generation_config.json names [eos, 2] (a list, overriding config.json's 1).
  const std::string dir = TmpDir() + "/eos";
  std::filesystem::create_directories(dir);
  for (const char* f : {"config.json", "model.safetensors"}) {
    std::filesystem::copy_file(plain + "/" + f, dir + "/" + f,
                               std::filesystem::copy_options::overwrite_existing);
  }
  std::ofstream(dir + "/generation_config.json")
      << "{\"bos_token_id\": 0, \"eos_token_id\": [" << eos << ", 2]}";
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->eos_token_ids, (std::vector<int64_t>{eos, 2}));

  const std::vector<int32_t> expected(full.begin(), full.begin() + static_cast<long>(k) + 1);
  EXPECT_EQ(GenerateInProcess(dir, /*ignore_eos=*/false), expected);
  EXPECT_EQ(GenerateInProcess(dir, /*ignore_eos=*/true), full);

  Serving serving(dir);
  ASSERT_NE(serving.stub(), nullptr);
  v1::Dmoe::Stub* stub = serving.stub();
  const Streamed stopped = ViaGateway(stub, /*ignore_eos=*/false);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.ids, expected);
  EXPECT_EQ(stopped.finish, "stop");
  const Streamed ignored = ViaGateway(stub, /*ignore_eos=*/true);
  ASSERT_TRUE(ignored.status.ok()) << ignored.status.error_message();
  EXPECT_EQ(ignored.ids, full);
  EXPECT_EQ(ignored.finish, "length");
}

TEST(EosTest, BadEosTokenIdNamesTheField) {
  const std::string dir = TmpDir() + "/bad";
  ASSERT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), TinyModelOptions()).ok());
  for (const std::string& bad :
       {std::string("\"x\""), std::string("[1, -3]"), std::string("1000000")}) {
    std::ofstream(dir + "/generation_config.json") << "{\"eos_token_id\": " << bad << "}";
    auto config = LoadModelConfig(dir);
    ASSERT_FALSE(config.ok()) << bad;
    EXPECT_NE(std::string(config.status().message()).find("eos_token_id"), std::string::npos)
        << config.status();
  }
  std::ofstream(dir + "/generation_config.json") << "{not json";
  EXPECT_FALSE(LoadModelConfig(dir).ok());
}

TEST(TopLogprobsTest, EachTokenHasItsMostLikelyAlternativesFromTheModelsLogits) {
  const std::string dir = TmpDir() + "/logprobs";
  ASSERT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), TinyModelOptions()).ok());
  Serving serving(dir);
  ASSERT_NE(serving.stub(), nullptr);
  constexpr int kTop = 5;
  v1::GenerateRequest req;
  for (int32_t t : kPrompt) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_max_tokens(6);
  req.mutable_sampling()->set_logprobs(true);
  req.mutable_sampling()->set_top_logprobs(kTop);
  req.mutable_sampling()->set_ignore_eos(true);
  std::vector<int32_t> ids;
  std::vector<float> chosen;
  std::vector<v1::TopLogprobs> tops;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = serving.stub()->Generate(&ctx, req);
    v1::GenerateResponse r;
    while (reader->Read(&r)) {
      ASSERT_EQ(r.logprobs_size(), r.token_ids_size());
      ASSERT_EQ(r.top_logprobs_size(), r.token_ids_size());
      ids.insert(ids.end(), r.token_ids().begin(), r.token_ids().end());
      chosen.insert(chosen.end(), r.logprobs().begin(), r.logprobs().end());
      tops.insert(tops.end(), r.top_logprobs().begin(), r.top_logprobs().end());
    }
    const grpc::Status st = reader->Finish();
    ASSERT_TRUE(st.ok()) << st.error_message();
  }
  ASSERT_EQ(ids.size(), 6u);
  // The model's logits at every generated position, and their log-softmax in float64.
  auto model = LocalModel::Load(dir, LocalModelOptions());
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->engine().config();
  SequenceKvCache cache(c);
  std::vector<SequenceStep> batch(1);
  batch[0].cache = &cache;
  batch[0].tokens = kPrompt;
  std::vector<std::vector<float>> logits;
  for (size_t i = 0; i < ids.size(); ++i) {
    ASSERT_TRUE((*model)->engine().Step(batch, &logits).ok());
    const std::vector<float>& row = logits[0];
    double mx = -INFINITY;
    for (float v : row) mx = std::max(mx, static_cast<double>(v));
    double sum = 0;
    for (float v : row) sum += std::exp(static_cast<double>(v) - mx);
    auto logprob = [&](int32_t id) { return static_cast<double>(row[id]) - mx - std::log(sum); };
    std::vector<int32_t> order(row.size());
    for (size_t j = 0; j < order.size(); ++j) order[j] = static_cast<int32_t>(j);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return row[a] > row[b]; });
    EXPECT_EQ(ids[i], order[0]) << "greedy picks the most likely token at " << i;
    EXPECT_NEAR(chosen[i], logprob(ids[i]), 1e-4) << i;
    ASSERT_EQ(tops[i].top_size(), kTop) << i;
    for (int j = 0; j < kTop; ++j) {
      EXPECT_EQ(tops[i].top(j).token_id(), order[static_cast<size_t>(j)]) << i << " " << j;
      EXPECT_NEAR(tops[i].top(j).logprob(), logprob(order[static_cast<size_t>(j)]), 1e-4);
    }
    batch[0].tokens = {ids[i]};
  }
  // More than 20 is refused, naming the field.
  req.mutable_sampling()->set_top_logprobs(21);
  grpc::ClientContext ctx;
  auto reader = serving.stub()->Generate(&ctx, req);
  v1::GenerateResponse r;
  while (reader->Read(&r)) {
  }
  const grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("top_logprobs"), std::string::npos) << st.error_message();
}

// Readiness ("") is NOT_SERVING on a draining attention node and on a gateway whose attention
// nodes are gone; liveness ("dmoe.liveness") stays SERVING while the process answers.
TEST(HealthTest, ReadinessFollowsDrainAndAttentionNodes) {
  using grpc::health::v1::HealthCheckResponse;
  const std::string dir = TmpDir() + "/health";
  ASSERT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), TinyModelOptions()).ok());
  Serving serving(dir);
  ASSERT_NE(serving.stub(), nullptr);
  for (const std::string& addr : {serving.attention_address(), serving.gateway_address()}) {
    EXPECT_EQ(Health(addr, ""), HealthCheckResponse::SERVING) << addr;
    EXPECT_EQ(Health(addr, "dmoe.liveness"), HealthCheckResponse::SERVING) << addr;
  }
  EXPECT_EQ(Health(serving.gateway_address(), "dmoe.v1.Dmoe"), HealthCheckResponse::SERVING);
  // Long requests keep the attention node draining after SIGTERM.
  constexpr int kStreams = 6;
  std::vector<std::unique_ptr<grpc::ClientContext>> ctxs;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>>> readers;
  v1::GenerateRequest req;
  for (int32_t t : kPrompt) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_max_tokens(500);
  req.mutable_sampling()->set_ignore_eos(true);
  for (int i = 0; i < kStreams; ++i) {
    ctxs.push_back(std::make_unique<grpc::ClientContext>());
    readers.push_back(serving.stub()->Generate(ctxs.back().get(), req));
    // Until its first token: admitted, so running when the SIGTERM comes.
    v1::GenerateResponse first;
    do {
      ASSERT_TRUE(readers.back()->Read(&first));
    } while (first.token_ids_size() == 0);
  }
  kill(serving.attention().pid(), SIGTERM);
  HealthCheckResponse::ServingStatus draining = HealthCheckResponse::SERVING;
  for (int i = 0; i < 200 && draining == HealthCheckResponse::SERVING; ++i) {
    draining = Health(serving.attention_address(), "");
    if (draining == HealthCheckResponse::SERVING) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  EXPECT_EQ(draining, HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health(serving.attention_address(), "dmoe.liveness"), HealthCheckResponse::SERVING)
      << "a draining node is alive (requests still running)";
  // The drained node exits once its requests finished; then the gateway has no healthy node.
  for (auto& r : readers) {
    v1::GenerateResponse resp;
    while (r->Read(&resp)) {
    }
    EXPECT_TRUE(r->Finish().ok());
  }
  EXPECT_GE(serving.attention().Wait(std::chrono::seconds(30)), 0) << "drained node did not exit";
  HealthCheckResponse::ServingStatus gw = HealthCheckResponse::SERVING;
  for (int i = 0; i < 300 && gw == HealthCheckResponse::SERVING; ++i) {
    gw = Health(serving.gateway_address(), "");
    if (gw == HealthCheckResponse::SERVING)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(gw, HealthCheckResponse::NOT_SERVING) << "gateway without attention nodes";
  EXPECT_EQ(Health(serving.gateway_address(), "dmoe.v1.Dmoe"), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health(serving.gateway_address(), "dmoe.liveness"), HealthCheckResponse::SERVING);
}

// A reader of the node's Generate stream (the gateway, held back by a slow HTTP client) that
// stops reading: once more than --max-stream-backlog-kib waits unread in the node, the stream ends
// RESOURCE_EXHAUSTED and the generation stops (its blocks freed). The node held the whole
// generation for it before. (A reader that reads is not cut at the default 16 MiB: every other
// stream test. Even one that reads can have a few KiB queued while its writes complete, so a
// whole stream is not checked against this 1 KiB.)
TEST(StreamBacklogTest, AnAttentionStreamLeftUnreadIsCutAtItsBacklog) {
  const std::string dir = TmpDir() + "/backlog";
  ASSERT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), TinyModelOptions()).ok());
  Serving serving(dir, {"--max-stream-backlog-kib", "1"});
  ASSERT_FALSE(serving.attention_address().empty());
  grpc::ChannelArguments args;  // no BDP probing: the receive window stays 64 KiB
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  auto node = internal::AttentionService::NewStub(grpc::CreateCustomChannel(
      serving.attention_address(), grpc::InsecureChannelCredentials(), args));
  auto generate = [&](int64_t max_tokens, int64_t* tokens) {
    internal::GenerateRequest req;
    for (int32_t t : kPrompt) req.add_prompt_token_ids(t);
    req.mutable_sampling()->set_max_tokens(max_tokens);
    req.mutable_sampling()->set_ignore_eos(true);
    req.mutable_sampling()->set_logprobs(true);
    req.mutable_sampling()->set_top_logprobs(20);  // ~0.2 KiB per token (vocab 512)
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = node->Generate(&ctx, req);
    internal::GenerateResponse r;
    EXPECT_TRUE(reader->Read(&r));
    // Reads nothing more until the generation is over on the node (cut, or done).
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    do {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      grpc::ClientContext lctx;
      internal::GetLoadReply load;
      EXPECT_TRUE(node->GetLoad(&lctx, internal::GetLoadRequest(), &load).ok());
      if (load.running() == 0 && load.waiting() == 0) break;
    } while (std::chrono::steady_clock::now() < until);
    *tokens = r.tokens_size();
    while (reader->Read(&r)) *tokens += r.tokens_size();
    return reader->Finish();
  };
  int64_t tokens = 0;
  // ~100 KiB: over the reader's 64 KiB window and the 1 KiB backlog.
  const grpc::Status cut = generate(500, &tokens);
  EXPECT_EQ(cut.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << cut.error_message();
  EXPECT_NE(cut.error_message().find("1 KiB of this stream unread"), std::string::npos)
      << cut.error_message();
  EXPECT_LT(tokens, 500);
}

// A max_tokens that is only a default (max_tokens_up_to_cache: the client of the OpenAI API gave
// none, and the gateway asks for the rest of the context) is lowered to what one sequence fits in
// the node's KV cache (here 16 blocks of 8 tokens, under the tiny model's 512-token context): the
// answer runs until the cache is full and ends "length". An explicit max_tokens that does not fit
// is still refused, naming the field; a prompt that fills the cache is OUT_OF_RANGE.
TEST(MaxTokensTest, ADefaultMaxTokensIsLoweredToWhatTheCacheHolds) {
  const std::string dir = TmpDir() + "/small_cache";
  ASSERT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), TinyModelOptions()).ok());
  Serving serving(dir, {"--kv-blocks", "16"});  // after the fixture's 64: the last one counts
  ASSERT_FALSE(serving.attention_address().empty());
  auto node = internal::AttentionService::NewStub(
      grpc::CreateChannel(serving.attention_address(), grpc::InsecureChannelCredentials()));
  auto generate = [&](const std::vector<int32_t>& prompt, bool default_max, int64_t* tokens,
                      std::string* finish) {
    internal::GenerateRequest req;
    for (int32_t t : prompt) req.add_prompt_token_ids(t);
    req.mutable_sampling()->set_max_tokens(512 - static_cast<int64_t>(prompt.size()));
    req.mutable_sampling()->set_max_tokens_up_to_cache(default_max);
    req.mutable_sampling()->set_ignore_eos(true);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = node->Generate(&ctx, req);
    internal::GenerateResponse r;
    *tokens = 0;
    while (reader->Read(&r)) {
      *tokens += r.tokens_size();
      if (!r.finish_reason().empty()) *finish = r.finish_reason();
    }
    return reader->Finish();
  };
  int64_t tokens = 0;
  std::string finish;
  const grpc::Status lowered = generate(kPrompt, true, &tokens, &finish);
  EXPECT_TRUE(lowered.ok()) << lowered.error_message();
  EXPECT_EQ(tokens, 16 * 8 - static_cast<int64_t>(kPrompt.size()));
  EXPECT_EQ(finish, "length");
  const grpc::Status refused = generate(kPrompt, false, &tokens, &finish);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << refused.error_message();
  EXPECT_NE(refused.error_message().find("max_tokens"), std::string::npos);
  const grpc::Status full = generate(std::vector<int32_t>(128, 5), true, &tokens, &finish);
  EXPECT_EQ(full.error_code(), grpc::StatusCode::OUT_OF_RANGE) << full.error_message();
  EXPECT_NE(full.error_message().find("KV cache of 128 tokens"), std::string::npos)
      << full.error_message();
}

}  // namespace
}  // namespace dmoe
