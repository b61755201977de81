// End to end through real processes: dmoe-gateway -> dmoe-attention -> 2 dmoe-expert (UCX tcp),
// on the tiny-demo model with the real DeepSeek tokenizer (DMOE_NPM_DIR,
// scripts/fetch_tokenizer.sh).
#include <grpcpp/grpcpp.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "attention_service/local_model.h"
#include "gtest/gtest.h"
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

std::map<std::string, std::string> Ready(ChildProcess* p, const std::string& file) {
  auto info = testing::WaitForReadyFile(file, std::chrono::seconds(60));
  EXPECT_FALSE(info.empty()) << p->Log();
  return info;
}

class GatewayTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* npm = std::getenv("DMOE_NPM_DIR");
    ASSERT_NE(npm, nullptr) << "DMOE_NPM_DIR (scripts/fetch_tokenizer.sh) is required";
    setenv("UCX_NET_DEVICES", "lo", 1);
    setenv("UCX_TLS", "tcp,self", 1);
    dir_ = new std::string(TmpDir() + "/demo");
    TinyModelOptions o;
    o.seed = 5;
    ASSERT_TRUE(WriteTinyModel(*dir_, *PresetConfig("tiny-demo"), o).ok());
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {  // + the V3 chat template
      std::ifstream src(std::string(npm) + "/package/models/" + f, std::ios::binary);
      ASSERT_TRUE(src.good()) << f;
      std::ofstream dst(*dir_ + "/" + f, std::ios::binary);
      dst << src.rdbuf();
    }
    std::string shards;
    for (int i = 0; i < 2; ++i) {
      const std::string ready = TmpDir() + "/gw_shard" + std::to_string(i) + ".json";
      procs_.push_back(
          new ChildProcess({Runfile("expert_service/dmoe-expert"), "--model", *dir_, "--experts",
                            std::to_string(i) + "/2", "--ready-file", ready},
                           TmpDir() + "/gw_shard" + std::to_string(i) + ".log"));
      shards += (i ? "," : "") + Ready(procs_.back(), ready)["grpc"];
    }
    procs_.push_back(
        new ChildProcess({Runfile("attention_service/dmoe-attention"), "--model", *dir_,
                          "--expert-shards", shards, "--wire-dtype", "f32", "--kv-blocks", "256",
                          "--block-tokens", "8", "--ready-file", TmpDir() + "/gw_attn.json"},
                         TmpDir() + "/gw_attn.log"));
    const std::string attn = Ready(procs_.back(), TmpDir() + "/gw_attn.json")["grpc"];
    attention_ = internal::AttentionService::NewStub(
                     grpc::CreateChannel(attn, grpc::InsecureChannelCredentials()))
                     .release();
    procs_.push_back(new ChildProcess({Runfile("gateway/dmoe-gateway"), "--attention", attn,
                                       "--model", *dir_, "--ready-file", TmpDir() + "/gw.json"},
                                      TmpDir() + "/gw.log"));
    gateway_ =
        v1::Dmoe::NewStub(grpc::CreateChannel(Ready(procs_.back(), TmpDir() + "/gw.json")["grpc"],
                                              grpc::InsecureChannelCredentials()))
            .release();
    std::ofstream(TmpDir() + "/keys.txt") << "# keys\nk1 1\nk2\n";
    procs_.push_back(new ChildProcess(
        {Runfile("gateway/dmoe-gateway"), "--attention", attn, "--model", *dir_, "--api-keys",
         TmpDir() + "/keys.txt", "--ready-file", TmpDir() + "/gw2.json"},
        TmpDir() + "/gw2.log"));
    secured_ =
        v1::Dmoe::NewStub(grpc::CreateChannel(Ready(procs_.back(), TmpDir() + "/gw2.json")["grpc"],
                                              grpc::InsecureChannelCredentials()))
            .release();
    // A gateway that holds at most 16 KiB for a client that does not read; the client's channel
    // does not grow its receive window (no BDP probing), so what gRPC buffers for it is bounded.
    procs_.push_back(
        new ChildProcess({Runfile("gateway/dmoe-gateway"), "--attention", attn, "--model", *dir_,
                          "--max-stream-backlog-kib", "16", "--ready-file", TmpDir() + "/gw3.json"},
                         TmpDir() + "/gw3.log"));
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    tight_ = v1::Dmoe::NewStub(
                 grpc::CreateCustomChannel(Ready(procs_.back(), TmpDir() + "/gw3.json")["grpc"],
                                           grpc::InsecureChannelCredentials(), args))
                 .release();
  }
  static void TearDownTestSuite() {
    delete gateway_;
    delete secured_;
    delete tight_;
    delete attention_;
    for (auto it = procs_.rbegin(); it != procs_.rend(); ++it) delete *it;
    delete dir_;
  }

  struct Stream {
    std::vector<int32_t> ids;
    std::string text;
    std::vector<std::string> deltas;
    std::string finish;
    v1::Usage usage;
    grpc::Status status;
  };

  static Stream Run(v1::Dmoe::Stub* stub, const v1::GenerateRequest& req,
                    const std::string& key = "", int deadline_ms = 60000) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
    if (!key.empty()) ctx.AddMetadata("authorization", "Bearer " + key);
    auto reader = stub->Generate(&ctx, req);
    Stream s;
    v1::GenerateResponse r;
    while (reader->Read(&r)) {
      s.ids.insert(s.ids.end(), r.token_ids().begin(), r.token_ids().end());
      s.text += r.text_delta();
      s.deltas.push_back(r.text_delta());
      if (!r.finish_reason().empty()) s.finish = r.finish_reason();
      if (r.has_usage()) s.usage = r.usage();
    }
    s.status = reader->Finish();
    return s;
  }

  static v1::GenerateRequest Ids(const std::vector<int32_t>& ids, int max_tokens) {
    v1::GenerateRequest req;
    for (int32_t id : ids) req.mutable_token_ids()->add_ids(id);
    req.mutable_sampling()->set_max_tokens(max_tokens);
    return req;
  }

  static v1::GenerateRequest Text(const std::string& text, int max_tokens) {
    v1::GenerateRequest req;
    req.set_text(text);
    req.mutable_sampling()->set_max_tokens(max_tokens);
    return req;
  }

  // Blocks still in use once the attention node has no running sequence and every block is
  // free, or after 30 s (a generous bound: the cancel/finish is asynchronous).
  static int64_t WaitAllBlocksFree() {
    int64_t free_blocks = -1, total = 0, running = -1;
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < until) {
      grpc::ClientContext ctx;
      internal::GetLoadReply load;
      EXPECT_TRUE(attention_->GetLoad(&ctx, internal::GetLoadRequest(), &load).ok());
      free_blocks = load.free_blocks();
      total = load.total_blocks();
      running = load.running();
      if (free_blocks == total && running == 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    EXPECT_EQ(running, 0) << "sequences still running after 30 s";
    return total - free_blocks;
  }

  // True when `s` is well-formed UTF-8 (no partial or invalid sequence).
  static bool ValidUtf8(const std::string& s) {
    size_t i = 0;
    while (i < s.size()) {
      const uint8_t c = static_cast<uint8_t>(s[i]);
      const int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
      if (n == 0 || i + static_cast<size_t>(n) > s.size()) return false;
      for (int k = 1; k < n; ++k) {
        if ((static_cast<uint8_t>(s[i + static_cast<size_t>(k)]) & 0xc0) != 0x80) return false;
      }
      i += static_cast<size_t>(n);
    }
    return true;
  }

  static std::string* dir_;
  static std::vector<ChildProcess*> procs_;
  static internal::AttentionService::Stub* attention_;
  static v1::Dmoe::Stub* gateway_;
  static v1::Dmoe::Stub* secured_;
  static v1::Dmoe::Stub* tight_;  // --max-stream-backlog-kib 16
};
std::string* GatewayTest::dir_ = nullptr;
std::vector<ChildProcess*> GatewayTest::procs_;
internal::AttentionService::Stub* GatewayTest::attention_ = nullptr;
v1::Dmoe::Stub* GatewayTest::gateway_ = nullptr;
v1::Dmoe::Stub* GatewayTest::secured_ = nullptr;
v1::Dmoe::Stub* GatewayTest::tight_ = nullptr;

