#include "gateway/generation.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/cluster_token.h"
#include "common/logging.h"

namespace dmoe::gateway {

absl::Status GatewayOptions::SetSamplingDefaults(const std::string& mode,
                                                 const ModelConfig::SamplingDefaults& d) {
  if (mode == "none") return absl::OkStatus();
  if (mode != "auto") {
    return absl::InvalidArgumentError(
        absl::StrCat("--generation-config: \"", mode, "\" is neither auto nor none"));
  }
  sampling_defaults = d;
  for (const std::string& p : d.problems) {
    spdlog::warn("generation_config.json: {} (not used as a default)", p);
  }
  const std::string shown = d.ToString();
  if (!shown.empty()) {
    spdlog::info("sampling defaults of the OpenAI API from generation_config.json: {}", shown);
  }
  return absl::OkStatus();
}

absl::Status GatewayOptions::SetReasoningParser(const std::string& name) {
  if (name == "none" || name.empty()) {
    reasoning_parser.clear();
  } else if (name == "deepseek-r1" || name == "deepseek_r1") {
    reasoning_parser = "deepseek-r1";
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--reasoning-parser: \"", name, "\" is neither deepseek-r1 nor none"));
  }
  return absl::OkStatus();
}

absl::Status GatewayOptions::SetToolCallParser(const std::string& name) {
  if (name == "none" || name.empty()) {
    tool_call_parser.clear();
  } else if (name == "deepseek_v3" || name == "deepseek-v3") {
    tool_call_parser = "deepseek_v3";
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--tool-call-parser: \"", name, "\" is neither deepseek_v3 nor none"));
  }
  return absl::OkStatus();
}

absl::Status GatewayOptions::SetModelNames(const std::string& flag_value) {
  std::vector<std::string> names = absl::StrSplit(flag_value, ',');
  for (std::string& n : names) {
    n = std::string(absl::StripAsciiWhitespace(n));  // "a, b": b
    if (n.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--model-id: \"", flag_value, "\" has an empty name"));
    }
  }
  model_id = names[0];
  model_aliases.assign(names.begin() + 1, names.end());
  return absl::OkStatus();
}

namespace {

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
  s.set_presence_penalty(p.presence_penalty());
  s.set_frequency_penalty(p.frequency_penalty());
  s.set_repetition_penalty(p.repetition_penalty());
  s.mutable_logit_bias()->insert(p.logit_bias().begin(), p.logit_bias().end());
  s.set_prompt_logprobs(p.prompt_logprobs());
  s.set_json_object(p.json_object());
  return s;
}

// The metric label of an outcome: "ok", "cancelled", "invalid_argument", ... (absl's and gRPC's
// codes are the same numbers).
std::string OutcomeName(grpc::StatusCode code) {
  return absl::AsciiStrToLower(absl::StatusCodeToString(static_cast<absl::StatusCode>(code)));
}

double SecondsSince(std::chrono::steady_clock::time_point t,
                    std::chrono::steady_clock::time_point now = std::chrono::steady_clock::now()) {
  return std::chrono::duration<double>(now - t).count();
}

}  // namespace

// What the attempts of one request share. Only an attempt that got no token is retried, so the
// decoder and the stop strings simply carry on in the attempt that streams.
struct Generation::Progress {
  explicit Progress(const v1::SamplingParams& sampling)
      : stops({sampling.stop().begin(), sampling.stop().end()}) {}
  bool first_token = true;
  std::chrono::steady_clock::time_point last_event;
  std::string finish;
  int64_t completion = 0;
  int64_t cached = 0;
  std::unique_ptr<IncrementalDetokenizer> detok;
  StopStrings stops;
  // prompt_logprobs: the prompt's scores, held until the first token (a node that fails before
  // it is retried elsewhere, which sends them again).
  v1::GenerateResponse prompt;
};

// Alive while its call runs (self_) and while the generation holds it: Cancel/Resume may use it
// from other threads without racing its end.
class Generation::Attempt : public grpc::ClientReadReactor<internal::GenerateResponse> {
 public:
  Attempt(std::shared_ptr<Generation> g, int node) : g_(std::move(g)), node_(node) {}
  // `stub`: the node's, from NodePool::Started (held for the call: the pool may forget the node).
  void Begin(std::shared_ptr<Attempt> self,
             std::shared_ptr<internal::AttentionService::Stub> stub) {
    self_ = std::move(self);
    stub_ = std::move(stub);
    ctx_.set_deadline(g_->request_.deadline);
    AddClusterToken(&ctx_, g_->ctx_.pool->cluster_token());
    stub_->async()->Generate(&ctx_, &g_->upstream_request_, this);
    StartRead(&r_);
    StartCall();
  }
  // Parking a read: a hold keeps OnDone back until Unpark.
  void Park() { AddHold(); }
  void Unpark(bool read_on) {
    if (read_on) StartRead(&r_);
    RemoveHold();
  }
  void Cancel() { ctx_.TryCancel(); }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    if (r_.tokens_size() > 0) got_token_ = true;
    if (g_->OnResponse(r_)) StartRead(&r_);
  }
  void OnDone(const grpc::Status& s) override {
    std::shared_ptr<Generation> g = std::move(g_);
    g->OnAttemptDone(node_, got_token_, s);
    self_.reset();  // may delete this
  }

 private:
  std::shared_ptr<Generation> g_;
  const int node_;
  std::shared_ptr<internal::AttentionService::Stub> stub_;  // outlives ctx_
  grpc::ClientContext ctx_;
  internal::GenerateResponse r_;
  bool got_token_ = false;
  std::shared_ptr<Attempt> self_;
};

