#include "gateway/gateway_service.h"

#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/mutex.h"
#include "common/queued_writer.h"
#include "gateway/text_stream.h"

namespace dmoe::gateway {

absl::StatusOr<std::unique_ptr<ApiKeys>> ApiKeys::Load(const std::string& path, int64_t limit) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--api-keys: cannot open ", path));
  auto keys = std::make_unique<ApiKeys>();
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> parts = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    if (parts.empty()) continue;
    int64_t own = limit;
    if (parts.size() > 2 ||
        (parts.size() == 2 && (!absl::SimpleAtoi(parts[1], &own) || own <= 0))) {
      return absl::InvalidArgumentError(
          absl::StrCat("--api-keys ", path, " line ", n, ": expected KEY [LIMIT]"));
    }
    keys->limits_[parts[0]] = own;
  }
  if (keys->limits_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--api-keys ", path, ": no keys"));
  }
  return keys;
}

absl::Status ApiKeys::Acquire(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                              std::string* key) {
  if (!enabled()) return absl::OkStatus();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return absl::UnauthenticatedError("missing authorization: Bearer KEY");
  const std::string value(it->second.data(), it->second.size());
  if (value.rfind("Bearer ", 0) != 0) {
    return absl::UnauthenticatedError("authorization must be \"Bearer KEY\"");
  }
  const std::string k = value.substr(7);
  MutexLock l(&mu_);
  auto lim = limits_.find(k);
  if (lim == limits_.end()) return absl::UnauthenticatedError("unknown API key");
  if (active_[k] >= lim->second) {
    return absl::ResourceExhaustedError(
        absl::StrCat("this API key already has ", lim->second, " requests in flight"));
  }
  ++active_[k];
  *key = k;
  return absl::OkStatus();
}

void ApiKeys::Release(const std::string& key) {
  if (key.empty()) return;
  MutexLock l(&mu_);
  --active_[key];
}

namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

internal::SamplingParams Forward(const v1::SamplingParams& p) {
  internal::SamplingParams s;
  s.set_temperature(p.temperature());
  s.set_top_k(p.top_k());
  s.set_top_p(p.top_p());
  s.set_min_p(p.min_p());
  s.set_seed(p.seed());
  s.set_max_tokens(p.max_tokens());
  for (int32_t id : p.stop_token_ids()) s.add_stop_token_ids(id);
  s.set_logprobs(p.logprobs());
  s.set_top_logprobs(p.top_logprobs());
  s.set_ignore_eos(p.ignore_eos());
  return s;
}

// One Generate/Chat stream: a worker thread relays the attention node's stream.
class Relay : public QueuedWriter<v1::GenerateResponse> {
 public:
  Relay(GatewayService* svc, grpc::CallbackServerContext* ctx, std::vector<int32_t> prompt,
        const v1::SamplingParams& sampling, std::string key)
      : svc_(svc),
        deadline_(ctx->deadline()),
        prompt_(std::move(prompt)),
        sampling_(sampling),
        key_(std::move(key)) {
    if (svc_->options().metrics.active) svc_->options().metrics.active(+1);
    thread_ = std::thread([this] { Run(); });
  }

  void OnCancel() override {
    MutexLock l(&mu_);
    cancelled_ = true;
    if (upstream_ != nullptr) upstream_->TryCancel();
  }

 protected:
  void OnDoneHook() override {
    thread_.join();
    svc_->keys()->Release(key_);
    if (svc_->options().metrics.active) svc_->options().metrics.active(-1);
  }

 private:
  // What the attempts of one request share. Only an attempt that got no token is retried, so the
  // decoder and the stop strings simply carry on in the attempt that streams.
  struct Progress {
    explicit Progress(const v1::SamplingParams& sampling)
        : start(std::chrono::steady_clock::now()),
          stops({sampling.stop().begin(), sampling.stop().end()}) {}
    std::chrono::steady_clock::time_point start;
    bool first_token = true;
    std::string finish;
    int64_t completion = 0;
    std::unique_ptr<IncrementalDetokenizer> detok;
    StopStrings stops;
  };

