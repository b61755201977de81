// One request's generation on the attention nodes, as both public fronts (gRPC and HTTP) run it:
// the node's token stream is read through gRPC's callback API (no thread per request), text is
// decoded UTF-8-safe, stop strings are applied, and what the client is sent goes to a
// GenerationSink. A request that fails before its first token because its node is unreachable is
// retried on another node. The sink may throttle the stream (Pause/Resume): a slow client holds
// the node's stream back through gRPC's flow control instead of piling up in the gateway.
#ifndef DMOE_GATEWAY_GENERATION_H_
#define DMOE_GATEWAY_GENERATION_H_

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/mutex.h"
#include "gateway/api_keys.h"
#include "gateway/chat_template.h"
#include "gateway/node_pool.h"
#include "gateway/text_stream.h"
#include "model/config.h"
#include "model/tokenizer.h"
#include "proto/dmoe/v1/dmoe.grpc.pb.h"

namespace dmoe::gateway {

// What the gateway counts (all optional).
struct GatewayMetrics {
  std::function<void(const std::string& outcome)> finished;  // ok, or the gRPC code's name
  std::function<void(double seconds)> time_to_first_token;   // arrival to the first token
  std::function<void(double seconds)> inter_token;           // between streamed responses
  std::function<void(double seconds)> end_to_end;            // arrival to the end (OK only)
  std::function<void(double seconds)> queue_time;            // waiting for admission on the node
  std::function<void(int delta)> active;
  // A request that failed before its first token went to another node (a failing node hides
  // behind retries that succeed).
  std::function<void()> retried;
};

struct GatewayOptions {
  std::string model_id = "dmoe";
  // Other names the model answers to (e.g. the checkpoint's Hugging Face name that client
  // scripts hard-code); responses carry the name the request used.
  std::vector<std::string> model_aliases;
  // Whether `model` names this model ("" names it too).
  bool Serves(const std::string& model) const {
    return model.empty() || model == model_id ||
           std::find(model_aliases.begin(), model_aliases.end(), model) != model_aliases.end();
  }
  // Sets model_id and model_aliases from --model-id's "NAME[,ALIAS...]"; INVALID_ARGUMENT naming
  // the flag on an empty name.
  absl::Status SetModelNames(const std::string& flag_value);
  const Tokenizer* tokenizer = nullptr;  // null: token-id prompts only
  // The checkpoint's chat template (not owned); null: the built-in DeepSeek-V2-Chat one.
  const ChatTemplate* chat_template = nullptr;
  int max_attempts = 3;  // nodes tried for a request that fails before its first token
  // A gRPC stream whose client leaves more than this unread ends RESOURCE_EXHAUSTED (its
  // generation cancelled): a stalled reader held the whole generation in the gateway.
  size_t max_stream_backlog_bytes = size_t{16} << 20;
  int64_t vocab_size = 0;
  // Defaults of the OpenAI API's sampling fields a request omits (the checkpoint's
  // generation_config.json; unset: OpenAI's own, temperature 1 and top_p 1).
  ModelConfig::SamplingDefaults sampling_defaults;
  // "deepseek-r1": chat answers' thinking (up to "</think>") goes to reasoning_content (as
  // vLLM's --reasoning-parser deepseek_r1); "": all of it is content.
  std::string reasoning_parser;
  // From --reasoning-parser: deepseek-r1 (or vLLM's spelling deepseek_r1) or none; anything else
  // is INVALID_ARGUMENT naming the flag.
  absl::Status SetReasoningParser(const std::string& name);
  // "deepseek_v3": the OpenAI API parses DeepSeek-V3's tool-call markup into tool_calls (as
  // vLLM's --tool-call-parser deepseek_v3); "": requests with tools need tool_choice "none".
  std::string tool_call_parser;
  // From --tool-call-parser: deepseek_v3 (or deepseek-v3) or none; anything else is
  // INVALID_ARGUMENT naming the flag.
  absl::Status SetToolCallParser(const std::string& name);
  // From --generation-config: "auto" takes `d` (the checkpoint's generation_config.json, logged),
  // "none" keeps OpenAI's defaults; anything else is INVALID_ARGUMENT naming the flag.
  absl::Status SetSamplingDefaults(const std::string& mode, const ModelConfig::SamplingDefaults& d);
  int64_t max_position_embeddings = 0;
  GatewayMetrics metrics;
};

// What generations share: the nodes, the keys and the options (none owned).
struct GatewayContext {
  NodePool* pool = nullptr;
  ApiKeys* keys = nullptr;
  const GatewayOptions* options = nullptr;
};

// Receives one generation's output, in order, on gRPC's threads. OnDone is the last call.
class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  // Generated tokens with their text (possibly empty: a character or a stop string incomplete).
  virtual void OnChunk(v1::GenerateResponse chunk) = 0;
  // The end. On OK, `last` holds the text held back until the end, finish_reason and usage.
  virtual void OnDone(const grpc::Status& status, v1::GenerateResponse last) = 0;
};

struct GenerationRequest {
  std::vector<int32_t> prompt;
  v1::SamplingParams sampling;
  std::chrono::system_clock::time_point deadline = std::chrono::system_clock::time_point::max();
  std::string key;  // an ApiKeys key acquired for this request: released at the end
  // sampling.max_tokens is a default (the client gave none): the node lowers it to what its KV
  // cache holds rather than refusing the request.
  bool max_tokens_up_to_cache = false;
  // Special tokens (BOS, EOS under ignore_eos, ...) add no text (the OpenAI API's default, as
  // vLLM's skip_special_tokens); their ids and logprobs are still returned.
  bool skip_special_tokens = false;
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::now();
};

class Generation : public std::enable_shared_from_this<Generation> {
 public:
  // Starts the request on a node; every outcome (even no node at all) reaches sink->OnDone.
  static std::shared_ptr<Generation> Start(const GatewayContext& ctx, GenerationRequest request,
                                           std::shared_ptr<GenerationSink> sink);
  ~Generation();
  // Ends the request (the node frees its sequence); OnDone follows with CANCELLED.
  void Cancel();
  // Stops / restarts reading the node's stream (the client is slow / has caught up).
  void Pause();
  void Resume();

  class Attempt;  // one try on one node (generation.cc)

 private:
  struct Progress;
  Generation(const GatewayContext& ctx, GenerationRequest request,
             std::shared_ptr<GenerationSink> sink);
  void StartAttempt();
  // From the attempt: a response of the node's stream. Returns whether to read on now.
  bool OnResponse(const internal::GenerateResponse& r);
  void OnAttemptDone(int node, bool got_token, grpc::Status status);
  void Finish(grpc::Status status);
  v1::GenerateResponse TokensChunk(const internal::GenerateResponse& r);
  void HoldPromptScores(const internal::GenerateResponse& r);
  v1::GenerateResponse LastResponse();

  const GatewayContext ctx_;
  const GenerationRequest request_;
  internal::GenerateRequest upstream_request_;
  // Touched only by the attempt's callbacks, which gRPC runs one at a time.
  std::unique_ptr<Progress> progress_;
  std::set<int> tried_;
  int attempts_ = 0;
  Mutex mu_;
  std::shared_ptr<GenerationSink> sink_ ABSL_GUARDED_BY(mu_);
  // The try in flight. No gRPC operation is started under mu_ (gRPC may run callbacks inline).
  std::shared_ptr<Attempt> attempt_ ABSL_GUARDED_BY(mu_);
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool paused_ ABSL_GUARDED_BY(mu_) = false;
  // A read waits for Resume; the attempt holds a gRPC hold meanwhile (no OnDone before it).
  bool read_parked_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_GENERATION_H_
