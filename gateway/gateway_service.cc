#include "gateway/gateway_service.h"

#include <set>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/mutex.h"
#include "common/queued_writer.h"
#include "gateway/text_stream.h"

namespace dmoe::gateway {

namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// One Generate/Chat stream: a Generation feeds it.
class GrpcStream : public QueuedWriter<v1::GenerateResponse> {
 public:
  GrpcStream(const GatewayContext& ctx, GenerationRequest request) {
    // The stream is bound to gRPC only after this constructor (a Finish inside Start waits).
    auto gen =
        Generation::Start(ctx, std::move(request),
                          std::make_shared<Sink>(this, ctx.options->max_stream_backlog_bytes));
    {
      MutexLock l(&gen_mu_);
      gen_ = gen;
      if (!cancelled_) return;
    }
    gen->Cancel();  // a chunk overran the backlog before Start returned
  }
  void OnCancel() override { CancelGeneration(); }

 private:
  void CancelGeneration() {
    std::shared_ptr<Generation> gen;
    {
      MutexLock l(&gen_mu_);
      cancelled_ = true;
      gen = gen_;
    }
    if (gen != nullptr) gen->Cancel();
  }

  struct Sink : GenerationSink {
    Sink(GrpcStream* s, size_t max_backlog) : stream(s), max_backlog(max_backlog) {}
    // The stream is finished only in OnDone, the generation's last call: finished earlier (at
    // the overflow), gRPC could delete it while the generation still calls in.
    void OnChunk(v1::GenerateResponse chunk) override {
      if (stream->PushBounded(std::move(chunk), max_backlog)) return;
      stream->CancelGeneration();  // everything from now on is dropped
    }
    void OnDone(const grpc::Status& status, v1::GenerateResponse last) override {
      if (stream->overflowed()) {
        stream->FinishWith(grpc::Status(
            grpc::StatusCode::RESOURCE_EXHAUSTED,
            absl::StrCat("the client reads too slowly: more than ", max_backlog,
                         " bytes of this stream waited unread (--max-stream-backlog-kib)")));
        return;
      }
      if (status.ok()) stream->Push(std::move(last));
      stream->FinishWith(status);
    }
    GrpcStream* stream;
    const size_t max_backlog;
  };
  Mutex gen_mu_;
  std::shared_ptr<Generation> gen_ ABSL_GUARDED_BY(gen_mu_);
  bool cancelled_ ABSL_GUARDED_BY(gen_mu_) = false;
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
  if (!options_.Serves(model)) {
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
  GenerationRequest req;
  const auto& md = ctx->client_metadata();
  auto auth = md.find("authorization");
  const std::string_view authorization =
      auth == md.end() ? std::string_view()
                       : std::string_view(auth->second.data(), auth->second.size());
  if (auto st = keys_->Acquire(authorization, &req.key); !st.ok()) {
    return new Refusal(ToGrpc(st));
  }
  req.prompt = std::move(prompt).value();
  req.sampling = sampling;
  req.deadline = ctx->deadline();
  return new GrpcStream(context(), std::move(req));
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

namespace {

absl::Status CheckToolsRendered(const ChatTemplate& tmpl, const nlohmann::ordered_json& messages,
                                const nlohmann::ordered_json& tools, const std::string& rendered) {
  // Many templates (DeepSeek-V2-Chat's, the built-in one) render no tool results: the model
  // would answer without them. The first one with content is rendered without it; the same
  // text means the template dropped it (and would drop the others).
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i]["role"] != "tool" || messages[i]["content"] == "") continue;
    nlohmann::ordered_json without = messages;
    without.erase(i);
    auto text = tmpl.Render(without, tools, /*add_generation_prompt=*/true);
    if (text.ok() && *text == rendered) {
      return absl::InvalidArgumentError(
          absl::StrCat("messages[", i,
                       "].role: \"tool\" messages are not rendered by this model's chat "
                       "template (the model would never see them)"));
    }
    break;
  }
  // Neither do they all render tool definitions (DeepSeek-V3's own template does not): the model
  // would be asked to call tools it was never shown.
  if (tools.is_array() && !tools.empty()) {
    auto text =
        tmpl.Render(messages, nlohmann::ordered_json(nullptr), /*add_generation_prompt=*/true);
    if (text.ok() && *text == rendered) {
      return absl::InvalidArgumentError(
          "tools: not rendered by this model's chat template (the model would never see them); "
          "start the gateway with a --chat-template that renders them, e.g. "
          "deploy/chat_templates/deepseek_v3_tools.jinja");
    }
  }
  return absl::OkStatus();
}

}  // namespace

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
    // An assistant turn that only called tools has no content (null, as OpenAI clients send
    // it): templates that render calls test `content is none`. Others (which never mention
    // tool_calls) get "" as before, rather than failing on `+ null`.
    if (m.role() == "assistant" && m.tool_calls_size() > 0 && m.content().empty() &&
        tmpl.source().find("tool_calls") != std::string::npos) {
      j["content"] = nullptr;
    }
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
  auto text = tmpl.Render(messages, tools, /*add_generation_prompt=*/true);
  if (text.status().code() == absl::StatusCode::kResourceExhausted) {
    // The request's messages made the render outgrow the template's limits: the request is at
    // fault (400), not a rate limit (429, which clients retry).
    return absl::InvalidArgumentError(absl::StrCat("messages: ", text.status().message()));
  }
  if (text.ok()) {
    if (auto st = CheckToolsRendered(tmpl, messages, tools, *text); !st.ok()) return st;
  }
  return text;
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
