// The pure parts of `dmoe bench`: statistics, SSE, URLs, datasets, prompts and schedules.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "cli/openai_bench_internal.h"

namespace dmoe::cli::bench {
namespace {

// Debian's Abseil has its own string_view class, not std::string_view.
absl::string_view A(std::string_view s) { return absl::string_view(s.data(), s.size()); }

}  // namespace

double Percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const double rank = std::clamp(q, 0.0, 100.0) / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  const double frac = rank - static_cast<double>(lo);
  return sorted[lo] + frac * (sorted[hi] - sorted[lo]);
}

Stats Summarize(std::vector<double> values) {
  Stats s;
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  s.count = values.size();
  s.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(s.count);
  s.p50 = Percentile(values, 50);
  s.p90 = Percentile(values, 90);
  s.p99 = Percentile(values, 99);
  return s;
}

void SseParser::Feed(std::string_view bytes, std::vector<std::string>* events) {
  while (!bytes.empty()) {
    const size_t nl = bytes.find('\n');
    if (nl == std::string_view::npos) {
      line_.append(bytes);
      return;
    }
    line_.append(bytes.substr(0, nl));
    bytes.remove_prefix(nl + 1);
    if (!line_.empty() && line_.back() == '\r') line_.pop_back();
    Line(line_, events);
    line_.clear();
  }
}

void SseParser::Finish(std::vector<std::string>* events) {
  line_.clear();
  Line("", events);
}

void SseParser::Line(std::string_view line, std::vector<std::string>* events) {
  if (line.empty()) {  // end of an event
    if (has_data_) events->push_back(std::move(data_));
    data_.clear();
    has_data_ = false;
    return;
  }
  if (line[0] == ':') return;  // a comment
  const size_t colon = line.find(':');
  const std::string_view field = line.substr(0, colon);
  if (field != "data") return;
  std::string_view value =
      colon == std::string_view::npos ? std::string_view() : line.substr(colon + 1);
  if (!value.empty() && value[0] == ' ') value.remove_prefix(1);
  if (has_data_) data_.push_back('\n');
  data_.append(value);
  has_data_ = true;
}

namespace {

// Reads a non-negative integer field of a usage object (absent: 0).
int64_t UsageField(const nlohmann::json& usage, const char* name) {
  auto it = usage.find(name);
  if (it == usage.end() || !it->is_number_integer()) return 0;
  return it->get<int64_t>();
}

// A chat chunk that only announces the assistant's role (OpenAI sends one before the first
// token) is not a generated step.
bool RoleOnly(const nlohmann::json& choice) {
  if (!choice.is_object()) return false;
  auto d = choice.find("delta");
  if (d == choice.end() || !d->is_object() || !d->contains("role")) return false;
  for (const char* k : {"content", "reasoning_content", "tool_calls", "refusal"}) {
    if (d->contains(k) && !(*d)[k].is_null()) return false;
  }
  return !choice.contains("finish_reason") || choice["finish_reason"].is_null();
}

}  // namespace

absl::StatusOr<StreamChunk> ParseStreamChunk(std::string_view data) {
  StreamChunk c;
  if (absl::StripAsciiWhitespace(A(data)) == "[DONE]") {
    c.done = true;
    return c;
  }
  const nlohmann::json j = nlohmann::json::parse(data, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("stream data is not a JSON object: ", A(data.substr(0, 200))));
  }
  if (auto e = j.find("error"); e != j.end() && !e->is_null()) {
    std::string message = e->dump();
    if (e->is_object() && e->contains("message") && (*e)["message"].is_string()) {
      message = (*e)["message"].get<std::string>();
    }
    return absl::FailedPreconditionError(absl::StrCat("error in stream: ", message));
  }
  if (auto ch = j.find("choices"); ch != j.end() && ch->is_array() && !ch->empty()) {
    c.has_choice = !RoleOnly((*ch)[0]);
  }
  if (auto u = j.find("usage"); u != j.end() && u->is_object()) {
    c.has_usage = true;
    c.prompt_tokens = UsageField(*u, "prompt_tokens");
    c.completion_tokens = UsageField(*u, "completion_tokens");
  }
  return c;
}

namespace {

absl::Status UrlError(absl::string_view url, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("--url: \"", url, "\": ", why));
}