  void Run() {
    Progress p(sampling_);
    internal::GenerateRequest req;
    for (int32_t t : prompt_) req.add_prompt_token_ids(t);
    *req.mutable_sampling() = Forward(sampling_);
    std::set<int> tried;
    grpc::Status status;
    for (int attempt = 0; attempt < svc_->options().max_attempts; ++attempt) {
      const int node = svc_->pool()->Pick(tried);
      if (node < 0) {
        status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "no attention node is available");
        break;
      }
      bool retry = false;
      status = Attempt(node, req, &p, &retry);
      if (!retry) break;
      // Not started and the node is unreachable: try another one.
      svc_->pool()->MarkFailed(node);
      tried.insert(node);
    }
    if (status.ok()) Push(LastResponse(&p));
    CountOutcome(status);
    FinishWith(status);
  }

  // One try of the request on `node`. *retry: it failed before its first token because the node
  // is unreachable, so another one may take it.
  grpc::Status Attempt(int node, const internal::GenerateRequest& req, Progress* p, bool* retry) {
    *retry = false;
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(deadline_);
    {
      MutexLock l(&mu_);
      if (cancelled_) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
      upstream_ = ctx.get();
    }
    svc_->pool()->Started(node);
    auto reader = svc_->pool()->stub(node)->Generate(ctx.get(), req);
    if (const Tokenizer* tok = svc_->options().tokenizer; tok != nullptr) {
      p->detok = std::make_unique<IncrementalDetokenizer>(tok);
    }
    internal::GenerateResponse r;
    bool got_token = false;
    while (reader->Read(&r)) {
      if (!r.finish_reason().empty()) p->finish = r.finish_reason();
      if (r.tokens_size() == 0) continue;
      got_token = true;
      ForwardTokens(r, p);
      if (p->stops.stopped()) {
        p->finish = "stop";
        ctx->TryCancel();  // the attention node frees the sequence
        break;
      }
    }
    grpc::Status status = reader->Finish();
    svc_->pool()->Ended(node);
    {
      MutexLock l(&mu_);
      upstream_ = nullptr;
    }
    if (p->stops.stopped()) status = grpc::Status::OK;
    *retry = !got_token && status.error_code() == grpc::StatusCode::UNAVAILABLE;
    return status;
  }

  // Streams one upstream response with tokens to the client: ids, log-probabilities and the
  // text decoded so far, up to any stop string.
  void ForwardTokens(const internal::GenerateResponse& r, Progress* p) {
    if (p->first_token && svc_->options().metrics.time_to_first_token) {
      svc_->options().metrics.time_to_first_token(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - p->start).count());
    }
    p->first_token = false;
    const Tokenizer* tok = svc_->options().tokenizer;
    v1::GenerateResponse out;
    std::string text;
    for (const auto& t : r.tokens()) {
      out.add_token_ids(t.token_id());
      if (sampling_.logprobs()) out.add_logprobs(t.logprob());
      if (sampling_.top_logprobs() > 0) {
        v1::TopLogprobs* top = out.add_top_logprobs();
        for (const auto& e : t.top()) {
          v1::TokenLogprob* l = top->add_top();
          l->set_token_id(e.token_id());
          l->set_logprob(e.logprob());
          if (tok != nullptr) l->set_token(tok->TokenBytes(e.token_id()));
        }
      }
      if (p->detok) text += p->detok->Add(t.token_id());
    }
    p->completion += r.tokens_size();
    out.set_text_delta(p->stops.Add(text));
    Push(std::move(out));
  }

  // The closing response of a successful stream: the text held back, the finish reason, usage.
  v1::GenerateResponse LastResponse(Progress* p) {
    v1::GenerateResponse last;
    std::string rest = p->detok ? p->detok->Flush() : std::string();
    std::string text = p->stops.Add(rest);
    text += p->stops.Flush();
    last.set_text_delta(text);
    last.set_finish_reason(p->finish);
    last.mutable_usage()->set_prompt_tokens(static_cast<int64_t>(prompt_.size()));
    last.mutable_usage()->set_completion_tokens(p->completion);
    return last;
  }

  void CountOutcome(const grpc::Status& status) {
    if (!svc_->options().metrics.finished) return;
    static const char* kCodes[] = {"ok",
                                   "cancelled",
                                   "unknown",
                                   "invalid_argument",
                                   "deadline_exceeded",
                                   "not_found",
                                   "already_exists",
                                   "permission_denied",
                                   "resource_exhausted",
                                   "failed_precondition",
                                   "aborted",
                                   "out_of_range",
                                   "unimplemented",
                                   "internal",
                                   "unavailable",
                                   "data_loss",
                                   "unauthenticated"};
    const int code = static_cast<int>(status.error_code());
    svc_->options().metrics.finished(code >= 0 && code <= 16 ? kCodes[code] : "unknown");
  }

  GatewayService* svc_;
  std::chrono::system_clock::time_point deadline_;
  std::vector<int32_t> prompt_;
  v1::SamplingParams sampling_;
  std::string key_;
  std::thread thread_;
  Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* upstream_ ABSL_GUARDED_BY(mu_) = nullptr;
};