TEST_F(GatewayTest, GreedyTokenIdsEqualTheInProcessEngine) {
  auto local = LocalModel::Load(*dir_);
  ASSERT_TRUE(local.ok());
  for (const std::vector<int32_t>& prompt :
       {std::vector<int32_t>{0, 19923, 14}, std::vector<int32_t>{5, 6, 7, 8, 9},
        std::vector<int32_t>{128000}}) {
    const Stream s = Run(gateway_, Ids(prompt, 12));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    GenerateOptions g;
    g.max_tokens = 12;
    EXPECT_EQ(s.ids, *Generate((*local)->engine(), prompt, g));
    EXPECT_EQ(s.finish, "length");
    EXPECT_EQ(s.usage.prompt_tokens(), static_cast<int64_t>(prompt.size()));
    EXPECT_EQ(s.usage.completion_tokens(), 12);
  }
}

TEST_F(GatewayTest, TextStreamsAsCompleteCharacters) {
  const std::string prompt = "Hello, DeepSeek! 你好，世界 🚀";
  const Stream s = Run(gateway_, Text(prompt, 40));
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  grpc::ClientContext tctx;
  v1::TokenizeRequest treq;
  treq.set_text(prompt);
  v1::TokenizeResponse tok;
  ASSERT_TRUE(gateway_->Tokenize(&tctx, treq, &tok).ok());
  EXPECT_EQ(s.usage.prompt_tokens(), tok.ids_size());
  grpc::ClientContext dctx;
  v1::DetokenizeRequest dreq;
  for (int32_t id : s.ids) dreq.add_ids(id);
  v1::DetokenizeResponse text;
  ASSERT_TRUE(gateway_->Detokenize(&dctx, dreq, &text).ok());
  EXPECT_EQ(s.text, text.text());  // the deltas add up to the whole text
  EXPECT_GT(s.deltas.size(), 2u);
  for (size_t i = 0; i < s.deltas.size(); ++i) {
    EXPECT_TRUE(ValidUtf8(s.deltas[i])) << "delta " << i << " splits a character";
  }
}