// Splits "HOST[:PORT]" or "[V6]:PORT" into host and port ("80" when absent).
absl::Status SplitHostPort(absl::string_view url, absl::string_view authority, HttpTarget* t) {
  absl::string_view host = authority, port;
  if (absl::StartsWith(authority, "[")) {
    const size_t close = authority.find(']');
    if (close == absl::string_view::npos) return UrlError(url, "unclosed [ in the host");
    host = authority.substr(1, close - 1);
    absl::string_view rest = authority.substr(close + 1);
    if (!rest.empty() && rest[0] != ':') return UrlError(url, "bad text after ]");
    if (!rest.empty()) port = rest.substr(1);
  } else if (const size_t colon = authority.rfind(':'); colon != absl::string_view::npos) {
    host = authority.substr(0, colon);
    port = authority.substr(colon + 1);
    if (port.empty()) return UrlError(url, "empty port");
  }
  if (host.empty()) return UrlError(url, "no host");
  int p = 80;
  if (!port.empty() && (!absl::SimpleAtoi(port, &p) || p < 1 || p > 65535)) {
    return UrlError(url, absl::StrCat("port \"", port, "\" is not in [1, 65535]"));
  }
  t->host = std::string(host);
  t->port = std::to_string(p);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<HttpTarget> ParseUrl(std::string_view url_in) {
  const absl::string_view url = A(url_in);
  if (absl::StartsWithIgnoreCase(url, "https://")) {
    return UrlError(url, "https is not supported yet (use http://, e.g. behind a local proxy)");
  }
  if (!absl::StartsWithIgnoreCase(url, "http://")) {
    return UrlError(url, "expected http://HOST:PORT");
  }
  absl::string_view rest = url.substr(7);
  const size_t slash = rest.find('/');
  const absl::string_view authority = rest.substr(0, slash);
  absl::string_view path = slash == absl::string_view::npos ? "" : rest.substr(slash);
  if (path.find_first_of("?#") != absl::string_view::npos) {
    return UrlError(url, "a query or fragment is not allowed");
  }
  HttpTarget t;
  if (auto s = SplitHostPort(url, authority, &t); !s.ok()) return s;
  while (absl::EndsWith(path, "/")) path.remove_suffix(1);
  if (absl::EndsWith(path, "/v1")) path.remove_suffix(3);
  while (absl::EndsWith(path, "/")) path.remove_suffix(1);
  t.base_path = std::string(path);
  return t;
}

namespace {

absl::Status LineError(int64_t line_no, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("--dataset line ", line_no, ": ", why));
}

}  // namespace

absl::StatusOr<BenchRequest> ParseDatasetLine(std::string_view line, int64_t line_no,
                                              int64_t default_output_len) {
  const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return LineError(line_no, "not a JSON object");
  BenchRequest r;
  r.output_len = default_output_len;
  auto p = j.find("prompt");
  if (p == j.end()) return LineError(line_no, "no \"prompt\"");
  if (p->is_string()) {
    if (p->get_ref<const std::string&>().empty()) return LineError(line_no, "empty \"prompt\"");
  } else if (p->is_array()) {
    if (p->empty()) return LineError(line_no, "empty \"prompt\"");
    for (const auto& id : *p) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
          id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
        return LineError(line_no, "\"prompt\" array holds something that is not a token id");
      }
    }
    r.prompt_len = static_cast<int64_t>(p->size());
  } else {
    return LineError(line_no, "\"prompt\" is neither a string nor an array of token ids");
  }
  r.prompt = *p;
  if (auto o = j.find("output_len"); o != j.end()) {
    if (!o->is_number_integer() || o->get<int64_t>() <= 0) {
      return LineError(line_no, "\"output_len\" is not a positive integer");
    }
    r.output_len = o->get<int64_t>();
  }
  return r;
}

absl::StatusOr<std::vector<BenchRequest>> ParseDataset(std::istream& in,
                                                       int64_t default_output_len) {
  std::vector<BenchRequest> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    auto r = ParseDatasetLine(line, n, default_output_len);
    if (!r.ok()) return r.status();
    out.push_back(*std::move(r));
  }
  if (out.empty()) return absl::InvalidArgumentError("--dataset: no prompts in the file");
  return out;
}

std::vector<BenchRequest> RandomRequests(const RandomPromptOptions& o) {
  std::mt19937_64 rng(o.seed);
  const auto bound = [&](int64_t len, double f) {
    return std::max<int64_t>(1, static_cast<int64_t>(std::llround(static_cast<double>(len) * f)));
  };
  std::uniform_int_distribution<int64_t> in_len(bound(o.input_len, 1 - o.range_ratio),
                                                bound(o.input_len, 1 + o.range_ratio));
  std::uniform_int_distribution<int64_t> out_len(bound(o.output_len, 1 - o.range_ratio),
                                                 bound(o.output_len, 1 + o.range_ratio));
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(o.vocab_size - 1));
  std::vector<BenchRequest> out(static_cast<size_t>(o.num));
  for (BenchRequest& r : out) {
    r.prompt_len = in_len(rng);
    r.output_len = out_len(rng);
    if (o.text) {
      std::string text;
      for (int64_t i = 0; i < r.prompt_len; ++i) text += i == 0 ? "hello" : " hello";
      r.prompt = text;
      continue;
    }
    std::vector<int32_t> ids(static_cast<size_t>(r.prompt_len));
    for (int32_t& t : ids) t = id(rng);
    r.prompt = ids;
  }
  return out;
}

std::vector<double> PoissonArrivals(size_t n, double rate, uint64_t seed) {
  std::vector<double> out(n, 0.0);
  if (std::isinf(rate)) return out;
  // Not the prompts' generator: changing --request-rate leaves the prompts as they were.
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ULL);
  std::exponential_distribution<double> gap(rate);
  for (size_t i = 1; i < n; ++i) out[i] = out[i - 1] + gap(rng);
  return out;
}

}  // namespace dmoe::cli::bench
