#include "attention_service/attention_server.h"

#include <condition_variable>
#include <deque>
#include <mutex>

namespace dmoe {

void SchedulerLoop::Start() {
  stop_ = false;
  thread_ = std::thread([this] {
    while (!stop_) {
      auto more = scheduler_->Step();
      // Idle (or an engine error, already reported to its requests): wait a little.
      if (!more.ok() || !*more) std::this_thread::sleep_for(std::chrono::milliseconds(1));
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
  s.logprobs = p.logprobs();
  s.top_logprobs = p.top_logprobs();
  return s;
}

namespace {

grpc::StatusCode ToGrpc(absl::StatusCode c) { return static_cast<grpc::StatusCode>(c); }

// One streaming Generate call. The scheduler's callbacks queue responses; one write is in flight
// at a time. The reactor deletes itself in OnDone, which gRPC calls after Finish; Finish is only
// called after the scheduler's on_finish, so no callback outlives the reactor.
class GenerateReactor : public grpc::ServerWriteReactor<internal::GenerateResponse> {
 public:
  GenerateReactor(Scheduler* scheduler, const internal::GenerateRequest* request)
      : scheduler_(scheduler) {
    RequestCallbacks cb;
    cb.on_token = [this](const SampledToken& t) {
      internal::GenerateResponse r;
      auto* g = r.add_tokens();
      g->set_token_id(t.token);
      g->set_logprob(t.logprob);
      for (const auto& [id, lp] : t.top) {
        auto* top = g->add_top();
        top->set_token_id(id);
        top->set_logprob(lp);
      }
      Push(std::move(r));
    };
    cb.on_finish = [this](FinishReason reason, const absl::Status& st) {
      std::lock_guard<std::mutex> l(mu_);
      finished_ = true;
      if (reason == FinishReason::kError) {
        final_status_ = grpc::Status(ToGrpc(st.code()), std::string(st.message()));
      } else if (reason == FinishReason::kCancelled && cancelled_by_client_) {
        final_status_ = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      } else {
        internal::GenerateResponse r;
        r.set_finish_reason(FinishReasonName(reason));
        queue_.push_back(std::move(r));
      }
      MaybeWriteLocked();
    };
    std::vector<int32_t> prompt(request->prompt_token_ids().begin(),
                                request->prompt_token_ids().end());
    // Held across Submit: the scheduler's callbacks wait until the first message is queued.
    std::lock_guard<std::mutex> l(mu_);
    auto id = scheduler_->Submit(std::move(prompt), FromProto(request->sampling()), cb);
    if (!id.ok()) {
      finished_ = true;
      final_status_ = grpc::Status(ToGrpc(id.status().code()), std::string(id.status().message()));
      MaybeWriteLocked();
      return;
    }
    id_ = *id;
    internal::GenerateResponse first;
    first.set_request_id(id_);
    queue_.push_front(std::move(first));
    MaybeWriteLocked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> l(mu_);
    writing_ = false;
    if (!ok) {  // the client went away
      if (!finished_) scheduler_->Cancel(id_);
      broken_ = true;
    }
    MaybeWriteLocked();
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> l(mu_);
    cancelled_by_client_ = true;
    if (!finished_ && id_ != 0) scheduler_->Cancel(id_);
  }

  void OnDone() override { delete this; }

 private:
  void Push(internal::GenerateResponse r) {
    std::lock_guard<std::mutex> l(mu_);
    queue_.push_back(std::move(r));
    MaybeWriteLocked();
  }

  // REQUIRES: mu_ held.
  void MaybeWriteLocked() {
    if (writing_ || finish_sent_) return;
    if (!queue_.empty() && !broken_) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      StartWrite(&current_);
      return;
    }
    if (finished_ && (queue_.empty() || broken_)) {
      finish_sent_ = true;
      Finish(final_status_);
    }
  }

  Scheduler* scheduler_;
  std::mutex mu_;
  uint64_t id_ = 0;
  std::deque<internal::GenerateResponse> queue_;
  internal::GenerateResponse current_;
  bool writing_ = false;
  bool finished_ = false;
  bool finish_sent_ = false;
  bool broken_ = false;
  bool cancelled_by_client_ = false;
  grpc::Status final_status_ = grpc::Status::OK;
};

}  // namespace

grpc::ServerWriteReactor<internal::GenerateResponse>* AttentionServiceImpl::Generate(
    grpc::CallbackServerContext*, const internal::GenerateRequest* request) {
  return new GenerateReactor(scheduler_, request);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Cancel(grpc::CallbackServerContext* ctx,
                                                       const internal::CancelRequest* request,
                                                       internal::CancelReply*) {
  scheduler_->Cancel(request->request_id());
  auto* r = ctx->DefaultReactor();
  r->Finish(grpc::Status::OK);
  return r;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetLoad(grpc::CallbackServerContext* ctx,
                                                        const internal::GetLoadRequest*,
                                                        internal::GetLoadReply* reply) {
  const SchedulerLoad load = scheduler_->load();
  const SchedulerStats stats = scheduler_->stats();
  reply->set_free_blocks(load.free_blocks);
  reply->set_total_blocks(load.total_blocks);
  reply->set_running(load.running);
  reply->set_waiting(load.waiting);
  reply->set_queued_prefill_tokens(load.queued_prefill_tokens);
  reply->set_prefilled_tokens(stats.prefilled_tokens);
  reply->set_prefix_hit_tokens(stats.prefix_hit_tokens);
  reply->set_generated_tokens(stats.generated_tokens);
  reply->set_preemptions(stats.preemptions);
  reply->set_kv_bytes_per_token(load.kv_bytes_per_token);
  reply->set_block_tokens(load.block_tokens);
  auto* r = ctx->DefaultReactor();
  r->Finish(grpc::Status::OK);
  return r;
}

}  // namespace dmoe
