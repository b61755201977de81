// Generation stops at the model's end-of-sequence token: a checkpoint whose generation_config.json
// names as eos the token the model emits at step k ends at step k with finish reason "stop", in
// process (dmoe generate's path) and through real dmoe-attention and dmoe-gateway processes;
// ignore_eos runs on to max_tokens. The token at step k comes from a run of the unmodified model.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "model/config.h"
#include "model/tiny_model.h"
#include "proto/dmoe/v1/dmoe.grpc.pb.h"
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
  while (k < full.size() &&
         std::find(full.begin(), full.begin() + static_cast<long>(k), full[k]) !=
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

  ChildProcess attention({Runfile("attention_service/dmoe-attention"), "--model", dir,
                          "--kv-blocks", "64", "--block-tokens", "8", "--blas-threads", "1",
                          "--ready-file", TmpDir() + "/attn.json"},
                         TmpDir() + "/attn.log");
  auto attn = testing::WaitForReadyFile(TmpDir() + "/attn.json", std::chrono::seconds(60));
  ASSERT_FALSE(attn.empty()) << attention.Log();
  ChildProcess gateway({Runfile("gateway/dmoe-gateway"), "--attention", attn["grpc"], "--model",
                        dir, "--ready-file", TmpDir() + "/gw.json"},
                       TmpDir() + "/gw.log");
  auto gw = testing::WaitForReadyFile(TmpDir() + "/gw.json", std::chrono::seconds(60));
  ASSERT_FALSE(gw.empty()) << gateway.Log();
  auto stub = v1::Dmoe::NewStub(grpc::CreateChannel(gw["grpc"], grpc::InsecureChannelCredentials()));

  const Streamed stopped = ViaGateway(stub.get(), /*ignore_eos=*/false);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.ids, expected);
  EXPECT_EQ(stopped.finish, "stop");
  const Streamed ignored = ViaGateway(stub.get(), /*ignore_eos=*/true);
  ASSERT_TRUE(ignored.status.ok()) << ignored.status.error_message();
  EXPECT_EQ(ignored.ids, full);
  EXPECT_EQ(ignored.finish, "length");
}

TEST(EosTest, BadEosTokenIdNamesTheField) {
  const std::string dir = TmpDir() + "/bad";
  ASSERT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), TinyModelOptions()).ok());
  for (const std::string& bad : {std::string("\"x\""), std::string("[1, -3]"),
                                 std::string("1000000")}) {
    std::ofstream(dir + "/generation_config.json") << "{\"eos_token_id\": " << bad << "}";
    auto config = LoadModelConfig(dir);
    ASSERT_FALSE(config.ok()) << bad;
    EXPECT_NE(std::string(config.status().message()).find("eos_token_id"), std::string::npos)
        << config.status();
  }
  std::ofstream(dir + "/generation_config.json") << "{not json";
  EXPECT_FALSE(LoadModelConfig(dir).ok());
}

}  // namespace
}  // namespace dmoe