std::shared_ptr<Generation> Generation::Start(const GatewayContext& ctx, GenerationRequest request,
                                              std::shared_ptr<GenerationSink> sink) {
  std::shared_ptr<Generation> g(new Generation(ctx, std::move(request), std::move(sink)));
  g->StartAttempt();
  return g;
}

Generation::Generation(const GatewayContext& ctx, GenerationRequest request,
                       std::shared_ptr<GenerationSink> sink)
    : ctx_(ctx),
      request_(std::move(request)),
      progress_(std::make_unique<Progress>(request_.sampling)),
      sink_(std::move(sink)) {
  for (int32_t t : request_.prompt) upstream_request_.add_prompt_token_ids(t);
  *upstream_request_.mutable_sampling() = Forward(request_.sampling);
  upstream_request_.mutable_sampling()->set_max_tokens_up_to_cache(request_.max_tokens_up_to_cache);
  if (ctx_.options->metrics.active) ctx_.options->metrics.active(+1);
}

Generation::~Generation() = default;

void Generation::Cancel() {
  std::shared_ptr<Attempt> a;
  bool parked;
  {
    MutexLock l(&mu_);
    cancelled_ = true;
    a = attempt_;
    parked = read_parked_;
    read_parked_ = false;
  }
  if (a == nullptr) return;
  a->Cancel();
  if (parked) a->Unpark(/*read_on=*/false);
}

void Generation::Pause() {
  MutexLock l(&mu_);
  paused_ = true;
}

void Generation::Resume() {
  std::shared_ptr<Attempt> a;
  {
    MutexLock l(&mu_);
    paused_ = false;
    if (!read_parked_) return;
    read_parked_ = false;
    a = attempt_;
  }
  if (a != nullptr) a->Unpark(/*read_on=*/true);
}

void Generation::StartAttempt() {
  int node;
  std::shared_ptr<internal::AttentionService::Stub> stub;
  for (;;) {  // ends: each round excludes one more node
    node = ctx_.pool->Pick(tried_);
    if (node < 0) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "no attention node is available"));
      return;
    }
    stub = ctx_.pool->Started(node);
    if (stub != nullptr) break;
    tried_.insert(node);  // retired and forgotten since the pick
  }
  ++attempts_;
  if (const Tokenizer* tok = ctx_.options->tokenizer; tok != nullptr) {
    progress_->detok = std::make_unique<IncrementalDetokenizer>(tok, request_.skip_special_tokens);
  }
  progress_->prompt.Clear();
  auto a = std::make_shared<Attempt>(shared_from_this(), node);
  bool go;
  {
    MutexLock l(&mu_);
    go = !cancelled_;
    if (go) attempt_ = a;
  }
  if (go) {
    a->Begin(a, std::move(stub));
    return;
  }
  ctx_.pool->Ended(node);
  Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
}

bool Generation::OnResponse(const internal::GenerateResponse& r) {
  Progress* p = progress_.get();
  if (!r.finish_reason().empty()) p->finish = r.finish_reason();
  if (r.prompt_tokens_size() > 0) HoldPromptScores(r);
  if (r.tokens_size() == 0) return true;
  v1::GenerateResponse chunk = TokensChunk(r);
  std::shared_ptr<GenerationSink> sink;
  {
    MutexLock l(&mu_);
    sink = sink_;
  }
  sink->OnChunk(std::move(chunk));
  std::shared_ptr<Attempt> stop;
  {
    MutexLock l(&mu_);
    if (p->stops.stopped()) {
      p->finish = "stop";
      stop = attempt_;
    } else if (cancelled_) {
      return false;  // no parking: OnDone must follow the cancel
    } else if (paused_) {
      attempt_->Park();
      read_parked_ = true;
      return false;
    } else {
      return true;
    }
  }
  stop->Cancel();  // the attention node frees the sequence
  return false;
}

