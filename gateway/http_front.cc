#include "gateway/http_front.h"

#include <sys/resource.h>

#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <deque>
#include <optional>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_setup.h"
#include "common/logging.h"
#include "common/mutex.h"
#include "common/service.h"
#include "gateway/openai.h"
#include "nlohmann/json.hpp"

namespace dmoe::gateway {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;
using json = nlohmann::json;

class SessionBase {
 public:
  virtual ~SessionBase() = default;
  virtual void Close() = 0;  // on the session's strand
  // A drain began (on the session's strand): an idle connection closes now; one with a request
  // in progress closes after its response.
  virtual void Drain() = 0;
  virtual net::any_io_executor executor() const = 0;
};

struct HttpFront::Impl {
  Impl(GatewayService* s, HttpFrontOptions o)
      : service(s), options(std::move(o)), acceptor(net::make_strand(ioc)) {
    std::random_device rd;
    next_id = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    seed_base = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }
  // A seed for a request that gave none: different for every request.
  uint64_t NewSeed() { return seed_base ^ (next_seed.fetch_add(1) * 0x9E3779B97F4A7C15ull); }
  void Accept();
  void OnAccept(tcp::socket socket);
  // Closes the listener and calls `then` on every session (on its strand).
  void CloseListener(void (SessionBase::*then)());
  void Register(const std::shared_ptr<SessionBase>& s) {
    MutexLock l(&mu);
    for (auto it = sessions.begin(); it != sessions.end();) {
      it = it->expired() ? sessions.erase(it) : std::next(it);
    }
    sessions.push_back(s);
  }
  std::string NewId(openai::Endpoint e) {
    return absl::StrFormat("%s-%016x", e == openai::Endpoint::kChat ? "chatcmpl" : "cmpl",
                           next_id.fetch_add(1));
  }

  GatewayService* service;
  HttpFrontOptions options;
  // Declared before ioc: the connections ioc may still hold when it is destroyed use them.
  std::unique_ptr<ssl::context> tls;
  std::atomic<size_t> connections{0};
  std::atomic<int64_t> generations{0};  // in flight, for Stop
  std::atomic<uint64_t> next_id{0};
  uint64_t seed_base = 0;  // set once at construction
  std::atomic<uint64_t> next_seed{0};
  std::atomic<bool> stopping{false};
  std::atomic<bool> draining{false};  // BeginDrain: no new connections, none kept alive
  uint64_t accept_failures = 0;       // on the acceptor's strand
  Mutex mu;
  std::vector<std::weak_ptr<SessionBase>> sessions ABSL_GUARDED_BY(mu);
  std::vector<std::thread> threads;
  net::io_context ioc;
  tcp::acceptor acceptor;  // on its own strand (several loop threads)
};

namespace {

std::string ChunkFrame(const std::string& data) {
  return absl::StrCat(absl::Hex(data.size()), "\r\n", data, "\r\n");
}

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// The route a request is counted under (a fixed set: no label per unknown path).
std::string RouteOf(std::string_view target) {
  for (const char* r : {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                        "/version", "/metrics"}) {
    if (target == r) return r;
  }
  if (target.substr(0, 11) == "/v1/models/") return "/v1/models";
  return "other";
}

}  // namespace

namespace {

// One connection: requests in order (keep-alive), one generation request at a time. Everything
// runs on the connection's strand; the generations' sinks post to it.
template <class Stream>
class Session : public SessionBase, public std::enable_shared_from_this<Session<Stream>> {
 public:
  Session(HttpFront::Impl* front, Stream stream)
      : front_(front), stream_(std::move(stream)), executor_(stream_.get_executor()) {
    ++front_->connections;
    if (front_->options.metrics.connections) front_->options.metrics.connections(+1);
  }
  ~Session() override {
    --front_->connections;
    if (front_->options.metrics.connections) front_->options.metrics.connections(-1);
  }
  net::any_io_executor executor() const override { return executor_; }
  void Start();
  void Close() override;
  void Drain() override;
  void Post(std::function<void(Session*)> f) {
    net::post(executor_, [self = this->shared_from_this(), f = std::move(f)] { f(self.get()); });
  }
  void OnChunk(int index, const v1::GenerateResponse& chunk);
  void OnDone(int index, const grpc::Status& status, const v1::GenerateResponse& last);

