// Test only: an attention node's gRPC service that answers every Generate with the tokens 7, 8, 9
// (or those given) in one response (finish "length", or that given), or, when `sick`, with
// UNAVAILABLE (a node whose scheduler is gone); GetLoad reports 100 free blocks of 16 tokens and
// `queued` prompt tokens. The sampling parameters and prompt of the last Generate are kept
// (last_sampling(), last_prompt()). For gateway tests that need a node whose answers they control
// (a fake in addition to the real-process tests).
#ifndef DMOE_GATEWAY_FAKE_ATTENTION_H_
#define DMOE_GATEWAY_FAKE_ATTENTION_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "proto/attention.grpc.pb.h"

namespace dmoe::gateway {

class FakeAttention final : public internal::AttentionService::Service {
 public:
  explicit FakeAttention(bool sick = false, int64_t queued = 0,
                         std::vector<int32_t> tokens = {7, 8, 9}, std::string finish = "length")
      : sick_(sick), queued_(queued), tokens_(std::move(tokens)), finish_(std::move(finish)) {}
  grpc::Status Generate(grpc::ServerContext*, const internal::GenerateRequest* req,
                        grpc::ServerWriter<internal::GenerateResponse>* w) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      last_sampling_ = req->sampling();
      last_prompt_.assign(req->prompt_token_ids().begin(), req->prompt_token_ids().end());
    }
    ++generate_calls;
    if (sick_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "scheduler stopped");
    internal::GenerateResponse r;
    for (int32_t t : tokens_) r.add_tokens()->set_token_id(t);
    if (last_is_stop && r.tokens_size() > 0) r.mutable_tokens(r.tokens_size() - 1)->set_stop(true);
    r.set_finish_reason(finish_);
    w->Write(r);
    return grpc::Status::OK;
  }
  grpc::Status GetLoad(grpc::ServerContext*, const internal::GetLoadRequest*,
                       internal::GetLoadReply* reply) override {
    reply->set_total_blocks(100);
    reply->set_free_blocks(100);
    reply->set_block_tokens(16);
    reply->set_queued_prefill_tokens(queued_);
    return grpc::Status::OK;
  }
  std::atomic<int> generate_calls{0};
  // The last token is marked as the one that ended the generation (an eos); set before serving.
  bool last_is_stop = false;
  internal::SamplingParams last_sampling() {
    std::lock_guard<std::mutex> l(mu_);
    return last_sampling_;
  }
  std::vector<int32_t> last_prompt() {
    std::lock_guard<std::mutex> l(mu_);
    return last_prompt_;
  }

 private:
  std::mutex mu_;
  internal::SamplingParams last_sampling_;
  std::vector<int32_t> last_prompt_;
  const bool sick_;
  const int64_t queued_;
  const std::vector<int32_t> tokens_;
  const std::string finish_;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_FAKE_ATTENTION_H_
