#include "cli/openai_bench.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cli/openai_bench_internal.h"
#include "common/flags.h"
#include "common/status_macros.h"

namespace dmoe::cli {
namespace {

using bench::BenchClient;
using bench::BenchRequest;

constexpr char kBenchHelp[] =
    R"(usage: dmoe bench --url http://HOST:PORT [flags]
       dmoe bench --backend grpc --target HOST:PORT [flags]

A load generator in the style of vLLM's benchmark_serving.py: sends --num-prompts streamed
requests (greedy, ignore_eos, max_tokens = the output length) and reports throughput and the
mean, median, p90 and p99 of TTFT (time to the first output chunk), TPOT (time per output token
after the first), ITL (gaps between output chunks) and end-to-end latency. Percentiles interpolate
linearly between the nearest samples, as numpy.percentile does. Token counts come from the
stream's final usage. Failed requests (HTTP status other than 200, a broken or malformed stream,
no "data: [DONE]", a gRPC error) are counted by kind. Exit code 0 when at least one request
succeeded, 1 when none did, 2 for a bad flag.

  --backend B          openai (default): HTTP POST to an OpenAI-compatible server; grpc: the
                       same requests through dmoe.v1.Dmoe/Generate (Chat with --endpoint chat)
  --url URL            (openai) http://HOST:PORT of the server; a trailing /v1 is accepted.
                       https is not supported yet
  --target HOST:PORT   (grpc) the dmoe-gateway
  --endpoint E         completions (default: /v1/completions, prompt as token ids) or chat
                       (/v1/chat/completions, prompt as text)
  --model NAME         the model to ask for (default: the first one the server lists)
  --api-key KEY        sent as "Bearer KEY" (default $OPENAI_API_KEY, else $DMOE_API_KEY)

Prompts (random unless --dataset):
  --num-prompts N      requests to measure (default 100; with --dataset: every line)
  --input-len N        prompt length in tokens (default 256)
  --output-len N       tokens to generate per request (default 128)
  --range-ratio R      lengths uniform in [N*(1-R), N*(1+R)], R in [0, 1) (default 0: fixed)
  --vocab-size V       prompt ids uniform in [0, V) (default: the vocab_size the server lists
                       for the model, else 1000). With --endpoint chat a prompt is instead the
                       word "hello" repeated N times: its length in tokens is approximate
  --dataset FILE       JSON lines {"prompt": "text" or [ids], "output_len": N (optional, default
                       --output-len)}; with --num-prompts the first N (repeated if fewer)
  --seed S             seed of prompts, lengths and arrival times (default 0)

Load:
  --max-concurrency C  at most C requests in flight (default 1; with --request-rate: up to
                       the number of prompts, at most 512)
  --request-rate R     requests per second, as a Poisson process (exponential gaps); inf
                       (default) sends each as soon as a slot in --max-concurrency is free
  --warmup N           requests sent first and not counted (default 2); the run stops if
                       all of them fail
  --request-timeout S  deadline of each request in seconds (default 600)

Output:
  --json FILE          also write the results and the configuration as a JSON object
  --quiet              no progress bar on stderr
)";

struct BenchConfig {
  std::string backend = "openai";
  std::string url, target, endpoint = "completions", model, api_key, dataset, json_path;
  int64_t num_prompts = 100, input_len = 256, output_len = 128, vocab_size = 0;
  int64_t seed = 0, max_concurrency = 1, warmup = 2;
  double range_ratio = 0, request_rate = std::numeric_limits<double>::infinity();
  double timeout_s = 600;
  bool num_prompts_set = false, quiet = false;
  bench::HttpTarget http;
};

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return 2;
}

absl::Status Positive(const char* flag, int64_t v, int64_t max) {
  if (v < 1 || v > max) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": must be in [1, ", max, "]"));
  }
  return absl::OkStatus();
}

absl::Status ParseTarget(const Flags& f, BenchConfig* c) {
  c->backend = f.StringOr("backend", "openai");
  c->endpoint = f.StringOr("endpoint", "completions");
  if (c->backend != "openai" && c->backend != "grpc") {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend: \"", c->backend, "\" is not openai or grpc"));
  }
  if (c->endpoint != "completions" && c->endpoint != "chat") {
    return absl::InvalidArgumentError(
        absl::StrCat("--endpoint: \"", c->endpoint, "\" is not completions or chat"));
  }
  if (c->backend == "openai") {
    if (f.Has("target")) return absl::InvalidArgumentError("--target: only with --backend grpc");
    ASSIGN_OR_RETURN(c->url, f.String("url"));
    ASSIGN_OR_RETURN(c->http, bench::ParseUrl(c->url));
  } else {
    if (f.Has("url")) return absl::InvalidArgumentError("--url: only with --backend openai");
    ASSIGN_OR_RETURN(c->target, f.String("target"));
  }
  c->model = f.StringOr("model", "");
  c->api_key = f.StringOr("api-key", "");
  for (const char* env : {"OPENAI_API_KEY", "DMOE_API_KEY"}) {
    if (!f.Has("api-key") && c->api_key.empty() && std::getenv(env)) c->api_key = std::getenv(env);
  }
  return absl::OkStatus();
}

