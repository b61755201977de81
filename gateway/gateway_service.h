// The public API (dmoe.v1.Dmoe) over the attention nodes: tokenization and the chat template here,
// generation forwarded to an attention node picked by load, text streamed back UTF-8-safe with stop
// strings; deadlines and cancellation propagate; a request that fails before its first token is
// retried on another node; API keys with a per-key concurrency limit.
#ifndef DMOE_GATEWAY_GATEWAY_SERVICE_H_
#define DMOE_GATEWAY_GATEWAY_SERVICE_H_

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "common/mutex.h"
#include "gateway/chat_template.h"
#include "gateway/node_pool.h"
#include "model/tokenizer.h"
#include "proto/dmoe/v1/dmoe.grpc.pb.h"

namespace dmoe::gateway {

// API keys from a file: one key per line, optionally followed by its own concurrency limit;
// blank lines and lines starting with '#' are ignored. Thread-safe.
class ApiKeys {
 public:
  ApiKeys() = default;  // no keys: every request is allowed
  static absl::StatusOr<std::unique_ptr<ApiKeys>> Load(const std::string& path, int64_t limit);
  bool enabled() const { return !limits_.empty(); }
  // UNAUTHENTICATED without a known "authorization: Bearer KEY"; RESOURCE_EXHAUSTED when the key
  // already has its limit of requests in flight. On OK, *key must be Released later.
  absl::Status Acquire(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                       std::string* key);
  void Release(const std::string& key);

 private:
  Mutex mu_;
  std::map<std::string, int64_t> limits_;  // fixed after Load
  std::map<std::string, int64_t> active_ ABSL_GUARDED_BY(mu_);
};

// What the gateway counts (all optional).
struct GatewayMetrics {
  std::function<void(const std::string& outcome)> finished;  // ok, or the gRPC code's name
  std::function<void(double seconds)> time_to_first_token;
  std::function<void(int delta)> active;
};

struct GatewayOptions {
  std::string model_id = "dmoe";
  const Tokenizer* tokenizer = nullptr;  // null: token-id prompts only
  // The checkpoint's chat template (not owned); null: the built-in DeepSeek-V2-Chat one.
  const ChatTemplate* chat_template = nullptr;
  int max_attempts = 3;  // nodes tried for a request that fails before its first token
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  GatewayMetrics metrics;
};

class GatewayService final : public v1::Dmoe::CallbackService {
 public:
  GatewayService(NodePool* pool, ApiKeys* keys, GatewayOptions options)
      : pool_(pool), keys_(keys), options_(std::move(options)) {}

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

  NodePool* pool() { return pool_; }
  ApiKeys* keys() { return keys_; }
  const GatewayOptions& options() const { return options_; }

 private:
  grpc::ServerWriteReactor<v1::GenerateResponse>* Start(grpc::CallbackServerContext* ctx,
                                                        absl::StatusOr<std::vector<int32_t>> prompt,
                                                        const v1::SamplingParams& sampling,
                                                        const std::string& model);
  // The request's messages (and tools) through the chat template; INVALID_ARGUMENT naming the
  // field, or the template's own exception message.
  absl::StatusOr<std::string> RenderChat(const v1::ChatRequest& request) const;
  NodePool* pool_;
  ApiKeys* keys_;
  GatewayOptions options_;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_GATEWAY_SERVICE_H_