// A stream that fails at once (validation, authentication).
class Refusal : public QueuedWriter<v1::GenerateResponse> {
 public:
  explicit Refusal(grpc::Status st) { FinishWith(std::move(st)); }
};

}  // namespace

grpc::ServerWriteReactor<v1::GenerateResponse>* GatewayService::Start(
    grpc::CallbackServerContext* ctx, absl::StatusOr<std::vector<int32_t>> prompt,
    const v1::SamplingParams& sampling, const std::string& model) {
  if (!model.empty() && model != options_.model_id) {
    return new Refusal(grpc::Status(
        grpc::StatusCode::NOT_FOUND,
        absl::StrCat("model: \"", model, "\" is not served here (", options_.model_id, ")")));
  }
  if (!prompt.ok()) return new Refusal(ToGrpc(prompt.status()));
  if (prompt->empty()) {
    return new Refusal(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "prompt: is empty"));
  }
  if (sampling.max_tokens() <= 0) {
    return new Refusal(
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "sampling.max_tokens: must be positive"));
  }
  std::string key;
  if (auto st = keys_->Acquire(ctx->client_metadata(), &key); !st.ok()) {
    return new Refusal(ToGrpc(st));
  }
  return new Relay(this, ctx, std::move(prompt).value(), sampling, key);
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GatewayService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) {
  absl::StatusOr<std::vector<int32_t>> prompt;
  if (request->has_token_ids()) {
    prompt =
        std::vector<int32_t>(request->token_ids().ids().begin(), request->token_ids().ids().end());
  } else if (options_.tokenizer == nullptr) {
    prompt = absl::FailedPreconditionError(
        "prompt: text needs a tokenizer; this gateway was started without --tokenizer");
  } else {
    prompt = options_.tokenizer->Encode(request->text());
  }
  return Start(ctx, std::move(prompt), request->sampling(), request->model());
}