 private:
  beast::tcp_stream& lowest() { return beast::get_lowest_layer(stream_); }
  void ReadRequest();
  // After the header: a client that sent "Expect: 100-continue" (curl does for large bodies) is
  // told to go on before the body is read; it would otherwise wait a second before sending it.
  void OnHeader(beast::error_code ec);
  void ReadBody();
  void OnRead(beast::error_code ec);
  void Handle(const http::request<http::string_body>& req);
  void HandleGet(const std::string& target, const std::string& authorization);
  void Respond(int status, const std::string& body, bool close = false,
               const char* content_type = "application/json");
  // The Access-Control-Allow-Origin value for this request's Origin ("" when none applies).
  std::string AllowedOrigin() const;
  std::string CorsHeaders() const;  // as header lines for the SSE head ("" when none)
  // A CORS preflight (OPTIONS): 204 with the methods and headers a browser may use.
  void RespondPreflight(const http::request<http::string_body>& req);
  void RespondError(const openai::ApiError& e, bool close = false);
  void StartGenerations(openai::Endpoint endpoint, const std::string& body,
                        const std::string& authorization);
  absl::StatusOr<std::vector<std::vector<int32_t>>> Prompts(openai::Request* r);
  void Complete();
  void SendEvent(const std::string& event);
  void Enqueue(std::string bytes);
  void WriteNext();
  void OnWrite(beast::error_code ec);
  void AfterResponse();
  void Watch();
  void OnWatch(beast::error_code ec, size_t n);
  void Count(int status) {
    if (front_->options.metrics.request) front_->options.metrics.request(route_, status);
  }

  HttpFront::Impl* front_;
  Stream stream_;
  const net::any_io_executor executor_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  bool closed_ = false;
  bool idle_ = false;  // waiting for a request's first bytes
  bool keep_alive_ = true;
  bool head_ = false;    // HEAD: headers only
  std::string origin_;   // the request's Origin header (browsers)
  bool chunked_ = true;  // HTTP/1.1: SSE in chunks; 1.0: until the connection closes
  std::string route_ = "other";
  // The generation request in progress.
  std::unique_ptr<openai::Request> request_;
  std::unique_ptr<openai::ResponseWriter> writer_;
  std::vector<std::shared_ptr<Generation>> gens_;
  int remaining_ = 0;
  grpc::Status error_;
  std::string key_;
  bool headers_sent_ = false;
  bool paused_ = false;
  // Output: framed bytes in order; one write in flight.
  std::deque<std::string> out_;
  std::string writing_;
  bool write_in_flight_ = false;
  size_t queued_bytes_ = 0;
  bool response_complete_ = false;  // everything of the response is queued
  bool close_after_ = false;
  bool watching_ = false;  // waiting for the socket to turn readable (a disconnect)
  bool resume_after_watch_ = false;
  // Closes a keep-alive connection left idle after a completion (its pending Watch read kept
  // the expiry it started with, none: such connections were never closed).
  net::steady_timer idle_timer_{executor_};
};

// Feeds one choice's generation into its session.
template <class Stream>
class ChoiceSink : public GenerationSink {
 public:
  ChoiceSink(std::shared_ptr<Session<Stream>> s, int index) : s_(std::move(s)), index_(index) {}
  void OnChunk(v1::GenerateResponse chunk) override {
    s_->Post([i = index_, c = std::move(chunk)](Session<Stream>* s) { s->OnChunk(i, c); });
  }
  void OnDone(const grpc::Status& status, v1::GenerateResponse last) override {
    s_->Post([i = index_, st = status, l = std::move(last)](Session<Stream>* s) {
      s->OnDone(i, st, l);
    });
  }

