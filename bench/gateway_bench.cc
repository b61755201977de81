// Streaming latency through the gateway divided by direct to the attention node (prints figures):
// time to first token and the mean gap between streamed tokens, greedy, on the tiny preset with
// the experts on 2 dmoe-expert processes, one request at a time, both paths in one run.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/shard_process.h"
#include "model/tiny_model.h"
#include "proto/attention.grpc.pb.h"
#include "proto/dmoe/v1/dmoe.grpc.pb.h"

namespace dmoe {
namespace {

using Clock = std::chrono::steady_clock;

struct Latency {
  double ttft_ms = 0, gap_ms = 0;
};

template <typename Reader, typename Response, typename CountFn>
void Measure(Reader* reader, Response* r, CountFn count, Latency* acc, Clock::time_point start) {
  bool first = true;
  Clock::time_point last = start;
  int gaps = 0;
  double gap_sum = 0;
  while (reader->Read(r)) {
    if (count(*r) == 0) continue;
    const auto now = Clock::now();
    if (first) {
      acc->ttft_ms += std::chrono::duration<double, std::milli>(now - start).count();
      first = false;
    } else {
      gap_sum += std::chrono::duration<double, std::milli>(now - last).count();
      ++gaps;
    }
    last = now;
  }
  reader->Finish();
  if (gaps > 0) acc->gap_ms += gap_sum / gaps;
}

int Main(int argc, char** argv) {
  int requests = 20, tokens = 64;
  if (argc > 1) requests = std::atoi(argv[1]);
  setenv("UCX_NET_DEVICES", "lo", 0);
  setenv("UCX_TLS", "tcp,self", 0);
  const std::string dir = "/tmp/dmoe-bench/tiny";
  if (FILE* f = std::fopen((dir + "/config.json").c_str(), "r")) {
    std::fclose(f);
  } else if (!WriteTinyModel(dir, *PresetConfig("tiny"), TinyModelOptions()).ok()) {
    return 1;
  }
  ShardProcess s0(dir, "0/2", "/tmp/dmoe-bench/gw_s0.json");
  ShardProcess s1(dir, "1/2", "/tmp/dmoe-bench/gw_s1.json");
  ServiceProcess attention("attention_service/dmoe-attention",
                           {"--model", dir, "--expert-shards", s0.grpc() + "," + s1.grpc()},
                           "/tmp/dmoe-bench/gw_attn.json");
  ServiceProcess gateway("gateway/dmoe-gateway", {"--attention", attention.grpc(), "--model", dir},
                         "/tmp/dmoe-bench/gw.json");
  if (gateway.grpc().empty() || attention.grpc().empty()) {
    std::fprintf(stderr, "services did not start\n");
    return 1;
  }
  auto direct = internal::AttentionService::NewStub(
      grpc::CreateChannel(attention.grpc(), grpc::InsecureChannelCredentials()));
  auto via =
      v1::Dmoe::NewStub(grpc::CreateChannel(gateway.grpc(), grpc::InsecureChannelCredentials()));
  Latency d, g;
  for (int i = 0; i < requests + 2; ++i) {  // the first two of each warm up
    const bool count = i >= 2;
    Latency tmp;
    {
      internal::GenerateRequest req;
      for (int t = 0; t < 8; ++t) req.add_prompt_token_ids((i * 31 + t * 7) % 512);
      req.mutable_sampling()->set_max_tokens(tokens);
      grpc::ClientContext ctx;
      const auto start = Clock::now();
      auto reader = direct->Generate(&ctx, req);
      internal::GenerateResponse r;
      Measure(
          reader.get(), &r, [](const internal::GenerateResponse& x) { return x.tokens_size(); },
          count ? &d : &tmp, start);
    }
    {
      v1::GenerateRequest req;
      for (int t = 0; t < 8; ++t) req.mutable_token_ids()->add_ids((i * 31 + t * 7) % 512);
      req.mutable_sampling()->set_max_tokens(tokens);
      grpc::ClientContext ctx;
      const auto start = Clock::now();
      auto reader = via->Generate(&ctx, req);
      v1::GenerateResponse r;
      Measure(
          reader.get(), &r, [](const v1::GenerateResponse& x) { return x.token_ids_size(); },
          count ? &g : &tmp, start);
    }
  }
  std::printf(
      "tiny preset, experts on 2 dmoe-expert processes, %d requests x %d tokens, one at a time\n",
      requests, tokens);
  std::printf("%-28s %12s %16s\n", "", "TTFT ms", "per-token ms");
  std::printf("%-28s %12.3f %16.3f\n", "direct to dmoe-attention", d.ttft_ms / requests,
              d.gap_ms / requests);
  std::printf("%-28s %12.3f %16.3f\n", "through dmoe-gateway", g.ttft_ms / requests,
              g.gap_ms / requests);
  std::printf("gateway / direct: TTFT %.2f, per-token %.2f\n", g.ttft_ms / d.ttft_ms,
              g.gap_ms / d.gap_ms);
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