TEST_F(GatewayTest, StopStringEndsTheTextBeforeIt) {
  const Stream full = Run(gateway_, Text("Once upon a time", 30));
  ASSERT_TRUE(full.status.ok());
  ASSERT_GT(full.text.size(), 12u);
  // A stop string from the middle of the text (on a character boundary).
  size_t at = full.text.size() / 2;
  while (at > 0 && (static_cast<uint8_t>(full.text[at]) & 0xc0) == 0x80) --at;
  size_t end = at + 1;
  while (end < full.text.size() && (static_cast<uint8_t>(full.text[end]) & 0xc0) == 0x80) ++end;
  const std::string stop = full.text.substr(at, end - at);
  v1::GenerateRequest req = Text("Once upon a time", 30);
  req.mutable_sampling()->add_stop(stop);
  const Stream s = Run(gateway_, req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.text, full.text.substr(0, full.text.find(stop)));
  EXPECT_EQ(s.finish, "stop");
  EXPECT_EQ(WaitAllBlocksFree(), 0);
}

TEST_F(GatewayTest, StopStringSpanningDeltasEndsTheText) {
  const Stream full = Run(gateway_, Text("Once upon a time", 30));
  ASSERT_TRUE(full.status.ok());
  // The last character of one non-empty delta and the first of the next: the stop string is
  // never whole inside one delta.
  std::string stop;
  for (size_t i = 0; i + 1 < full.deltas.size() && stop.empty(); ++i) {
    const std::string& a = full.deltas[i];
    const std::string& b = full.deltas[i + 1];
    if (i < 2 || a.empty() || b.empty()) continue;
    size_t at = a.size() - 1;
    while (at > 0 && (static_cast<uint8_t>(a[at]) & 0xc0) == 0x80) --at;
    size_t end = 1;
    while (end < b.size() && (static_cast<uint8_t>(b[end]) & 0xc0) == 0x80) ++end;
    stop = a.substr(at) + b.substr(0, end);
  }
  ASSERT_FALSE(stop.empty()) << "no two adjacent non-empty deltas";
  v1::GenerateRequest req = Text("Once upon a time", 30);
  req.mutable_sampling()->add_stop(stop);
  const Stream s = Run(gateway_, req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.text, full.text.substr(0, full.text.find(stop))) << "stop \"" << stop << "\"";
  EXPECT_EQ(s.finish, "stop");
  for (const std::string& d : s.deltas) EXPECT_EQ(d.find(stop), std::string::npos);
  EXPECT_EQ(WaitAllBlocksFree(), 0);
}