absl::Status ParsePrompts(const Flags& f, BenchConfig* c) {
  c->num_prompts_set = f.Has("num-prompts");
  ASSIGN_OR_RETURN(c->num_prompts, f.Int("num-prompts", 100));
  ASSIGN_OR_RETURN(c->input_len, f.Int("input-len", 256));
  ASSIGN_OR_RETURN(c->output_len, f.Int("output-len", 128));
  ASSIGN_OR_RETURN(c->vocab_size, f.Int("vocab-size", 0));
  ASSIGN_OR_RETURN(c->range_ratio, f.Double("range-ratio", 0));
  ASSIGN_OR_RETURN(c->seed, f.Int("seed", 0));
  RETURN_IF_ERROR(Positive("num-prompts", c->num_prompts, 10'000'000));
  RETURN_IF_ERROR(Positive("input-len", c->input_len, 10'000'000));
  RETURN_IF_ERROR(Positive("output-len", c->output_len, 10'000'000));
  if (f.Has("vocab-size")) RETURN_IF_ERROR(Positive("vocab-size", c->vocab_size, 1 << 30));
  if (c->range_ratio < 0 || c->range_ratio >= 1) {
    return absl::InvalidArgumentError("--range-ratio: must be in [0, 1)");
  }
  c->dataset = f.StringOr("dataset", "");
  if (f.Has("dataset") && c->dataset.empty()) {
    return absl::InvalidArgumentError("--dataset: empty file name");
  }
  return absl::OkStatus();
}

absl::Status ParseLoad(const Flags& f, BenchConfig* c) {
  const std::string rate = f.StringOr("request-rate", "inf");
  if (rate != "inf") {
    ASSIGN_OR_RETURN(c->request_rate, f.Double("request-rate", 0));
    if (c->request_rate <= 0) {
      return absl::InvalidArgumentError("--request-rate: must be positive (or inf)");
    }
  }
  const int64_t dflt = std::isinf(c->request_rate) ? 1 : std::min<int64_t>(c->num_prompts, 512);
  ASSIGN_OR_RETURN(c->max_concurrency, f.Int("max-concurrency", dflt));
  RETURN_IF_ERROR(Positive("max-concurrency", c->max_concurrency, 4096));
  ASSIGN_OR_RETURN(c->warmup, f.Int("warmup", 2));
  if (c->warmup < 0) return absl::InvalidArgumentError("--warmup: must be >= 0");
  ASSIGN_OR_RETURN(c->timeout_s, f.Double("request-timeout", 600));
  if (c->timeout_s <= 0) return absl::InvalidArgumentError("--request-timeout: must be positive");
  c->json_path = f.StringOr("json", "");
  if (f.Has("json") && c->json_path.empty()) {
    return absl::InvalidArgumentError("--json: empty file name");
  }
  c->quiet = f.Bool("quiet");
  return absl::OkStatus();
}

absl::StatusOr<BenchConfig> ParseConfig(const Flags& f) {
  if (!f.positional().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected argument \"", f.positional()[0], "\""));
  }
  BenchConfig c;
  RETURN_IF_ERROR(ParseTarget(f, &c));
  RETURN_IF_ERROR(ParsePrompts(f, &c));
  RETURN_IF_ERROR(ParseLoad(f, &c));
  return c;
}

bench::OpenAiOptions OpenAiOptionsOf(const BenchConfig& c) {
  bench::OpenAiOptions o;
  o.target = c.http;
  o.chat = c.endpoint == "chat";
  o.model = c.model;
  o.api_key = c.api_key;
  o.timeout_s = c.timeout_s;
  return o;
}

bench::GrpcOptions GrpcOptionsOf(const BenchConfig& c) {
  bench::GrpcOptions o;
  o.target = c.target;
  o.chat = c.endpoint == "chat";
  o.model = c.model;
  o.api_key = c.api_key;
  o.timeout_s = c.timeout_s;
  return o;
}