 private:
  std::shared_ptr<Session<Stream>> s_;
  const int index_;
};

template <class Stream>
void Session<Stream>::Start() {
  if constexpr (std::is_same_v<Stream, beast::tcp_stream>) {
    ReadRequest();
  } else {
    lowest().expires_after(front_->options.read_timeout);
    stream_.async_handshake(ssl::stream_base::server,
                            [self = this->shared_from_this()](beast::error_code ec) {
                              if (ec) return self->Close();
                              self->ReadRequest();
                            });
  }
}

template <class Stream>
void Session<Stream>::Close() {
  if (closed_) return;
  closed_ = true;
  idle_timer_.cancel();
  for (auto& g : gens_) g->Cancel();
  beast::error_code ec;
  lowest().socket().shutdown(tcp::socket::shutdown_both, ec);
  lowest().close();
}

template <class Stream>
void Session<Stream>::Drain() {
  if (closed_) return;
  // Idle: waiting for a request's first byte, in ReadRequest or (after a completion) in Watch.
  const bool waiting = (idle_ && !parser_->got_some()) || resume_after_watch_;
  if (waiting && buffer_.size() == 0) return Close();
  keep_alive_ = false;  // the response in progress says "Connection: close" if not yet sent
}

template <class Stream>
void Session<Stream>::ReadRequest() {
  if (closed_) return;
  // Draining: a request already begun (its bytes in buffer_) is served, with "Connection: close".
  if (front_->draining && buffer_.size() == 0) return Close();
  parser_.emplace();  // a fresh parser per request
  idle_ = true;
  parser_->body_limit(front_->options.max_body_bytes);
  parser_->header_limit(64 << 10);
  lowest().expires_after(front_->options.read_timeout);
  http::async_read_header(
      stream_, buffer_, *parser_,
      [self = this->shared_from_this()](beast::error_code ec, size_t) { self->OnHeader(ec); });
}

template <class Stream>
void Session<Stream>::OnHeader(beast::error_code ec) {
  idle_ = false;
  if (closed_) return;  // a drain closed it while the request arrived
  if (ec || parser_->is_done()) return OnRead(ec);
  const auto& req = parser_->get();
  if (!beast::iequals(req[http::field::expect], "100-continue") || req.version() < 11) {
    return ReadBody();
  }
  auto go_on = std::make_shared<http::response<http::empty_body>>(http::status::continue_, 11);
  http::async_write(stream_, *go_on,
                    [self = this->shared_from_this(), go_on](beast::error_code wec, size_t) {
                      if (wec) return self->Close();
                      self->ReadBody();
                    });
}

template <class Stream>
void Session<Stream>::ReadBody() {
  http::async_read(
      stream_, buffer_, *parser_,
      [self = this->shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
}

template <class Stream>
void Session<Stream>::OnRead(beast::error_code ec) {
  idle_ = false;
  if (closed_) return;
  lowest().expires_never();
  route_ = "other";
  if (ec == http::error::end_of_stream || ec == net::error::eof ||
      ec == net::error::connection_reset || ec == net::error::operation_aborted) {
    return Close();
  }
  const bool started = parser_->got_some() || buffer_.size() > 0;
  auto fail = [&](int status, const std::string& what) {
    openai::ApiError e{status, what, "invalid_request_error", "", ""};
    RespondError(e, /*close=*/true);
  };
  if (ec == beast::error::timeout) {
    return started ? fail(408, "the request did not arrive in time") : Close();
  }
  if (ec == http::error::body_limit) {
    return fail(413, absl::StrCat("body: larger than ", front_->options.max_body_bytes, " bytes"));
  }
  if (ec == http::error::header_limit) return fail(431, "headers: too large");
  if (ec.category() == http::make_error_code(http::error::end_of_stream).category()) {
    return fail(400, absl::StrCat("malformed HTTP request: ", ec.message()));
  }
  if (ec) return Close();
  Handle(parser_->get());
}

template <class Stream>
void Session<Stream>::Handle(const http::request<http::string_body>& req) {
  keep_alive_ = req.keep_alive() && !front_->draining;
  head_ = req.method() == http::verb::head;
  origin_ = std::string(req[http::field::origin]);
  if (req.method() == http::verb::options && !front_->options.cors_origin.empty()) {
    return RespondPreflight(req);
  }
  chunked_ = req.version() >= 11;
  if (!chunked_) keep_alive_ = false;
  std::string target(req.target());
  if (auto q = target.find('?'); q != std::string::npos) target.resize(q);
  route_ = RouteOf(target);
  const std::string authorization(req[http::field::authorization]);
  const bool post = req.method() == http::verb::post;
  const bool get = req.method() == http::verb::get || req.method() == http::verb::head;
  if (target == "/v1/chat/completions" || target == "/v1/completions") {
    if (!post) return RespondError({405, "use POST", "invalid_request_error", "", ""});
    const auto endpoint =
        target == "/v1/chat/completions" ? openai::Endpoint::kChat : openai::Endpoint::kCompletions;
    return StartGenerations(endpoint, req.body(), authorization);
  }
  if (route_ != "other" && !get) {
    return RespondError({405, "use GET", "invalid_request_error", "", ""});
  }
  HandleGet(target, authorization);
}

template <class Stream>
void Session<Stream>::HandleGet(const std::string& target, const std::string& authorization) {
  const GatewayOptions& o = front_->service->options();
  if (target == "/health") {
    if (front_->draining) {
      return RespondError({503, "shutting down", "service_unavailable", "", ""});
    }
    const bool ok = !front_->options.ready || front_->options.ready();
    if (ok) return Respond(200, R"({"status":"ok"})");
    return RespondError({503, "no attention node is available", "service_unavailable", "", ""});
  }
  if (target == "/version") {
    return Respond(200, openai::Dump({{"version", front_->options.version}}));
  }
  if (target == "/metrics" && front_->options.metrics_text) {
    return Respond(200, front_->options.metrics_text(), false, "text/plain; version=0.0.4");
  }
  if (route_ != "/v1/models") {
    return RespondError({404, absl::StrCat("no route ", target), "invalid_request_error", "", ""});
  }
  if (auto st = front_->service->keys()->Check(authorization); !st.ok()) {
    return RespondError(openai::ErrorFromStatus(st));
  }
  // The longest sequence a request can count on: the context, or less where the attention
  // nodes' KV caches hold less (as vLLM's max_model_len: clients size their prompts by it).
  int64_t max_len = o.max_position_embeddings;
  const int64_t cache = front_->service->pool()->totals().smallest_cache_tokens;
  if (cache > 0 && (max_len <= 0 || cache < max_len)) max_len = cache;
  json model = {{"id", o.model_id},          {"object", "model"},  {"created", 0},
                {"owned_by", "dmoe"},        {"root", o.model_id}, {"max_model_len", max_len},
                {"vocab_size", o.vocab_size}};
  if (target == "/v1/models") {  // every name it answers to, as vLLM lists its served names
    json data = json::array({model});
    for (const std::string& alias : o.model_aliases) {
      data.push_back(model);
      data.back()["id"] = alias;
    }
    return Respond(200, openai::Dump({{"object", "list"}, {"data", std::move(data)}}));
  }
  const std::string asked = target.size() > 11 ? target.substr(11) : "";
  if (target.rfind("/v1/models/", 0) == 0 && !asked.empty() && o.Serves(asked)) {
    model["id"] = asked;
    return Respond(200, openai::Dump(model));
  }
  RespondError({404, absl::StrCat("model: \"", target.substr(11), "\" is not served here"),
                "invalid_request_error", "model", "model_not_found"});
}

template <class Stream>
void Session<Stream>::Respond(int status, const std::string& body, bool close,
                              const char* content_type) {
  http::response<http::string_body> res{static_cast<http::status>(status), 11};
  res.set(http::field::server, "dmoe");
  res.set(http::field::content_type, content_type);
  if (status == 401) res.set(http::field::www_authenticate, "Bearer");
  // Busy (a key's limit) or no node: clients (openai-python, LiteLLM) wait this long to retry.
  if (status == 429 || status == 503) res.set(http::field::retry_after, "1");
  if (const std::string origin = AllowedOrigin(); !origin.empty()) {
    res.set(http::field::access_control_allow_origin, origin);
    res.set(http::field::vary, "Origin");
  }
  res.keep_alive(keep_alive_ && !close);
  res.body() = body;
  res.prepare_payload();
  close_after_ = close || !keep_alive_;
  std::ostringstream os;
  if (head_) {
    os << res.base();  // Content-Length of the body, no body
  } else {
    os << res;
  }
  Count(status);
  response_complete_ = true;
  Enqueue(os.str());
}

template <class Stream>
void Session<Stream>::RespondError(const openai::ApiError& e, bool close) {
  Respond(e.http_status, e.Json(), close);
}

template <class Stream>
std::string Session<Stream>::AllowedOrigin() const {
  const std::string& allowed = front_->options.cors_origin;
  if (allowed.empty() || origin_.empty()) return "";
  if (allowed == "*") return "*";
  return origin_ == allowed ? origin_ : "";
}

template <class Stream>
std::string Session<Stream>::CorsHeaders() const {
  const std::string origin = AllowedOrigin();
  if (origin.empty()) return "";
  return absl::StrCat("Access-Control-Allow-Origin: ", origin, "\r\nVary: Origin\r\n");
}

template <class Stream>
void Session<Stream>::RespondPreflight(const http::request<http::string_body>& req) {
  http::response<http::empty_body> res{http::status::no_content, 11};
  res.set(http::field::server, "dmoe");
  if (const std::string origin = AllowedOrigin(); !origin.empty()) {
    res.set(http::field::access_control_allow_origin, origin);
    res.set(http::field::vary, "Origin");
    res.set(http::field::access_control_allow_methods, "GET, POST, OPTIONS");
    // The headers the browser asks for (the SDKs add their own x-stainless-* ones), when they
    // are plain header names; else the ones the API reads.
    const std::string asked(req[http::field::access_control_request_headers]);
    const bool plain =
        asked.size() <= 1024 && asked.find_first_not_of(
                                    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                    "0123456789-_, ") == std::string::npos;
    res.set(http::field::access_control_allow_headers,
            plain && !asked.empty() ? asked : std::string("authorization, content-type"));
    res.set(http::field::access_control_max_age, "600");
  }
  res.keep_alive(keep_alive_);
  close_after_ = !keep_alive_;
  std::ostringstream os;
  os << res;
  Count(204);
  response_complete_ = true;
  Enqueue(os.str());
}

}  // namespace

namespace {

template <class Stream>
absl::StatusOr<std::vector<std::vector<int32_t>>> Session<Stream>::Prompts(openai::Request* r) {
  const GatewayOptions& o = front_->service->options();
  const Tokenizer* tok = o.tokenizer;
  std::vector<std::vector<int32_t>> prompts;
  const char* field = r->endpoint == openai::Endpoint::kChat ? "messages" : "prompt";
  if (r->endpoint == openai::Endpoint::kChat) {
    if (tok == nullptr) {
      return absl::FailedPreconditionError("messages: chat needs the gateway's --tokenizer");
    }
    auto text = front_->service->RenderChat(r->chat);
    if (!text.ok()) return text.status();
    prompts.push_back(tok->Encode(*text + r->tool_prefill));
  }
  for (size_t i = 0; i < r->prompts.size(); ++i) {
    const std::string f = r->prompts.size() == 1 ? "prompt" : absl::StrCat("prompt[", i, "]");
    if (const auto* ids = std::get_if<std::vector<int32_t>>(&r->prompts[i])) {
      for (size_t k = 0; k < ids->size(); ++k) {
        if (o.vocab_size > 0 && (*ids)[k] >= o.vocab_size) {
          return absl::InvalidArgumentError(
              absl::StrCat(f, ": token id ", (*ids)[k], " is outside the vocabulary"));
        }
      }
      prompts.push_back(*ids);
    } else if (tok == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(f, ": text needs the gateway's --tokenizer; send token ids"));
    } else {
      prompts.push_back(tok->Encode(std::get<std::string>(r->prompts[i])));
    }
  }
  const int64_t ctx = o.max_position_embeddings;
  size_t longest = 0;
  for (const auto& p : prompts) longest = std::max(longest, p.size());
  if (ctx > 0 && static_cast<int64_t>(longest) >= ctx) {
    return absl::OutOfRangeError(absl::StrCat(field, ": this model's context is ", ctx,
                                              " tokens; the prompt has ", longest));
  }
  if (!r->max_tokens_given) {  // as OpenAI: 16 for completions, the rest of the context for chat
    const bool chat = r->endpoint == openai::Endpoint::kChat;
    r->sampling.set_max_tokens(chat && ctx > 0 ? ctx - static_cast<int64_t>(longest) : 16);
  }
  if (ctx > 0 && static_cast<int64_t>(longest) + r->sampling.max_tokens() > ctx) {
    return absl::OutOfRangeError(
        absl::StrCat(field, ": this model's context is ", ctx, " tokens; the prompt has ", longest,
                     " and max_tokens asks for ", r->sampling.max_tokens(), " more"));
  }
  return prompts;
}

template <class Stream>
void Session<Stream>::StartGenerations(openai::Endpoint endpoint, const std::string& body,
                                       const std::string& authorization) {
  // The key first: a client without one gets no parsing, template rendering or tokenizing of its
  // body (up to max_body_bytes) done for it. Acquire, which counts the request, comes after.
  if (auto st = front_->service->keys()->Check(authorization); !st.ok()) {
    return RespondError(openai::ErrorFromStatus(st));
  }
  auto parsed = openai::ParseRequest(endpoint, body);
  if (!parsed.ok()) return RespondError(openai::ErrorFromStatus(parsed.status()));
  const GatewayOptions& o = front_->service->options();
  openai::ApplySamplingDefaults(o.sampling_defaults, &*parsed);
  if (!o.Serves(parsed->model)) {
    return RespondError(
        {404, absl::StrCat("model: \"", parsed->model, "\" is not served here (", o.model_id, ")"),
         "invalid_request_error", "model", "model_not_found"});
  }
  request_ = std::make_unique<openai::Request>(std::move(*parsed));
  if (auto st = openai::EnableToolCalls(o.tool_call_parser, request_.get()); !st.ok()) {
    return RespondError(openai::ErrorFromStatus(st));
  }
  // An answer that starts inside a call (tool_choice required or named), or in JSON mode (which
  // can never write "</think>"), has no thinking.
  request_->split_reasoning = endpoint == openai::Endpoint::kChat &&
                              o.reasoning_parser == "deepseek-r1" &&
                              request_->tool_prefill.empty() && !request_->sampling.json_object();
  auto prompts = Prompts(request_.get());
  if (!prompts.ok()) return RespondError(openai::ErrorFromStatus(prompts.status()));
  if (request_->echo) request_->prompt_token_ids = *prompts;
  if (auto st = front_->service->keys()->Acquire(authorization, &key_); !st.ok()) {
    return RespondError(openai::ErrorFromStatus(st));
  }
  const int n = request_->n;
  remaining_ = static_cast<int>(prompts->size()) * n;
  writer_ = std::make_unique<openai::ResponseWriter>(
      *request_, front_->NewId(endpoint), static_cast<int64_t>(std::time(nullptr)),
      request_->model.empty() ? o.model_id : request_->model, o.tokenizer, remaining_);
  error_ = grpc::Status::OK;
  const uint64_t base_seed = request_->seed_given ? request_->sampling.seed() : front_->NewSeed();
  Watch();
  for (int i = 0; i < remaining_; ++i) {
    GenerationRequest g;
    g.prompt = (*prompts)[static_cast<size_t>(i / n)];
    g.sampling = request_->sampling;
    g.sampling.set_seed(base_seed + static_cast<uint64_t>(i % n));  // n differ
    g.max_tokens_up_to_cache = !request_->max_tokens_given;
    g.skip_special_tokens = request_->skip_special_tokens;
    ++front_->generations;
    gens_.push_back(
        Generation::Start(front_->service->context(), std::move(g),
                          std::make_shared<ChoiceSink<Stream>>(this->shared_from_this(), i)));
  }
}

template <class Stream>
void Session<Stream>::OnChunk(int index, const v1::GenerateResponse& chunk) {
  if (closed_ || writer_ == nullptr) return;
  const std::string event = writer_->Chunk(index, chunk);
  if (request_->stream) SendEvent(event);
}

template <class Stream>
void Session<Stream>::OnDone(int index, const grpc::Status& status,
                             const v1::GenerateResponse& last) {
  --front_->generations;
  if (status.ok()) {
    OnChunk(index, last);
  } else if (error_.ok()) {
    error_ = status;
    for (auto& g : gens_) g->Cancel();  // one choice failed: the request has failed
  }
  if (--remaining_ > 0) return;
  front_->service->keys()->Release(key_);
  key_.clear();
  gens_.clear();
  if (!closed_) Complete();
  writer_.reset();
  request_.reset();
}

template <class Stream>
void Session<Stream>::Complete() {
  if (!error_.ok()) {
    const openai::ApiError e = openai::ErrorFromStatus(FromGrpc(error_));
    if (!headers_sent_) return RespondError(e);
    // Streaming already: the error as an event, then the end of the stream.
    SendEvent(absl::StrCat("data: ", e.Json(), "\n\n"));
    SendEvent("data: [DONE]\n\n");
    Count(200);  // the status line said 200; the error went in the stream
  } else if (request_->stream) {
    SendEvent(writer_->End());
    Count(200);
  } else {
    return Respond(200, writer_->Body());
  }
  close_after_ = !keep_alive_;
  response_complete_ = true;
  Enqueue(chunked_ ? "0\r\n\r\n" : "");  // the last chunk (1.0: nothing; the close ends it)
}

template <class Stream>
void Session<Stream>::SendEvent(const std::string& event) {
  if (event.empty()) return;
  std::string bytes;
  if (!headers_sent_) {  // the headers and the first event in one write
    headers_sent_ = true;
    bytes = absl::StrCat("HTTP/1.", chunked_ ? "1" : "0",
                         " 200 OK\r\nServer: dmoe\r\nContent-Type: text/event-stream\r\n"
                         "Cache-Control: no-cache\r\n",
                         CorsHeaders(), chunked_ ? "Transfer-Encoding: chunked\r\n" : "",
                         "Connection: ", keep_alive_ ? "keep-alive" : "close", "\r\n\r\n");
  }
  bytes += chunked_ ? ChunkFrame(event) : event;
  Enqueue(std::move(bytes));
  if (!paused_ && queued_bytes_ > front_->options.stream_buffer_bytes) {
    paused_ = true;  // the client reads slower than the model writes: hold the node back
    for (auto& g : gens_) g->Pause();
  }
}

template <class Stream>
void Session<Stream>::Enqueue(std::string bytes) {
  if (closed_) return;
  queued_bytes_ += bytes.size();
  out_.push_back(std::move(bytes));
  WriteNext();
}

template <class Stream>
void Session<Stream>::WriteNext() {
  if (write_in_flight_ || out_.empty() || closed_) return;
  writing_ = std::move(out_.front());
  out_.pop_front();
  write_in_flight_ = true;
  lowest().expires_after(front_->options.write_timeout);
  net::async_write(
      stream_, net::buffer(writing_),
      [self = this->shared_from_this()](beast::error_code ec, size_t) { self->OnWrite(ec); });
}

template <class Stream>
void Session<Stream>::OnWrite(beast::error_code ec) {
  write_in_flight_ = false;
  queued_bytes_ -= writing_.size();
  writing_.clear();
  if (ec) return Close();  // the client is gone (or stalled): its request is cancelled
  if (paused_ && queued_bytes_ <= front_->options.stream_buffer_bytes / 2) {
    paused_ = false;
    for (auto& g : gens_) g->Resume();
  }
  if (!out_.empty()) return WriteNext();
  lowest().expires_never();
  if (response_complete_) AfterResponse();
}

template <class Stream>
void Session<Stream>::AfterResponse() {
  response_complete_ = false;
  headers_sent_ = false;
  paused_ = false;
  if (close_after_ || (front_->draining && buffer_.size() == 0)) return Close();
  if (!watching_) return ReadRequest();
  resume_after_watch_ = true;  // the pending read goes on as the next request's
  idle_timer_.expires_after(front_->options.read_timeout);
  idle_timer_.async_wait([self = this->shared_from_this()](beast::error_code ec) {
    if (!ec && self->resume_after_watch_) self->Close();  // no next request came
  });
}

// While a request generates, a read stays pending: it fails when the client goes away (EOF, a
// reset, a TLS close_notify), which cancels the request; bytes of an early next request are kept
// in buffer_ for it. One read beside one write is allowed on tcp_stream and ssl_stream alike.
template <class Stream>
void Session<Stream>::Watch() {
  // The next request is already here (read with this one's body: pipelining): no watch, so that
  // the response's end parses it at once (a watch would wait for bytes that never come).
  if (buffer_.size() > 0) return;
  watching_ = true;
  stream_.async_read_some(
      buffer_.prepare(4096),
      [self = this->shared_from_this()](beast::error_code ec, size_t n) { self->OnWatch(ec, n); });
}

template <class Stream>
void Session<Stream>::OnWatch(beast::error_code ec, size_t n) {
  watching_ = false;
  if (closed_) return;
  if (ec) return Close();  // gone: cancel its generations
  buffer_.commit(n);
  if (resume_after_watch_) {  // the response is out: the next request has begun
    resume_after_watch_ = false;
    idle_timer_.cancel();
    return ReadRequest();
  }
  // The next request began early (a fast client): Watch stops, so that the response's end goes
  // straight to ReadRequest, which parses what is in buffer_ (watching on, it waited for bytes
  // the client had already sent). A dead client is still caught by the write timeout.
  Watch();
}

}  // namespace

void HttpFront::Impl::Accept() {
  acceptor.async_accept(net::make_strand(ioc), [this](beast::error_code ec, tcp::socket socket) {
    if (stopping || draining || !acceptor.is_open()) return;  // closed: accepting would spin
    if (ec == net::error::no_descriptors || ec == net::error::no_buffer_space ||
        ec == net::error::no_memory || ec == beast::errc::too_many_files_open_in_system) {
      // Out of descriptors (or memory): the connection stays in the backlog. Trying again at
      // once fails at once, a core spinning for as long as it lasts: wait 10 ms.
      if (accept_failures++ % 1000 == 0) {
        spdlog::warn("HTTP: cannot accept connections: {} ({} open)", ec.message(),
                     connections.load());
      }
      auto retry = std::make_shared<net::steady_timer>(acceptor.get_executor(),
                                                       std::chrono::milliseconds(10));
      retry->async_wait([this, retry](beast::error_code) { Accept(); });
      return;
    }
    if (!ec) OnAccept(std::move(socket));
    Accept();
  });
}

void HttpFront::Impl::OnAccept(tcp::socket socket) {
  if (connections >= options.max_connections) {
    beast::error_code ec;
    socket.close(ec);
    return;
  }
  socket.set_option(tcp::no_delay(true));
  // Started on the session's own strand, like everything it does (a drain's Drain() is posted
  // there, and would otherwise race with Start on another loop thread).
  if (tls != nullptr) {
    auto s = std::make_shared<Session<beast::ssl_stream<beast::tcp_stream>>>(
        this, beast::ssl_stream<beast::tcp_stream>(beast::tcp_stream(std::move(socket)), *tls));
    Register(s);
    net::dispatch(s->executor(), [s] { s->Start(); });
  } else {
    auto s =
        std::make_shared<Session<beast::tcp_stream>>(this, beast::tcp_stream(std::move(socket)));
    Register(s);
    net::dispatch(s->executor(), [s] { s->Start(); });
  }
}

absl::Status CheckCorsOrigin(const std::string& origin) {
  if (origin == "*") return absl::OkStatus();
  const size_t scheme = origin.rfind("https://", 0) == 0  ? 8
                        : origin.rfind("http://", 0) == 0 ? 7
                                                          : 0;
  if (scheme == 0 || origin.size() == scheme || origin.size() > 253 + scheme + 6 ||
      origin.find_first_not_of(
          "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]", scheme) !=
          std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--cors-origin: \"", origin.substr(0, 100),
                     "\" is not \"*\" or an origin like https://ui.example.com[:PORT] (no path)"));
  }
  return absl::OkStatus();
}