// The checkpoint's own template (here DeepSeek-V3's from tokenizer_config.json): the Chat stream
// equals a Generate of the text that template gives (written out here by hand), token for token.
TEST_F(GatewayTest, ChatUsesTheCheckpointsTemplate) {
  v1::ChatRequest req;
  auto* s = req.add_messages();
  s->set_role("system");
  s->set_content("Be brief.");
  auto* m = req.add_messages();
  m->set_role("user");
  m->set_content("What is MLA?");
  req.mutable_sampling()->set_max_tokens(8);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  auto reader = gateway_->Chat(&ctx, req);
  v1::GenerateResponse r;
  std::vector<int32_t> chat_ids;
  int64_t prompt_tokens = 0;
  while (reader->Read(&r)) {
    chat_ids.insert(chat_ids.end(), r.token_ids().begin(), r.token_ids().end());
    if (r.has_usage()) prompt_tokens = r.usage().prompt_tokens();
  }
  ASSERT_TRUE(reader->Finish().ok());
  const std::string text = "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is MLA?<｜Assistant｜>";
  grpc::ClientContext tctx;
  v1::TokenizeRequest treq;
  treq.set_text(text);
  v1::TokenizeResponse tok;
  ASSERT_TRUE(gateway_->Tokenize(&tctx, treq, &tok).ok());
  EXPECT_EQ(prompt_tokens, tok.ids_size());
  EXPECT_EQ(tok.ids(0), 0);  // bos is one special token
  v1::GenerateRequest g = Text(text, 8);
  g.mutable_sampling()->set_ignore_eos(true);
  const Stream direct = Run(gateway_, g);
  ASSERT_TRUE(direct.status.ok());
  EXPECT_EQ(chat_ids, direct.ids);
  // A role no chat API has is refused before the template (which might skip it silently).
  v1::ChatRequest bad;
  bad.add_messages()->set_role("narrator");
  bad.mutable_sampling()->set_max_tokens(2);
  grpc::ClientContext bctx;
  auto breader = gateway_->Chat(&bctx, bad);
  while (breader->Read(&r)) {
  }
  const grpc::Status st = breader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  // Tools that are not a JSON array name the field.
  v1::ChatRequest tools = req;
  tools.set_tools_json("{not json");
  grpc::ClientContext tctx2;
  auto treader = gateway_->Chat(&tctx2, tools);
  while (treader->Read(&r)) {
  }
  const grpc::Status st2 = treader->Finish();
  EXPECT_EQ(st2.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st2.error_message().find("tools_json"), std::string::npos) << st2.error_message();
}

