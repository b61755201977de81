// The parts of `dmoe bench` (cli/openai_bench.h) that tests drive directly: statistics, the SSE
// parser, URL and dataset parsing, arrival schedules, the request clients and the load runner.
//
// Error policy: a user's bad input (flag, URL, dataset line) is an INVALID_ARGUMENT status whose
// message names the flag or line; a failed request is not an error of the benchmark but a
// RequestResult with `ok == false` and an error kind that the report counts.
#ifndef DMOE_CLI_OPENAI_BENCH_INTERNAL_H_
#define DMOE_CLI_OPENAI_BENCH_INTERNAL_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <istream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace dmoe::cli::bench {

using SteadyClock = std::chrono::steady_clock;

// ---- Statistics -------------------------------------------------------------------------------

// The q-th percentile (q in [0, 100]) of ascending `sorted` with numpy.percentile's default
// ("linear") interpolation, as vLLM's benchmark uses: rank r = q/100 * (n - 1), result
// sorted[floor(r)] + (r - floor(r)) * (sorted[floor(r) + 1] - sorted[floor(r)]).
// E.g. of 1..100: p50 = 50.5, p90 = 90.1, p99 = 99.01. 0 when empty.
double Percentile(const std::vector<double>& sorted, double q);

struct Stats {
  size_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0;  // all 0 when count == 0
};
Stats Summarize(std::vector<double> values);

// ---- Server-sent events -----------------------------------------------------------------------

// Splits a text/event-stream body into events. Bytes may arrive in any pieces (an event or a line
// split across reads). Lines end with "\n" or "\r\n"; an empty line ends an event, whose data is
// its `data:` lines (one leading space dropped) joined by "\n". Comment lines (":...") and other
// fields (event:, id:, retry:) are ignored; events without a data line are not reported.
// Not thread-safe; one per response.
class SseParser {
 public:
  // Appends the data of each event that `bytes` completes to `events`.
  void Feed(std::string_view bytes, std::vector<std::string>* events);
  // At the end of the body: reports a last event whose blank line never came (a server that ends
  // with "data: [DONE]\n"); a partial line without its "\n" is dropped.
  void Finish(std::vector<std::string>* events);

 private:
  void Line(std::string_view line, std::vector<std::string>* events);

  std::string line_;  // the current line, without its end
  std::string data_;  // the current event's data
  bool has_data_ = false;
};

// What one SSE data payload of a streamed /v1/completions or /v1/chat/completions says.
struct StreamChunk {
  bool done = false;  // "[DONE]"
  // `choices[0]` exists: one output event (even with an empty text or content delta), except a
  // chat delta that carries only the assistant's role.
  bool has_choice = false;
  bool has_usage = false;  // a `usage` object: the token counts below are set
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};
// INVALID_ARGUMENT for a payload that is not a JSON object; FAILED_PRECONDITION carrying the
// server's message for an `{"error": ...}` object sent in the stream.
absl::StatusOr<StreamChunk> ParseStreamChunk(std::string_view data);

// ---- Targets, prompts, schedules --------------------------------------------------------------

struct HttpTarget {
  std::string host;       // a name, IPv4, or IPv6 without brackets
  std::string port;       // "80" when the URL has none
  std::string base_path;  // "" or "/prefix" (no trailing "/"; a trailing "/v1" is stripped)
};
// "http://HOST[:PORT][/PREFIX][/v1][/]". https:// is rejected (not supported yet).
absl::StatusOr<HttpTarget> ParseUrl(std::string_view url);

struct BenchRequest {
  nlohmann::json prompt;   // a string, or an array of token ids
  int64_t prompt_len = 0;  // prompt tokens when known here (ids; chat: approximate), else 0
  int64_t output_len = 0;  // max_tokens
};

// One line of a --dataset file: {"prompt": "text" | [ids...], "output_len": N (optional)}.
// `line_no` (1-based) names the line in errors.
absl::StatusOr<BenchRequest> ParseDatasetLine(std::string_view line, int64_t line_no,
                                              int64_t default_output_len);
// Every non-blank line of `in`; an error names the first bad line. Empty input is an error.
absl::StatusOr<std::vector<BenchRequest>> ParseDataset(std::istream& in,
                                                       int64_t default_output_len);

struct RandomPromptOptions {
  int64_t num = 0;
  int64_t input_len = 0;
  int64_t output_len = 0;
  double range_ratio = 0;  // [0, 1): lengths uniform in [len*(1-r), len*(1+r)], at least 1
  int64_t vocab_size = 0;  // ids uniform in [0, vocab_size)
  uint64_t seed = 0;
  // Chat needs text: "hello" repeated input_len times, separated by spaces (about one token per
  // word with common BPE vocabularies, so lengths are approximate).
  bool text = false;
};
// Same options, same requests.
std::vector<BenchRequest> RandomRequests(const RandomPromptOptions& o);

