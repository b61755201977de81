// `dmoe bench`'s OpenAI-compatible HTTP client: Boost.Beast over one keep-alive connection.
// GCC's ThreadSanitizer build (--config=tsan) warns that Asio's atomic_thread_fence is not
// supported (-Wtsan, an error under -Werror); each io_context here is used by one thread only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__SANITIZE_THREAD__)
#pragma GCC diagnostic ignored "-Wtsan"
#endif

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <limits>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cli/openai_bench_internal.h"

namespace dmoe::cli::bench {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using Request = http::request<http::string_body>;

double Seconds(SteadyClock::duration d) { return std::chrono::duration<double>(d).count(); }

// One HTTP/1.1 connection used synchronously. Every operation is started asynchronously on a
// private io_context that is then run until it completes, so that tcp_stream's deadline applies
// (Beast's synchronous calls have no timeouts). Not thread-safe.
class HttpConnection {
 public:
  explicit HttpConnection(HttpTarget target) : target_(std::move(target)), stream_(ioc_) {}

  bool is_open() const { return stream_.socket().is_open(); }

  beast::error_code Connect(SteadyClock::time_point deadline) {
    Close();
    beast::error_code ec;
    tcp::resolver resolver(ioc_);
    auto endpoints = resolver.resolve(target_.host, target_.port, ec);
    if (ec) return ec;
    stream_.expires_at(deadline);
    Run([&](auto done) { stream_.async_connect(endpoints, done); }, &ec);
    if (!ec) stream_.socket().set_option(tcp::no_delay(true), ec);
    return ec;
  }

  beast::error_code Write(const Request& req, SteadyClock::time_point deadline) {
    beast::error_code ec;
    stream_.expires_at(deadline);
    Run([&](auto done) { http::async_write(stream_, req, done); }, &ec);
    return ec;
  }

  template <typename Parser>
  beast::error_code ReadHeader(Parser* p, SteadyClock::time_point deadline) {
    beast::error_code ec;
    stream_.expires_at(deadline);
    Run([&](auto done) { http::async_read_header(stream_, buffer_, *p, done); }, &ec);
    return ec;
  }

  // Reads whatever body bytes have arrived (at least some parser progress) into `p`'s buffer.
  template <typename Parser>
  beast::error_code ReadSome(Parser* p, SteadyClock::time_point deadline) {
    beast::error_code ec;
    stream_.expires_at(deadline);
    Run([&](auto done) { http::async_read_some(stream_, buffer_, *p, done); }, &ec);
    return ec;
  }

  void Close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
    buffer_.clear();
  }

  const HttpTarget& target() const { return target_; }

 private:
  template <typename Start>
  void Run(Start start, beast::error_code* ec) {
    *ec = net::error::would_block;
    start([ec](beast::error_code e, auto&&...) { *ec = e; });
    ioc_.restart();
    ioc_.run();
  }

  HttpTarget target_;
  net::io_context ioc_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;  // bytes read past the current message stay here for the next
};

std::string ReadErrorKind(const beast::error_code& ec) {
  if (ec == beast::error::timeout) return "timeout";
  if (ec == http::error::end_of_stream || ec == http::error::partial_message ||
      ec == net::error::eof || ec == net::error::connection_reset) {
    return "disconnected";
  }
  return "read";
}

// A connection closed by the server while idle shows up as one of these on first use.
bool StaleConnection(const beast::error_code& ec) {
  return ec == http::error::end_of_stream || ec == net::error::eof ||
         ec == net::error::connection_reset || ec == net::error::broken_pipe;
}

RequestResult Failed(std::string kind, std::string detail) {
  RequestResult r;
  r.error = std::move(kind);
  r.detail = std::move(detail);
  return r;
}

using Parser = http::response_parser<http::buffer_body>;

