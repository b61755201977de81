#include "attention_service/attention_server.h"

#include <mutex>

#include "absl/strings/str_cat.h"
#include "common/cluster_token.h"
#include "common/mutex.h"
#include "common/queued_writer.h"

namespace dmoe {

void SchedulerLoop::Start() {
  stop_ = false;
  thread_ = std::thread([this] {
    while (!stop_) {
      const auto start = std::chrono::steady_clock::now();
      auto more = scheduler_->Step();
      if (on_step_ && more.ok() && *more) {
        on_step_(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
      // Idle (or an engine error, already reported to its requests): wait a little.
      if (!more.ok()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));  // e.g. experts unreachable
      } else if (!*more) {
        // Idle: woken by the next Submit/Cancel (a 1 ms poll here cost an idle node ~3.6 % of a
        // core and up to 1 ms of time to first token).
        scheduler_->WaitForWork(std::chrono::milliseconds(20));
      }
    }
  });
}

void SchedulerLoop::Stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

SamplingParams FromProto(const internal::SamplingParams& p) {
  SamplingParams s;
  s.temperature = p.temperature();
  s.top_k = p.top_k();
  s.top_p = p.top_p() == 0 ? 1.0 : p.top_p();
  s.min_p = p.min_p();
  s.seed = p.seed();
  s.max_tokens = p.max_tokens();
  s.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  s.ignore_eos = p.ignore_eos();
  s.logprobs = p.logprobs();
  s.top_logprobs = p.top_logprobs();
  s.presence_penalty = p.presence_penalty();
  s.frequency_penalty = p.frequency_penalty();
  s.repetition_penalty = p.repetition_penalty() == 0 ? 1.0 : p.repetition_penalty();
  s.logit_bias.insert(p.logit_bias().begin(), p.logit_bias().end());
  s.max_tokens_up_to_cache = p.max_tokens_up_to_cache();
  s.prompt_logprobs = p.prompt_logprobs();
  s.json_object = p.json_object();
  return s;
}

namespace {

grpc::StatusCode ToGrpc(absl::StatusCode c) { return static_cast<grpc::StatusCode>(c); }

// One streaming Generate call: the scheduler's callbacks feed the stream. The reactor is deleted
// after Finish, which only happens at the end of the scheduler's on_finish (no callback comes after
// it) or of the constructor when Submit fails.
class GenerateReactor : public QueuedWriter<internal::GenerateResponse> {
 public:
  GenerateReactor(Scheduler* scheduler, AttentionMetrics* metrics,
                  const internal::GenerateRequest* request, size_t max_backlog)
      : scheduler_(scheduler),
        metrics_(metrics),
        max_backlog_(max_backlog),
        last_(std::chrono::steady_clock::now()) {
    RequestCallbacks cb;
    cb.on_admit = [this](int64_t hit) {
      cached_ = hit;
      queue_seconds_ =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - last_).count();
    };
    cb.on_token = [this](const SampledToken& t) {
      internal::GenerateResponse r;
      if (first_) {
        r.set_cached_prompt_tokens(cached_);
        r.set_queue_seconds(queue_seconds_);
      }
      if (metrics_ != nullptr) {
        const auto now = std::chrono::steady_clock::now();
        const double s = std::chrono::duration<double>(now - last_).count();
        first_ ? metrics_->ObserveTimeToFirstToken(s) : metrics_->ObserveTimePerOutputToken(s);
        last_ = now;
      }
      first_ = false;
      Fill(t, r.add_tokens());
      Send(std::move(r));
    };
    cb.on_prompt_tokens = [this](const std::vector<SampledToken>& scores) {
      internal::GenerateResponse r;
      for (const SampledToken& t : scores) Fill(t, r.add_prompt_tokens());
      Send(std::move(r));
    };
    // FinishWith is the last touch of *this, made without holding mu_: once the stream is
    // finished, gRPC may delete the reactor on its own thread (QueuedWriter::OnDone), and an
    // unlock of mu_ after that wrote into freed memory ("corrupted double-linked list" in the
    // soak's attention node).
    cb.on_finish = [this](FinishReason reason, const absl::Status& st) {
      if (metrics_ != nullptr) metrics_->Finished(reason);
      grpc::Status final = grpc::Status::OK;
      {
        MutexLock l(&mu_);
        if (overflowed_) {
          final = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                               absl::StrCat("the reader left more than ", max_backlog_ >> 10,
                                            " KiB of this stream unread (a client reading too "
                                            "slowly); the generation was stopped"));
        } else if (reason == FinishReason::kError) {
          final = grpc::Status(ToGrpc(st.code()), std::string(st.message()));
        } else if (reason == FinishReason::kCancelled && cancelled_by_client_) {
          final = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
        } else {
          internal::GenerateResponse r;
          r.set_finish_reason(FinishReasonName(reason));
          Push(std::move(r));
        }
      }
      FinishWith(std::move(final));
    };
    std::vector<int32_t> prompt(request->prompt_token_ids().begin(),
                                request->prompt_token_ids().end());
    absl::StatusOr<uint64_t> id;
    {
      // Held across Submit: the scheduler's callbacks wait until the first message is queued.
      MutexLock l(&mu_);
      id = scheduler_->Submit(std::move(prompt), FromProto(request->sampling()), cb);
      if (id.ok()) {
        id_ = *id;
        internal::GenerateResponse first;
        first.set_request_id(id_);
        Push(std::move(first));
      }
    }
    if (!id.ok()) {  // the last touch of *this, as in on_finish
      if (metrics_ != nullptr) metrics_->Refused(id.status().code());
      FinishWith(grpc::Status(ToGrpc(id.status().code()), std::string(id.status().message())));
    }
  }