// A gRPC client that stops reading: once more than --max-stream-backlog-kib of its stream waits
// unread in the gateway, the stream ends RESOURCE_EXHAUSTED and its generation is cancelled (the
// node frees its blocks). The gateway held the whole generation for it before. A client that
// reads gets its whole stream.
TEST_F(GatewayTest, AClientThatStopsReadingIsCutAtItsBacklog) {
  v1::GenerateRequest req = Ids({5, 6, 7}, 500);
  req.mutable_sampling()->set_ignore_eos(true);
  req.mutable_sampling()->set_logprobs(true);
  req.mutable_sampling()->set_top_logprobs(20);  // ~0.5 KiB per token
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = tight_->Generate(&ctx, req);
  v1::GenerateResponse r;
  ASSERT_TRUE(reader->Read(&r)) << reader->Finish().error_message();
  // Reads nothing until the generation is over on the node (cut, or done): 500 tokens of ~0.5
  // KiB, where the client's HTTP/2 window (no BDP growth) takes 64 KiB and the gateway 16 KiB.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  do {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    grpc::ClientContext lctx;
    internal::GetLoadReply load;
    ASSERT_TRUE(attention_->GetLoad(&lctx, internal::GetLoadRequest(), &load).ok());
    if (load.running() == 0 && load.waiting() == 0) break;
  } while (std::chrono::steady_clock::now() < until);
  int64_t tokens = r.token_ids_size();
  while (reader->Read(&r)) tokens += r.token_ids_size();
  const grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  EXPECT_NE(st.error_message().find("reads too slowly"), std::string::npos) << st.error_message();
  EXPECT_LT(tokens, 500);
  EXPECT_EQ(WaitAllBlocksFree(), 0);
  const Stream whole = Run(gateway_, req);  // the default backlog (16 MiB), read as it comes
  ASSERT_TRUE(whole.status.ok()) << whole.status.error_message();
  EXPECT_EQ(whole.ids.size(), 500u);
}