// Sends `req` and reads the response header into a new `*p`. Sets *t0 just before the connection is
// opened (when needed) or the request is written. A reused connection that turns out closed is
// reopened once. Returns "" or the error kind (with *detail).
std::string SendAndReadHeader(HttpConnection* c, const Request& req, SteadyClock::time_point dl,
                              std::optional<Parser>* p, SteadyClock::time_point* t0,
                              std::string* detail) {
  for (int attempt = 0;; ++attempt) {
    p->emplace();
    (*p)->body_limit(std::numeric_limits<std::uint64_t>::max());
    const bool reused = c->is_open();
    *t0 = SteadyClock::now();
    beast::error_code ec;
    if (!reused && (ec = c->Connect(dl))) {
      *detail = absl::StrCat("connecting to ", c->target().host, ":", c->target().port, ": ",
                             ec.message());
      c->Close();
      return ec == beast::error::timeout ? "timeout" : "connect";
    }
    ec = c->Write(req, dl);
    if (!ec) ec = c->ReadHeader(&**p, dl);
    if (!ec) return "";
    c->Close();
    if (reused && attempt == 0 && StaleConnection(ec)) continue;
    *detail = absl::StrCat("before the response header: ", ec.message());
    return ReadErrorKind(ec);
  }
}

// Reads the rest of the body of `p`, passing each piece to `on_body`.
template <typename OnBody>
beast::error_code ReadBody(HttpConnection* c, Parser* p, SteadyClock::time_point dl,
                           OnBody on_body) {
  char buf[16384];
  while (!p->is_done()) {
    p->get().body().data = buf;
    p->get().body().size = sizeof(buf);
    beast::error_code ec = c->ReadSome(p, dl);
    if (ec == http::error::need_buffer) ec = {};
    const size_t n = sizeof(buf) - p->get().body().size;
    if (n > 0) on_body(std::string_view(buf, n));
    if (ec) return ec;
  }
  return {};
}

Request MakeRequest(const HttpTarget& t, http::verb verb, const std::string& path,
                    const std::string& api_key) {
  Request req(verb, t.base_path + path, 11);
  req.set(http::field::host, t.port == "80" ? t.host : t.host + ":" + t.port);
  req.set(http::field::user_agent, "dmoe-bench");
  if (!api_key.empty()) req.set(http::field::authorization, "Bearer " + api_key);
  req.keep_alive(true);
  return req;
}

// Accumulates the output events of one stream into a RequestResult.
class StreamAccounting {
 public:
  explicit StreamAccounting(SteadyClock::time_point t0) : t0_(t0), last_(t0) {}

  // Returns false once the stream is broken (the result then says why).
  bool OnEvent(const std::string& data, SteadyClock::time_point now) {
    if (done_ || !r_.error.empty()) return r_.error.empty();
    auto chunk = ParseStreamChunk(data);
    if (!chunk.ok()) {
      r_.error = absl::IsInvalidArgument(chunk.status()) ? "bad_sse" : "stream_error";
      r_.detail = std::string(chunk.status().message());
      return false;
    }
    if (chunk->done) {
      done_ = true;
      r_.e2e_s = Seconds(now - t0_);
      return true;
    }
    if (chunk->has_choice) {
      if (r_.events == 0) {
        r_.ttft_s = Seconds(now - t0_);
      } else {
        r_.itl.push_back(Seconds(now - last_));
      }
      last_ = now;
      ++r_.events;
    }
    if (chunk->has_usage) {
      r_.has_usage = true;
      r_.prompt_tokens = chunk->prompt_tokens;
      r_.completion_tokens = chunk->completion_tokens;
    }
    return true;
  }

  bool done() const { return done_; }
  bool broken() const { return !r_.error.empty(); }

  RequestResult Take() {
    if (r_.error.empty() && !done_) {
      r_.error = "no_done";
      r_.detail = "the stream ended without \"data: [DONE]\"";
    }
    r_.ok = r_.error.empty();
    return std::move(r_);
  }

  void SetError(std::string kind, std::string detail) {
    r_.error = std::move(kind);
    r_.detail = std::move(detail);
  }

 private:
  SteadyClock::time_point t0_, last_;
  bool done_ = false;
  RequestResult r_;
};

class OpenAiClient : public BenchClient {
 public:
  explicit OpenAiClient(OpenAiOptions o) : options_(std::move(o)), conn_(options_.target) {}

  RequestResult Send(const BenchRequest& request) override {
    const auto deadline =
        SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(
                                 std::chrono::duration<double>(options_.timeout_s));
    Request req =
        MakeRequest(options_.target, http::verb::post,
                    options_.chat ? "/v1/chat/completions" : "/v1/completions", options_.api_key);
    req.set(http::field::content_type, "application/json");
    req.set(http::field::accept, "text/event-stream");
    req.body() = OpenAiRequestBody(options_, request).dump();
    req.prepare_payload();
    std::optional<Parser> p;
    SteadyClock::time_point t0;
    std::string detail;
    const std::string kind = SendAndReadHeader(&conn_, req, deadline, &p, &t0, &detail);
    if (!kind.empty()) return Failed(kind, detail);
    const unsigned status = p->get().result_int();
    if (status != 200) return ReadErrorBody(&*p, status, deadline);
    return ReadStream(&*p, t0, deadline);
  }