HttpFront::HttpFront(GatewayService* service, HttpFrontOptions options)
    : impl_(std::make_unique<Impl>(service, std::move(options))) {}

HttpFront::~HttpFront() { Stop(); }

namespace {

// Many streaming clients need many descriptors: the soft limit up to the hard one.
void RaiseFileLimit() {
  rlimit r{};
  if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
  }
}

absl::StatusOr<tcp::endpoint> Resolve(net::io_context& ioc, const std::string& listen) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http-listen: \"", listen, "\" is not HOST:PORT"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() > 1 && host.front() == '[') host = host.substr(1, host.size() - 2);
  beast::error_code ec;
  tcp::resolver resolver(ioc);
  auto results = resolver.resolve(host, listen.substr(colon + 1),
                                  tcp::resolver::passive | tcp::resolver::numeric_service, ec);
  if (ec || results.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http-listen: cannot resolve \"", listen, "\": ", ec.message()));
  }
  return results.begin()->endpoint();
}

}  // namespace

absl::StatusOr<std::string> HttpFront::Start() {
  Impl& m = *impl_;
  RaiseFileLimit();
  if (!m.options.tls_cert_pem.empty()) {
    m.tls = std::make_unique<ssl::context>(ssl::context::tls_server);
    beast::error_code ec;
    m.tls->use_certificate_chain(net::buffer(m.options.tls_cert_pem), ec);
    if (!ec) m.tls->use_private_key(net::buffer(m.options.tls_key_pem), ssl::context::pem, ec);
    if (ec) return absl::InvalidArgumentError(absl::StrCat("--tls-cert/--tls-key: ", ec.message()));
  }
  auto ep = Resolve(m.ioc, m.options.listen);
  if (!ep.ok()) return ep.status();
  beast::error_code ec;
  m.acceptor.open(ep->protocol(), ec);
  if (!ec) m.acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) m.acceptor.bind(*ep, ec);
  if (!ec) m.acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("--http-listen ", m.options.listen, ": ", ec.message()));
  }
  const tcp::endpoint bound = m.acceptor.local_endpoint();
  m.Accept();
  for (int i = 0; i < std::max(1, m.options.threads); ++i) {
    m.threads.emplace_back([&m] { m.ioc.run(); });
  }
  std::string host = bound.address().to_string();
  if (bound.address().is_v6()) host = "[" + host + "]";
  return absl::StrCat(host, ":", bound.port());
}