// Fills in --model (the server's first) and the vocabulary size of random prompts, asking the
// server only when one of them is missing. Errors are the server's, not the user's.
absl::Status ResolveModel(BenchConfig* c) {
  const bool need_vocab = c->dataset.empty() && c->endpoint == "completions" && c->vocab_size == 0;
  if (!c->model.empty() && !need_vocab) return absl::OkStatus();
  auto models = c->backend == "openai" ? bench::ListOpenAiModels(OpenAiOptionsOf(*c))
                                       : bench::ListGrpcModels(GrpcOptionsOf(*c));
  if (!models.ok() || models->empty()) {
    const absl::Status s =
        models.ok() ? absl::UnavailableError("the server lists no model") : models.status();
    if (c->model.empty()) return s;
    std::fprintf(stderr, "bench: %s; prompt ids drawn from [0, 1000)\n",
                 std::string(s.message()).c_str());
    c->vocab_size = 1000;
    return absl::OkStatus();
  }
  if (c->model.empty()) c->model = models->front().id;
  int64_t vocab = 0;
  for (const bench::ModelInfo& m : *models) {
    if (m.id == c->model) vocab = m.vocab_size;
  }
  if (c->vocab_size == 0) c->vocab_size = vocab > 0 ? vocab : 1000;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<BenchRequest>> BuildRequests(const BenchConfig& c) {
  if (c.dataset.empty()) {
    bench::RandomPromptOptions o;
    o.num = c.num_prompts;
    o.input_len = c.input_len;
    o.output_len = c.output_len;
    o.range_ratio = c.range_ratio;
    o.vocab_size = std::max<int64_t>(c.vocab_size, 1);
    o.seed = static_cast<uint64_t>(c.seed);
    o.text = c.endpoint == "chat";
    return bench::RandomRequests(o);
  }
  std::ifstream in(c.dataset);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--dataset: cannot open ", c.dataset));
  ASSIGN_OR_RETURN(std::vector<BenchRequest> all, bench::ParseDataset(in, c.output_len));
  if (c.endpoint == "chat") {
    for (const BenchRequest& r : all) {
      if (!r.prompt.is_string()) {
        return absl::InvalidArgumentError(
            "--dataset: --endpoint chat needs text prompts, the file has token ids");
      }
    }
  }
  if (!c.num_prompts_set) return all;
  std::vector<BenchRequest> out;
  for (int64_t i = 0; i < c.num_prompts; ++i) out.push_back(all[i % all.size()]);
  return out;
}

nlohmann::json ConfigJson(const BenchConfig& c, size_t num_requests) {
  nlohmann::json j = {
      {"backend", c.backend},
      {"endpoint", c.endpoint},
      {"model", c.model},
      {"num_prompts", num_requests},
      {"output_len", c.output_len},
      {"seed", c.seed},
      {"max_concurrency", c.max_concurrency},
      {"request_rate",
       std::isinf(c.request_rate) ? nlohmann::json("inf") : nlohmann::json(c.request_rate)},
      {"warmup", c.warmup},
      {"request_timeout_s", c.timeout_s},
  };
  j[c.backend == "openai" ? "url" : "target"] = c.backend == "openai" ? c.url : c.target;
  if (c.dataset.empty()) {
    j["dataset"] = "random";
    j["input_len"] = c.input_len;
    j["range_ratio"] = c.range_ratio;
    if (c.endpoint == "completions") j["vocab_size"] = c.vocab_size;
  } else {
    j["dataset"] = c.dataset;
  }
  return j;
}

// A progress bar redrawn in place on a terminal; on a pipe or file, a line every 10 s.
bench::ProgressFn ProgressPrinter() {
  const bool tty = isatty(STDERR_FILENO) != 0;
  auto last_line = std::make_shared<double>(0);
  return [tty, last_line](size_t done, size_t total, double elapsed) {
    const bool end = done == total;
    if (!tty && !end && elapsed - *last_line < 10) return;
    *last_line = elapsed;
    const size_t width = 30, filled = total == 0 ? width : width * done / total;
    std::fprintf(stderr, "%s[%s%s] %zu/%zu requests, %.1f s%s", tty ? "\r" : "",
                 std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(), done,
                 total, elapsed, tty && !end ? "" : "\n");
    std::fflush(stderr);
  };
}

std::vector<std::unique_ptr<BenchClient>> MakeClients(const BenchConfig& c, size_t n) {
  std::vector<std::unique_ptr<BenchClient>> clients;
  for (size_t i = 0; i < n; ++i) {
    clients.push_back(c.backend == "openai" ? bench::NewOpenAiClient(OpenAiOptionsOf(c))
                                            : bench::NewGrpcClient(GrpcOptionsOf(c)));
  }
  return clients;
}

std::vector<BenchClient*> Pointers(const std::vector<std::unique_ptr<BenchClient>>& clients,
                                   size_t n) {
  std::vector<BenchClient*> out;
  for (size_t i = 0; i < n && i < clients.size(); ++i) out.push_back(clients[i].get());
  return out;
}

// Sends the warm-up requests (the first prompts, repeated if fewer) on the first clients.
// An error when every one of them failed.
absl::Status Warmup(const BenchConfig& c, const std::vector<BenchRequest>& requests,
                    const std::vector<std::unique_ptr<BenchClient>>& clients) {
  if (c.warmup == 0) return absl::OkStatus();
  std::vector<BenchRequest> warm;
  for (int64_t i = 0; i < c.warmup; ++i) warm.push_back(requests[i % requests.size()]);
  const bench::LoadResult r = bench::RunLoad(warm, std::vector<double>(warm.size(), 0.0),
                                             Pointers(clients, warm.size()), nullptr);
  for (const bench::RequestResult& x : r.results) {
    if (x.ok) return absl::OkStatus();
  }
  const bench::RequestResult& first = r.results.front();
  return absl::UnavailableError(absl::StrCat(
      "all ", c.warmup, " warm-up requests failed; the first: ", first.error, ": ", first.detail));
}

void PrintPlan(const BenchConfig& c, size_t n) {
  const std::string where =
      c.backend == "openai"
          ? absl::StrCat(c.url, " (/v1/", c.endpoint == "chat" ? "chat/" : "", "completions)")
          : absl::StrCat(c.target, " (gRPC ", c.endpoint == "chat" ? "Chat" : "Generate", ")");
  std::fprintf(stderr, "bench: %zu requests to %s, model \"%s\", max concurrency %lld, rate %s\n",
               n, where.c_str(), c.model.c_str(), static_cast<long long>(c.max_concurrency),
               std::isinf(c.request_rate) ? "inf" : absl::StrCat(c.request_rate, "/s").c_str());
}

int RunAndReport(const BenchConfig& c, const std::vector<BenchRequest>& requests) {
  const auto clients = MakeClients(c, static_cast<size_t>(c.max_concurrency));
  if (auto s = Warmup(c, requests, clients); !s.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  const std::vector<double> arrivals =
      bench::PoissonArrivals(requests.size(), c.request_rate, static_cast<uint64_t>(c.seed));
  const bench::LoadResult load =
      bench::RunLoad(requests, arrivals, Pointers(clients, clients.size()),
                     c.quiet ? bench::ProgressFn() : ProgressPrinter());
  const nlohmann::json report = bench::MakeReport(load, ConfigJson(c, requests.size()));
  std::fputs(bench::ReportTable(report).c_str(), stdout);
  std::fflush(stdout);
  for (const bench::RequestResult& r : load.results) {
    if (!r.ok) {
      std::fprintf(stderr, "bench: first failure: %s: %s\n", r.error.c_str(), r.detail.c_str());
      break;
    }
  }
  if (!c.json_path.empty()) {
    std::ofstream out(c.json_path);
    out << report.dump(2) << "\n";
    if (!out.good()) {
      std::fprintf(stderr, "error: --json: cannot write %s\n", c.json_path.c_str());
      return 1;
    }
  }
  return report["completed"].get<int64_t>() > 0 ? 0 : 1;
}

}  // namespace

int Bench(int argc, char** argv) {
  auto flags =
      Flags::Parse(argc, argv,
                   {"backend", "url", "target", "endpoint", "model", "api-key", "num-prompts",
                    "input-len", "output-len", "range-ratio", "vocab-size", "dataset", "seed",
                    "max-concurrency", "request-rate", "warmup", "request-timeout", "json"},
                   {"quiet"});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::fputs(kBenchHelp, stdout);
    return 0;
  }
  auto config = ParseConfig(*flags);
  if (!config.ok()) return Fail(config.status());
  // A bad dataset is reported before the server is asked anything; random prompts need the
  // server's vocabulary size first.
  absl::StatusOr<std::vector<BenchRequest>> requests;
  if (!config->dataset.empty() && !(requests = BuildRequests(*config)).ok()) {
    return Fail(requests.status());
  }
  if (auto s = ResolveModel(&*config); !s.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  if (config->dataset.empty()) requests = BuildRequests(*config);
  if (!requests.ok()) return Fail(requests.status());
  if (!config->quiet) PrintPlan(*config, requests->size());
  return RunAndReport(*config, *requests);
}

}  // namespace dmoe::cli