TEST_F(GatewayTest, CancelMidStreamFreesTheBlocks) {
  grpc::ClientContext ctx;
  auto reader = gateway_->Generate(&ctx, Ids({1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 450));
  v1::GenerateResponse r;
  int got = 0;
  while (got < 3 && reader->Read(&r)) got += r.token_ids_size();
  ctx.TryCancel();
  while (reader->Read(&r)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(WaitAllBlocksFree(), 0);
}

TEST_F(GatewayTest, DeadlineShorterThanTheWork) {
  const Stream s = Run(gateway_, Ids({1, 2, 3}, 480), "", 40);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.status.error_message();
  EXPECT_EQ(WaitAllBlocksFree(), 0);
}

TEST_F(GatewayTest, MalformedRequestsNameTheField) {
  auto expect = [](const Stream& s, grpc::StatusCode code, const std::string& text) {
    EXPECT_EQ(s.status.error_code(), code) << s.status.error_message();
    EXPECT_NE(s.status.error_message().find(text), std::string::npos) << s.status.error_message();
  };
  expect(Run(gateway_, Ids({1, 2}, 0)), grpc::StatusCode::INVALID_ARGUMENT, "sampling.max_tokens");
  expect(Run(gateway_, Ids({1, 200000}, 4)), grpc::StatusCode::INVALID_ARGUMENT, "prompt[1]");
  expect(Run(gateway_, Ids({}, 4)), grpc::StatusCode::INVALID_ARGUMENT, "prompt: is empty");
  v1::GenerateRequest bad_p = Ids({1}, 4);
  bad_p.mutable_sampling()->set_top_p(2);
  expect(Run(gateway_, bad_p), grpc::StatusCode::INVALID_ARGUMENT, "top_p");
  v1::GenerateRequest model = Ids({1}, 4);
  model.set_model("gpt-9");
  expect(Run(gateway_, model), grpc::StatusCode::NOT_FOUND, "model");
  v1::ChatRequest chat;
  auto* m = chat.add_messages();
  m->set_role("robot");
  chat.mutable_sampling()->set_max_tokens(3);
  grpc::ClientContext ctx;
  auto reader = gateway_->Chat(&ctx, chat);
  v1::GenerateResponse r;
  while (reader->Read(&r)) {
  }
  const grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("messages[0].role"), std::string::npos);
}

TEST_F(GatewayTest, ApiKeysAndPerKeyLimits) {
  EXPECT_EQ(Run(secured_, Ids({1}, 2)).status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Run(secured_, Ids({1}, 2), "nope").status.error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(Run(secured_, Ids({1}, 2), "k2").status.ok());
  // k1 may have one request in flight.
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer k1");
  auto reader = secured_->Generate(&ctx, Ids({1, 2, 3}, 450));
  v1::GenerateResponse r;
  ASSERT_TRUE(reader->Read(&r));
  EXPECT_EQ(Run(secured_, Ids({1}, 2), "k1").status.error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  ctx.TryCancel();
  while (reader->Read(&r)) {
  }
  reader->Finish();
  grpc::Status again;
  for (int i = 0; i < 100; ++i) {  // the slot is released when the stream is done
    again = Run(secured_, Ids({1}, 2), "k1").status;
    if (again.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(again.ok()) << again.error_message();
}

TEST_F(GatewayTest, HealthServiceAnswersServing) {
  for (const char* file : {"/gw.json", "/gw_attn.json", "/gw_shard0.json"}) {
    const std::string addr =
        testing::WaitForReadyFile(TmpDir() + file, std::chrono::seconds(1))["grpc"];
    auto health = grpc::health::v1::Health::NewStub(
        grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckResponse reply;
    ASSERT_TRUE(health->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &reply).ok()) << file;
    EXPECT_EQ(reply.status(), grpc::health::v1::HealthCheckResponse::SERVING) << file;
  }
}

TEST_F(GatewayTest, ServesTls) {
  const std::string key = TmpDir() + "/tls_key.pem", cert = TmpDir() + "/tls_cert.pem";
  const std::string cmd =
      "openssl req -x509 -newkey rsa:2048 -nodes -keyout " + key + " -out " + cert +
      " -days 1 -subj /CN=localhost -addext subjectAltName=DNS:localhost " + "> /dev/null 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  std::string attn =
      testing::WaitForReadyFile(TmpDir() + "/gw_attn.json", std::chrono::seconds(1))["grpc"];
  ChildProcess tls(
      {Runfile("gateway/dmoe-gateway"), "--attention", attn, "--model", *dir_, "--tls-cert", cert,
       "--tls-key", key, "--ready-file", TmpDir() + "/gw_tls.json"},
      TmpDir() + "/gw_tls.log");
  std::string addr = Ready(&tls, TmpDir() + "/gw_tls.json")["grpc"];
  addr.replace(0, addr.rfind(':'), "localhost");
  std::ifstream in(cert);
  std::string pem((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = pem;
  auto secure = v1::Dmoe::NewStub(grpc::CreateChannel(addr, grpc::SslCredentials(ssl)));
  EXPECT_TRUE(Run(secure.get(), Ids({1, 2}, 3)).status.ok());
  auto plain = v1::Dmoe::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  EXPECT_FALSE(Run(plain.get(), Ids({1, 2}, 3), "", 2000).status.ok());
}

// A request that has not started is retried on another node when its node fails.
TEST_F(GatewayTest, RequestsMoveToALiveNodeWhenOneDies) {
  // A second attention node and a gateway over both; then the second node dies.
  const std::string ready = TmpDir() + "/gw_attn_b.json";
  auto* doomed = new ChildProcess({Runfile("attention_service/dmoe-attention"), "--model", *dir_,
                                   "--kv-blocks", "64", "--ready-file", ready},
                                  TmpDir() + "/gw_attn_b.log");
  const std::string b = Ready(doomed, ready)["grpc"];
  grpc::ClientContext lctx;
  internal::GetLoadReply load;
  ASSERT_TRUE(attention_->GetLoad(&lctx, internal::GetLoadRequest(), &load).ok());
  std::string a;
  for (const auto& [k, v] :
       testing::WaitForReadyFile(TmpDir() + "/gw_attn.json", std::chrono::seconds(1))) {
    if (k == "grpc") a = v;
  }
  auto* gw = new ChildProcess({Runfile("gateway/dmoe-gateway"), "--attention", b + "," + a,
                               "--model", *dir_, "--ready-file", TmpDir() + "/gw3.json"},
                              TmpDir() + "/gw3.log");
  auto stub = v1::Dmoe::NewStub(grpc::CreateChannel(Ready(gw, TmpDir() + "/gw3.json")["grpc"],
                                                    grpc::InsecureChannelCredentials()));
  delete doomed;  // SIGKILL
  int ok = 0;
  for (int i = 0; i < 10; ++i) ok += Run(stub.get(), Ids({1, 2, 3}, 3)).status.ok();
  EXPECT_EQ(ok, 10);
  delete gw;
}

}  // namespace
}  // namespace dmoe