void HttpFront::Impl::CloseListener(void (SessionBase::*then)()) {
  net::post(acceptor.get_executor(), [this] {
    beast::error_code ec;
    acceptor.close(ec);
  });
  MutexLock l(&mu);
  for (auto& w : sessions) {
    if (auto s = w.lock()) net::post(s->executor(), [s, then] { (s.get()->*then)(); });
  }
}

void HttpFront::BeginDrain() {
  Impl& m = *impl_;
  if (m.threads.empty() || m.stopping || m.draining.exchange(true)) return;
  m.CloseListener(&SessionBase::Drain);
}

size_t HttpFront::AwaitDrained(std::chrono::steady_clock::time_point deadline) {
  Impl& m = *impl_;
  while (m.connections > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return m.connections;
}

void DrainAndStop(HttpFront* front, ServiceMain* svc, std::chrono::seconds grace) {
  const auto deadline = std::chrono::steady_clock::now() + grace;
  if (svc->server() != nullptr) SetReadiness(svc->server(), "dmoe.v1.Dmoe", false);
  front->BeginDrain();
  svc->StopGrpc(grace);  // new calls refused; open ones finish, or are cancelled at the deadline
  if (const size_t left = front->AwaitDrained(deadline); left > 0) {
    spdlog::warn("drain over: {} HTTP connection(s) still open are cut", left);
  }
  front->Stop();
}

void HttpFront::Stop() {
  Impl& m = *impl_;
  if (m.threads.empty() || m.stopping.exchange(true)) return;
  m.CloseListener(&SessionBase::Close);
  // Cancelled generations report back through the loop: wait for them (bounded).
  for (int i = 0; i < 3000 && m.generations > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  m.ioc.stop();
  for (auto& t : m.threads) t.join();
  m.threads.clear();
}

}  // namespace dmoe::gateway
