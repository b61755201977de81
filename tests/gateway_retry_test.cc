// The gateway's retry of a request that fails before its first token, shown deterministically: two
// attention nodes behind a real GatewayService over real gRPC servers on 127.0.0.1. The "sick" node
// answers GetLoad with the lowest load (so the pool picks it first) but fails every Generate with
// UNAVAILABLE, as a node whose scheduler is gone would; the healthy node streams fixed tokens.
// (A fake in addition to the real-process test in gateway_test: that one cannot tell "retried"
// from "never picked the dead node".)
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "gateway/fake_attention.h"
#include "gateway/gateway_service.h"
#include "gateway/node_pool.h"
#include "gtest/gtest.h"
#include "model/tokenizer.h"
#include "model/tokenizer_testing.h"
#include "proto/attention.grpc.pb.h"
#include "proto/dmoe/v1/dmoe.grpc.pb.h"

namespace dmoe::gateway {
namespace {

std::unique_ptr<grpc::Server> Serve(grpc::Service* service, std::string* address) {
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  b.RegisterService(service);
  auto server = b.BuildAndStart();
  *address = "127.0.0.1:" + std::to_string(port);
  return server;
}

TEST(GatewayRetry, ARequestFailingBeforeItsFirstTokenMovesToAnotherNode) {
  FakeAttention sick(/*sick=*/true, /*queued=*/0), healthy(/*sick=*/false, /*queued=*/1000);
  std::string sick_addr, healthy_addr;
  auto s1 = Serve(&sick, &sick_addr);
  auto s2 = Serve(&healthy, &healthy_addr);
  NodePool pool({sick_addr, healthy_addr}, std::chrono::milliseconds(50));
  for (int i = 0; i < 3000 && pool.healthy() < 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(pool.healthy(), 2u) << "both nodes polled";
  ApiKeys keys;

  GatewayOptions options;
  std::atomic<int> retries{0};
  options.metrics.retried = [&retries] { ++retries; };  // dmoe_gateway_retries_total
  GatewayService service(&pool, &keys, options);
  std::string gw_addr;
  auto gw = Serve(&service, &gw_addr);
  auto stub = v1::Dmoe::NewStub(grpc::CreateChannel(gw_addr, grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  req.mutable_token_ids()->add_ids(1);
  req.mutable_sampling()->set_max_tokens(3);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->Generate(&ctx, req);
  std::vector<int32_t> ids;
  v1::GenerateResponse r;
  while (reader->Read(&r)) ids.insert(ids.end(), r.token_ids().begin(), r.token_ids().end());
  const grpc::Status st = reader->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(ids, (std::vector<int32_t>{7, 8, 9}));
  // Both nodes are healthy and the sick one reports less load: two-node power-of-two choices
  // always compares both, so the first attempt went to the sick node, the retry to the other.
  EXPECT_EQ(sick.generate_calls.load(), 1);
  EXPECT_EQ(healthy.generate_calls.load(), 1);
  EXPECT_EQ(retries.load(), 1);
  gw->Shutdown();
}

// A chunk may carry several tokens (speculative decoding): those after the token that completed a
// stop string are not part of the answer, so they are neither returned nor counted in usage.
// Before, "abcd" with stop "b" returned the ids of all four and completion_tokens 4.
TEST(GatewayStop, TokensAfterAStopStringAreNotReturnedOrCounted) {
  auto tok = Tokenizer::FromJson(testing::ByteLevelTokenizerJson());  // id = byte
  ASSERT_TRUE(tok.ok()) << tok.status();
  FakeAttention node(/*sick=*/false, /*queued=*/0, {97, 98, 99, 100});
  std::string node_addr;
  auto s = Serve(&node, &node_addr);
  NodePool pool({node_addr}, std::chrono::milliseconds(50));
  for (int i = 0; i < 3000 && pool.healthy() < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(pool.healthy(), 1u);
  ApiKeys keys;
  GatewayOptions options;
  options.tokenizer = tok->get();
  GatewayService service(&pool, &keys, options);
  std::string gw_addr;
  auto gw = Serve(&service, &gw_addr);
  auto stub = v1::Dmoe::NewStub(grpc::CreateChannel(gw_addr, grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  req.mutable_token_ids()->add_ids(97);
  req.mutable_sampling()->set_max_tokens(4);
  req.mutable_sampling()->add_stop("b");
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->Generate(&ctx, req);
  std::vector<int32_t> ids;
  std::string text, finish;
  int64_t completion = -1;
  v1::GenerateResponse r;
  while (reader->Read(&r)) {
    ids.insert(ids.end(), r.token_ids().begin(), r.token_ids().end());
    text += r.text_delta();
    if (!r.finish_reason().empty()) finish = r.finish_reason();
    if (r.has_usage()) completion = r.usage().completion_tokens();
  }
  const grpc::Status st = reader->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(ids, (std::vector<int32_t>{97, 98}));
  EXPECT_EQ(text, "a");
  EXPECT_EQ(finish, "stop");
  EXPECT_EQ(completion, 2);
  gw->Shutdown();
}

}  // namespace
}  // namespace dmoe::gateway