  static void Fill(const SampledToken& t, internal::GeneratedToken* g) {
    g->set_token_id(t.token);
    g->set_logprob(t.logprob);
    g->set_stop(t.stop);
    for (const auto& [id, lp] : t.top) {
      auto* top = g->add_top();
      top->set_token_id(id);
      top->set_logprob(lp);
    }
  }

  // A message after the first (scheduler thread): past the backlog, the sequence is cancelled.
  void Send(internal::GenerateResponse r) {
    MutexLock l(&mu_);
    if (!PushBounded(std::move(r), max_backlog_) && !overflowed_) {
      overflowed_ = true;  // ends at the next step: on_finish(kCancelled) below
      scheduler_->Cancel(id_);
    }
  }

  // The client cancelled, went away or ran out of time: free the sequence at the next step.
  void OnCancel() override {
    MutexLock l(&mu_);
    cancelled_by_client_ = true;
    if (id_ != 0) scheduler_->Cancel(id_);
  }

 private:
  Scheduler* scheduler_;
  AttentionMetrics* metrics_;
  const size_t max_backlog_;
  std::chrono::steady_clock::time_point last_;  // arrival, then the last token (scheduler thread)
  bool first_ = true;
  int64_t cached_ = 0;        // scheduler thread
  double queue_seconds_ = 0;  // scheduler thread
  Mutex mu_;
  uint64_t id_ ABSL_GUARDED_BY(mu_) = 0;
  bool cancelled_by_client_ ABSL_GUARDED_BY(mu_) = false;
  bool overflowed_ ABSL_GUARDED_BY(mu_) = false;  // PushBounded refused a token
};

}  // namespace

grpc::ServerWriteReactor<internal::GenerateResponse>* AttentionServiceImpl::Generate(
    grpc::CallbackServerContext* ctx, const internal::GenerateRequest* request) {
  if (!CallAuthorized(*ctx, token_)) {
    return new RefusedStream<internal::GenerateResponse>(Unauthenticated());
  }
  return new GenerateReactor(scheduler_, metrics_, request, max_backlog_);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Cancel(grpc::CallbackServerContext* ctx,
                                                       const internal::CancelRequest* request,
                                                       internal::CancelReply*) {
  if (!CallAuthorized(*ctx, token_)) {
    auto* r = ctx->DefaultReactor();
    r->Finish(Unauthenticated());
    return r;
  }
  scheduler_->Cancel(request->request_id());
  auto* r = ctx->DefaultReactor();
  r->Finish(grpc::Status::OK);
  return r;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetLoad(grpc::CallbackServerContext* ctx,
                                                        const internal::GetLoadRequest*,
                                                        internal::GetLoadReply* reply) {
  if (!CallAuthorized(*ctx, token_)) {
    auto* r = ctx->DefaultReactor();
    r->Finish(Unauthenticated());
    return r;
  }
  const SchedulerLoad load = scheduler_->load();
  const SchedulerStats stats = scheduler_->stats();
  reply->set_free_blocks(load.free_blocks);
  reply->set_total_blocks(load.total_blocks);
  reply->set_running(load.running);
  reply->set_draining(load.draining);
  reply->set_waiting(load.waiting);
  reply->set_queued_prefill_tokens(load.queued_prefill_tokens);
  reply->set_prefilled_tokens(stats.prefilled_tokens);
  reply->set_prefix_hit_tokens(stats.prefix_hit_tokens);
  reply->set_generated_tokens(stats.generated_tokens);
  reply->set_preemptions(stats.preemptions);
  reply->set_kv_bytes_per_token(load.kv_bytes_per_token);
  reply->set_block_tokens(load.block_tokens);
  reply->set_drafted_tokens(stats.drafted_tokens);
  reply->set_accepted_tokens(stats.accepted_tokens);
  reply->set_speculative_steps(stats.speculative_steps);
  auto* r = ctx->DefaultReactor();
  r->Finish(grpc::Status::OK);
  return r;
}

}  // namespace dmoe