// Arrival offsets in seconds from the start of the run: the first at 0, then independent
// exponential gaps of mean 1/rate (a Poisson process), drawn from `seed` alone. All 0 when rate
// is +inf. REQUIRES: rate > 0.
std::vector<double> PoissonArrivals(size_t n, double rate, uint64_t seed);

// ---- Clients ----------------------------------------------------------------------------------

struct RequestResult {
  bool ok = false;
  std::string error;        // when !ok: "connect", "http_429", "grpc_UNAVAILABLE", "no_done", ...
  std::string detail;       // when !ok: a human-readable message
  double ttft_s = 0;        // send -> first output event
  std::vector<double> itl;  // seconds between successive output events
  double e2e_s = 0;         // send -> end of the stream ([DONE])
  int64_t events = 0;       // output events seen
  bool has_usage = false;
  int64_t prompt_tokens = 0;      // from usage
  int64_t completion_tokens = 0;  // from usage
  int64_t prompt_len = 0;         // the request's (RunLoad sets it), for a stream without usage
};

// Sends requests one at a time and waits for each whole stream. Not thread-safe: one per worker
// (an HTTP client keeps one keep-alive connection).
class BenchClient {
 public:
  virtual ~BenchClient() = default;
  virtual RequestResult Send(const BenchRequest& request) = 0;
};

struct OpenAiOptions {
  HttpTarget target;
  bool chat = false;  // /v1/chat/completions instead of /v1/completions
  std::string model;
  std::string api_key;     // "Authorization: Bearer KEY" when not empty
  double timeout_s = 600;  // whole request, connect included
};
// The JSON body of a streamed request (stream_options.include_usage, ignore_eos, temperature 0).
nlohmann::json OpenAiRequestBody(const OpenAiOptions& o, const BenchRequest& r);
// TTFT counts from just before the connection is opened (when a request needs one) or the
// request is written. A reused keep-alive connection that the server already closed is reopened
// once, silently.
std::unique_ptr<BenchClient> NewOpenAiClient(const OpenAiOptions& o);

struct ModelInfo {
  std::string id;
  int64_t vocab_size = 0;  // 0 when the server does not say
};
// GET /v1/models.
absl::StatusOr<std::vector<ModelInfo>> ListOpenAiModels(const OpenAiOptions& o);

struct GrpcOptions {
  std::string target;  // HOST:PORT
  bool chat = false;   // Dmoe/Chat with one user message instead of Dmoe/Generate
  std::string model;
  std::string api_key;  // metadata "authorization: Bearer KEY" when not empty
  double timeout_s = 600;
};
// dmoe.v1.Dmoe over an insecure channel; each GenerateResponse with token ids is an output event
// and the usage comes from the last message. Errors are "grpc_" + the status code's name.
std::unique_ptr<BenchClient> NewGrpcClient(const GrpcOptions& o);
absl::StatusOr<std::vector<ModelInfo>> ListGrpcModels(const GrpcOptions& o);

// ---- Load and report --------------------------------------------------------------------------

struct LoadResult {
  std::vector<RequestResult> results;  // in request order
  double duration_s = 0;               // first send to last completion
};
// Called a few times per second from a separate thread, and once more at the end.
using ProgressFn = std::function<void(size_t done, size_t total, double elapsed_s)>;

// Runs request i no earlier than `arrivals[i]` seconds after the start, on the first free client
// (requests start in order; at most clients.size() are in flight). REQUIRES: arrivals.size() ==
// requests.size(), clients not empty. `progress` may be empty.
LoadResult RunLoad(const std::vector<BenchRequest>& requests, const std::vector<double>& arrivals,
                   const std::vector<BenchClient*>& clients, const ProgressFn& progress);

// The report as JSON: completed, failed, duration_s, total_input_tokens, total_output_tokens,
// request_throughput, output_throughput, total_token_throughput, ttft_ms / tpot_ms / itl_ms /
// e2el_ms ({mean, p50, p90, p99}), errors ({kind: count}) and `config` as given. Output tokens
// are usage.completion_tokens (the number of output events when a stream had no usage); input
// tokens usage.prompt_tokens (else the request's prompt_len). TPOT = (e2e - ttft) / (tokens - 1)
// over requests with more than one token.
nlohmann::json MakeReport(const LoadResult& load, const nlohmann::json& config);
// The report as a table like vLLM's.
std::string ReportTable(const nlohmann::json& report);

}  // namespace dmoe::cli::bench

#endif  // DMOE_CLI_OPENAI_BENCH_INTERNAL_H_