void Generation::OnAttemptDone(int node, bool got_token, grpc::Status status) {
  ctx_.pool->Ended(node);
  bool cancelled;
  {
    MutexLock l(&mu_);
    attempt_ = nullptr;
    read_parked_ = false;
    cancelled = cancelled_;
  }
  if (progress_->stops.stopped()) status = grpc::Status::OK;
  if (!got_token && !cancelled && status.error_code() == grpc::StatusCode::UNAVAILABLE &&
      attempts_ < ctx_.options->max_attempts) {
    // Not started and the node is unreachable: try another one.
    ctx_.pool->MarkFailed(node);
    tried_.insert(node);
    if (ctx_.options->metrics.retried) ctx_.options->metrics.retried();
    StartAttempt();
    return;
  }
  Finish(std::move(status));
}

void Generation::Finish(grpc::Status status) {
  v1::GenerateResponse last;
  if (status.ok()) last = LastResponse();
  const GatewayMetrics& m = ctx_.options->metrics;
  if (m.finished) m.finished(OutcomeName(status.error_code()));
  if (status.ok() && m.end_to_end) m.end_to_end(SecondsSince(request_.arrival));
  ctx_.keys->Release(request_.key);
  if (m.active) m.active(-1);
  std::shared_ptr<GenerationSink> sink;
  {
    MutexLock l(&mu_);
    sink = std::move(sink_);
  }
  if (sink != nullptr) sink->OnDone(status, std::move(last));
}

// Ids, log-probabilities and the text decoded so far, up to any stop string: the tokens after the
// one that completed a stop string (a chunk carries several with speculative decoding) are not
// part of the answer, and are neither returned nor counted in usage.
v1::GenerateResponse Generation::TokensChunk(const internal::GenerateResponse& r) {
  Progress* p = progress_.get();
  const GatewayMetrics& m = ctx_.options->metrics;
  const auto now = std::chrono::steady_clock::now();
  if (p->first_token) {
    if (m.time_to_first_token) m.time_to_first_token(SecondsSince(request_.arrival, now));
    p->cached = r.cached_prompt_tokens();
    if (m.queue_time) m.queue_time(r.queue_seconds());
  } else if (m.inter_token) {
    m.inter_token(SecondsSince(p->last_event, now));
  }
  p->first_token = false;
  p->last_event = now;
  const Tokenizer* tok = ctx_.options->tokenizer;
  const v1::SamplingParams& sampling = request_.sampling;
  v1::GenerateResponse out;
  out.Swap(&p->prompt);  // the prompt's scores go out with the first token
  std::string text;
  for (const auto& t : r.tokens()) {
    if (p->stops.stopped()) break;
    out.add_token_ids(t.token_id());
    if (sampling.logprobs()) out.add_logprobs(t.logprob());
    if (sampling.top_logprobs() > 0) {
      v1::TopLogprobs* top = out.add_top_logprobs();
      for (const auto& e : t.top()) {
        v1::TokenLogprob* l = top->add_top();
        l->set_token_id(e.token_id());
        l->set_logprob(e.logprob());
        if (tok != nullptr) l->set_token(tok->TokenBytes(e.token_id()));
      }
    }
    // The token that ended the generation (eos, stop_token_ids) is no part of the text.
    if (p->detok && !t.stop()) text += p->stops.Add(p->detok->Add(t.token_id()));
    ++p->completion;
  }
  out.set_text_delta(text);
  return out;
}

void Generation::HoldPromptScores(const internal::GenerateResponse& r) {
  const Tokenizer* tok = ctx_.options->tokenizer;
  v1::GenerateResponse& held = progress_->prompt;
  for (const auto& t : r.prompt_tokens()) {
    held.add_prompt_token_ids(t.token_id());
    held.add_prompt_logprobs(t.logprob());
    if (request_.sampling.top_logprobs() <= 0) continue;
    v1::TopLogprobs* top = held.add_prompt_top_logprobs();
    for (const auto& e : t.top()) {
      v1::TokenLogprob* l = top->add_top();
      l->set_token_id(e.token_id());
      l->set_logprob(e.logprob());
      if (tok != nullptr) l->set_token(tok->TokenBytes(e.token_id()));
    }
  }
}

// The closing response of a successful stream: the text held back, the finish reason, usage.
v1::GenerateResponse Generation::LastResponse() {
  Progress* p = progress_.get();
  v1::GenerateResponse last;
  std::string rest = p->detok ? p->detok->Flush() : std::string();
  std::string text = p->stops.Add(rest);
  text += p->stops.Flush();
  last.set_text_delta(text);
  last.set_finish_reason(p->finish);
  last.mutable_usage()->set_prompt_tokens(static_cast<int64_t>(request_.prompt.size()));
  last.mutable_usage()->set_completion_tokens(p->completion);
  last.mutable_usage()->set_cached_prompt_tokens(p->cached);
  return last;
}

}  // namespace dmoe::gateway