absl::StatusOr<std::string> GatewayService::RenderChat(const v1::ChatRequest& request) const {
  static const ChatTemplate* builtin = new ChatTemplate(ChatTemplate::BuiltinDefault());
  const ChatTemplate& tmpl = options_.chat_template != nullptr ? *options_.chat_template : *builtin;
  if (request.messages().empty()) return absl::InvalidArgumentError("messages: is empty");
  // The OpenAI shape the templates are written for; optional fields only when set.
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  for (int i = 0; i < request.messages_size(); ++i) {
    const v1::ChatMessage& m = request.messages(i);
    // Templates tend to skip roles they do not know: a typo would silently drop a message.
    if (m.role() != "system" && m.role() != "user" && m.role() != "assistant" &&
        m.role() != "tool") {
      return absl::InvalidArgumentError(absl::StrCat("messages[", i, "].role: \"", m.role(),
                                                     "\" is not system, user, assistant or tool"));
    }
    nlohmann::ordered_json j = {{"role", m.role()}, {"content", m.content()}};
    if (!m.name().empty()) j["name"] = m.name();
    if (!m.tool_call_id().empty()) j["tool_call_id"] = m.tool_call_id();
    if (m.tool_calls_size() > 0) {
      nlohmann::ordered_json calls = nlohmann::ordered_json::array();
      for (const v1::ToolCall& c : m.tool_calls()) {
        calls.push_back(
            {{"id", c.id()},
             {"type", c.type().empty() ? "function" : c.type()},
             {"function", {{"name", c.function_name()}, {"arguments", c.function_arguments()}}}});
      }
      j["tool_calls"] = std::move(calls);
    }
    messages.push_back(std::move(j));
  }
  nlohmann::ordered_json tools = nullptr;
  if (!request.tools_json().empty()) {
    tools =
        nlohmann::ordered_json::parse(request.tools_json(), nullptr, /*allow_exceptions=*/false);
    if (tools.is_discarded() || !tools.is_array()) {
      return absl::InvalidArgumentError("tools_json: not a JSON array");
    }
  }
  return tmpl.Render(messages, tools, /*add_generation_prompt=*/true);
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GatewayService::Chat(
    grpc::CallbackServerContext* ctx, const v1::ChatRequest* request) {
  absl::StatusOr<std::vector<int32_t>> prompt;
  if (options_.tokenizer == nullptr) {
    prompt = absl::FailedPreconditionError("Chat needs a tokenizer (--tokenizer)");
  } else {
    auto text = RenderChat(*request);
    if (!text.ok()) {
      prompt = text.status();
    } else {
      prompt = options_.tokenizer->Encode(*text);
    }
  }
  return Start(ctx, std::move(prompt), request->sampling(), request->model());
}

grpc::ServerUnaryReactor* GatewayService::Tokenize(grpc::CallbackServerContext* ctx,
                                                   const v1::TokenizeRequest* request,
                                                   v1::TokenizeResponse* reply) {
  auto* r = ctx->DefaultReactor();
  if (options_.tokenizer == nullptr) {
    r->Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "no tokenizer (--tokenizer)"));
    return r;
  }
  for (int32_t id : options_.tokenizer->Encode(request->text())) reply->add_ids(id);
  r->Finish(grpc::Status::OK);
  return r;
}

grpc::ServerUnaryReactor* GatewayService::Detokenize(grpc::CallbackServerContext* ctx,
                                                     const v1::DetokenizeRequest* request,
                                                     v1::DetokenizeResponse* reply) {
  auto* r = ctx->DefaultReactor();
  if (options_.tokenizer == nullptr) {
    r->Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "no tokenizer (--tokenizer)"));
    return r;
  }
  for (int i = 0; i < request->ids_size(); ++i) {
    if (request->ids(i) < 0 || request->ids(i) >= options_.tokenizer->vocab_size()) {
      r->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                             absl::StrCat("ids[", i, "]: ", request->ids(i), " is not a token")));
      return r;
    }
  }
  const std::vector<int32_t> ids(request->ids().begin(), request->ids().end());
  // proto3 strings must be UTF-8: incomplete characters come out as U+FFFD.
  IncrementalDetokenizer d(options_.tokenizer);
  std::string text;
  for (int32_t id : ids) text += d.Add(id);
  text += d.Flush();
  reply->set_text(text);
  r->Finish(grpc::Status::OK);
  return r;
}

grpc::ServerUnaryReactor* GatewayService::ListModels(grpc::CallbackServerContext* ctx,
                                                     const v1::ListModelsRequest*,
                                                     v1::ListModelsResponse* reply) {
  auto* m = reply->add_models();
  m->set_id(options_.model_id);
  m->set_vocab_size(options_.vocab_size);
  m->set_max_position_embeddings(options_.max_position_embeddings);
  auto* r = ctx->DefaultReactor();
  r->Finish(grpc::Status::OK);
  return r;
}

}  // namespace dmoe::gateway
