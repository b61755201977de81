// The OpenAI API's JSON, without any I/O: request bodies of /v1/chat/completions and
// /v1/completions parsed and checked (every error names its field), and the responses and
// server-sent-event chunks written from the gateway's GenerateResponse stream.
#ifndef DMOE_GATEWAY_OPENAI_H_
#define DMOE_GATEWAY_OPENAI_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gateway/text_stream.h"
#include "model/config.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "proto/dmoe/v1/dmoe.pb.h"

namespace dmoe::gateway::openai {

enum class Endpoint { kChat, kCompletions };

// Limits on a request, beyond the model's context.
inline constexpr int kMaxMessages = 2048;
inline constexpr int kMaxChoices = 64;  // n x prompts
inline constexpr int kMaxStops = 16;
inline constexpr int kMaxStopTokenIds = 64;
inline constexpr size_t kMaxToolName = 64;  // bytes, as OpenAI's
// A body nesting arrays/objects deeper than this is refused before anything copies or prints it
// (both recurse per level; a million levels overflowed the stack).
inline constexpr int kMaxBodyNesting = 128;

// An error response: {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int http_status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // empty: null
  std::string code;   // empty: null
  std::string Json() const;
};
// From a status whose message reads "field: what" (the gateway's convention): INVALID_ARGUMENT
// and FAILED_PRECONDITION 400, OUT_OF_RANGE 400 "context_length_exceeded", UNAUTHENTICATED 401,
// PERMISSION_DENIED 403, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED
// 504, others 500.
ApiError ErrorFromStatus(const absl::Status& status);

using Prompt = std::variant<std::string, std::vector<int32_t>>;

struct Request {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string model;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  int n = 1;
  bool max_tokens_given = false;  // else 16 (completions) or the rest of the context (chat)
  bool seed_given = false;        // else each request draws its own (as OpenAI's API)
  // Sampling fields the request gave (else the model's defaults apply: ApplySamplingDefaults).
  bool temperature_given = false, top_p_given = false, top_k_given = false, min_p_given = false,
       repetition_penalty_given = false;
  // Completions: the prompts (each answered n times). Chat: `chat` holds the messages.
  std::vector<Prompt> prompts;
  v1::ChatRequest chat;
  v1::SamplingParams sampling;      // max_tokens 0 when not given
  bool logprobs = false;            // chat: logprobs; completions: logprobs given
  bool skip_special_tokens = true;  // vLLM's: special tokens add no text
  // Completions: the prompt comes back before the answer (with its logprobs when asked for).
  bool echo = false;
  // Completions: each prompt's token ids (set once tokenized; echo's logprobs name them).
  std::vector<std::vector<int32_t>> prompt_token_ids;
  std::string user;
  // Chat with --reasoning-parser deepseek-r1: the thinking goes to reasoning_content.
  bool split_reasoning = false;
  // Chat: `tools` has at least one tool; tool_choice "auto", "required", "function" (a named one:
  // tool_choice_name) or "none" ("none" without tools).
  bool has_tools = false;
  std::string tool_choice = "none";
  std::string tool_choice_name;
  bool parallel_tool_calls = true;  // false: only the first call is returned
  // Chat with tools and --tool-call-parser deepseek_v3: DeepSeek's tool-call markup in the answer
  // becomes message.tool_calls (EnableToolCalls).
  bool parse_tool_calls = false;
  // tool_choice "required" or named: the answer's opening, appended to the rendered prompt (the
  // model goes on from inside a call), and read by the parser before the answer.
  std::string tool_prefill;
};

// Parses a request body. INVALID_ARGUMENT "field: what" for malformed JSON, a wrong type, a value
// out of range or a feature not served (echo, best_of, suffix, images).
absl::StatusOr<Request> ParseRequest(Endpoint endpoint, std::string_view body);

// Sets parse_tool_calls (and tool_prefill for tool_choice "required" or a named function) for a
// chat request with tools and a tool_choice other than "none" when `parser` ("deepseek_v3", from
// --tool-call-parser) is set; without a parser such a request is INVALID_ARGUMENT naming `tools`
// (an agent would take the model's markup for its final answer).
absl::Status EnableToolCalls(const std::string& parser, Request* r);

// The model's sampling defaults (generation_config.json) for the fields the request omitted.
void ApplySamplingDefaults(const ModelConfig::SamplingDefaults& d, Request* r);

// Writes the responses of one request: `n_choices` choices, each fed its stream in order.
class ResponseWriter {
 public:
  ResponseWriter(const Request& request, std::string id, int64_t created, std::string model,
                 const Tokenizer* tokenizer, int n_choices);
  // Streaming: the SSE event ("data: {...}\n\n", possibly empty) for one response of choice
  // `index`; the last one (finish_reason set) also ends the choice.
  std::string Chunk(int index, const v1::GenerateResponse& r);
  // Streaming: the usage event (when asked for) and "data: [DONE]".
  std::string End();
  // Not streaming: the whole response, once every choice has ended.
  std::string Body() const;
  // Usage so far (summed over choices; the prompt counted once per prompt).
  void AddUsage(int index, const v1::Usage& u);

 private:
  struct Choice {
    std::string text;
    std::string reasoning;          // split_reasoning: the thinking (not streaming)
    ReasoningSplitter splitter;     // split_reasoning
    ToolCallParser tool_parser;     // parse_tool_calls
    bool prefill_read = false;      // tool_prefill given to tool_parser
    bool prefill_stripped = false;  // content came: a broken call's prefill taken off it
    nlohmann::json tool_calls = nlohmann::json::array();  // not streaming: the calls so far
    std::string finish_reason;
    nlohmann::json logprobs;  // null, or the endpoint's logprobs object
    bool role_sent = false;
    bool echoed = false;      // echo: the prompt went out
    int64_t text_offset = 0;  // completions' text_offset
  };
  nlohmann::json LogprobsOf(Choice* c, const v1::GenerateResponse& r) const;
  // echo: the prompt's text and (logprobs) its tokens' entries, the first null, once per choice.
  std::string Echo(int index, Choice* c, const v1::GenerateResponse& r, nlohmann::json* lp) const;
  void AppendLogprobs(Choice* c, const nlohmann::json& lp) const;
  // One response's text, split as the request asks.
  struct Parts {
    std::string content, reasoning;
    std::vector<ToolCallParser::CallDelta> calls;
  };
  Parts Split(Choice* c, const v1::GenerateResponse& r, bool last);
  nlohmann::json ToolCallsJson(int index, const std::vector<ToolCallParser::CallDelta>& calls);
  std::string CallId(int index, int call) const;
  // The answer's calls are whole: finish_reason "tool_calls" rather than "stop".
  bool CallsWhole(const Choice& c) const;
  nlohmann::json ChunkJson(int index, const Parts& parts, const nlohmann::json& lp,
                           const std::string& finish);
  nlohmann::json UsageJson() const;
  std::string TokenText(int32_t id, const std::string& bytes) const;

  const Request& request_;
  const std::string id_;
  const int64_t created_;
  const std::string model_;
  const Tokenizer* tokenizer_;
  std::vector<Choice> choices_;
  int64_t prompt_tokens_ = 0, completion_tokens_ = 0, cached_tokens_ = 0;
};

// JSON as the API sends it: bytes that are not UTF-8 replaced by U+FFFD.
std::string Dump(const nlohmann::json& j);

}  // namespace dmoe::gateway::openai

#endif  // DMOE_GATEWAY_OPENAI_H_
