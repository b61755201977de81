// The public API (dmoe.v1.Dmoe) over the attention nodes: tokenization and the chat template here,
// generation forwarded to an attention node picked by load, text streamed back UTF-8-safe with stop
// strings; deadlines and cancellation propagate; a request that fails before its first token is
// retried on another node; API keys with a per-key concurrency limit.
#ifndef DMOE_GATEWAY_GATEWAY_SERVICE_H_
#define DMOE_GATEWAY_GATEWAY_SERVICE_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/mutex.h"
#include "gateway/api_keys.h"
#include "gateway/chat_template.h"
#include "gateway/generation.h"
#include "gateway/node_pool.h"
#include "model/tokenizer.h"
#include "proto/dmoe/v1/dmoe.grpc.pb.h"

namespace dmoe::gateway {

class GatewayService final : public v1::Dmoe::CallbackService {
 public:
  GatewayService(NodePool* pool, ApiKeys* keys, GatewayOptions options)
      : pool_(pool), keys_(keys), options_(std::move(options)) {}
  // What a Generation needs (valid while this service is).
  GatewayContext context() const { return GatewayContext{pool_, keys_, &options_}; }

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) override;
  grpc::ServerWriteReactor<v1::GenerateResponse>* Chat(grpc::CallbackServerContext* ctx,
                                                       const v1::ChatRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* reply) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* reply) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx,
                                       const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* reply) override;

  // The request's messages (and tools) through the chat template; INVALID_ARGUMENT naming the
  // field, or the template's own exception message.
  absl::StatusOr<std::string> RenderChat(const v1::ChatRequest& request) const;

  NodePool* pool() { return pool_; }
  ApiKeys* keys() { return keys_; }
  const GatewayOptions& options() const { return options_; }

 private:
  grpc::ServerWriteReactor<v1::GenerateResponse>* Start(grpc::CallbackServerContext* ctx,
                                                        absl::StatusOr<std::vector<int32_t>> prompt,
                                                        const v1::SamplingParams& sampling,
                                                        const std::string& model);
  NodePool* pool_;
  ApiKeys* keys_;
  GatewayOptions options_;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_GATEWAY_SERVICE_H_