 private:
  RequestResult ReadErrorBody(Parser* p, unsigned status, SteadyClock::time_point deadline) {
    std::string body;
    const beast::error_code ec = ReadBody(&conn_, p, deadline, [&](std::string_view s) {
      if (body.size() < 500) body.append(s.substr(0, 500 - body.size()));
    });
    if (ec || !p->keep_alive()) conn_.Close();
    return Failed(absl::StrCat("http_", status), absl::StrCat("HTTP ", status, ": ", body));
  }

  RequestResult ReadStream(Parser* p, SteadyClock::time_point t0,
                           SteadyClock::time_point deadline) {
    StreamAccounting acc(t0);
    SseParser sse;
    std::vector<std::string> events;
    const beast::error_code ec = ReadBody(&conn_, p, deadline, [&](std::string_view s) {
      const auto now = SteadyClock::now();
      events.clear();
      sse.Feed(s, &events);
      for (const std::string& e : events) acc.OnEvent(e, now);
    });
    if (!ec) {
      events.clear();
      sse.Finish(&events);
      for (const std::string& e : events) acc.OnEvent(e, SteadyClock::now());
    }
    if (ec || !p->keep_alive() || acc.broken()) conn_.Close();
    // After [DONE] a broken connection costs only the connection, not the request.
    if (ec && !acc.done() && !acc.broken()) {
      acc.SetError(ReadErrorKind(ec), absl::StrCat("during the stream: ", ec.message()));
    }
    return acc.Take();
  }

  OpenAiOptions options_;
  HttpConnection conn_;
};

}  // namespace

nlohmann::json OpenAiRequestBody(const OpenAiOptions& o, const BenchRequest& r) {
  nlohmann::json body = {
      {"model", o.model}, {"max_tokens", r.output_len},
      {"temperature", 0}, {"ignore_eos", true},
      {"stream", true},   {"stream_options", {{"include_usage", true}}},
  };
  if (o.chat) {
    body["messages"] = nlohmann::json::array({{{"role", "user"}, {"content", r.prompt}}});
  } else {
    body["prompt"] = r.prompt;
  }
  return body;
}

std::unique_ptr<BenchClient> NewOpenAiClient(const OpenAiOptions& o) {
  return std::make_unique<OpenAiClient>(o);
}

absl::StatusOr<std::vector<ModelInfo>> ListOpenAiModels(const OpenAiOptions& o) {
  HttpConnection conn(o.target);
  const auto deadline = SteadyClock::now() + std::chrono::seconds(30);
  Request req = MakeRequest(o.target, http::verb::get, "/v1/models", o.api_key);
  std::optional<Parser> p;
  SteadyClock::time_point t0;
  std::string detail;
  const std::string kind = SendAndReadHeader(&conn, req, deadline, &p, &t0, &detail);
  if (!kind.empty()) return absl::UnavailableError(absl::StrCat("GET /v1/models: ", detail));
  std::string body;
  const beast::error_code ec =
      ReadBody(&conn, &*p, deadline, [&](std::string_view s) { body.append(s); });
  if (ec) return absl::UnavailableError(absl::StrCat("GET /v1/models: ", ec.message()));
  if (p->get().result_int() != 200) {
    return absl::UnavailableError(
        absl::StrCat("GET /v1/models: HTTP ", p->get().result_int(), ": ", body.substr(0, 300)));
  }
  const nlohmann::json j = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("data") || !j["data"].is_array()) {
    return absl::UnavailableError("GET /v1/models: the answer has no \"data\" array");
  }
  std::vector<ModelInfo> models;
  for (const auto& m : j["data"]) {
    if (!m.is_object() || !m.contains("id") || !m["id"].is_string()) continue;
    ModelInfo info;
    info.id = m["id"].get<std::string>();
    if (m.contains("vocab_size") && m["vocab_size"].is_number_integer()) {
      info.vocab_size = m["vocab_size"].get<int64_t>();
    }
    models.push_back(std::move(info));
  }
  return models;
}

}  // namespace dmoe::cli::bench
