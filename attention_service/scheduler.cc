#include "attention_service/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "common/status_macros.h"

namespace dmoe {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "?";
}

struct Scheduler::Seq {
  Seq(uint64_t id_in, std::vector<int32_t> prompt, const SamplingParams& p, RequestCallbacks cb,
      LatentKvCache* cache)
      : id(id_in),
        tokens(std::move(prompt)),
        prompt_len(static_cast<int64_t>(tokens.size())),
        params(p),
        sampler(p, tokens),
        callbacks(std::move(cb)),
        kv(cache) {}
  uint64_t id;
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int64_t prompt_len;
  SamplingParams params;
  Sampler sampler;
  RequestCallbacks callbacks;
  PagedKvSequence kv;
  uint64_t admitted = 0;  // admission counter value: larger = admitted later
  // Since when its steps have failed for unreachable experts (epoch: not stalled).
  std::chrono::steady_clock::time_point stalled_since{};
  int64_t generated() const { return static_cast<int64_t>(tokens.size()) - prompt_len; }
  // Tokens not yet in the cache.
  int64_t pending() const { return static_cast<int64_t>(tokens.size()) - kv.length(); }
};

Scheduler::Scheduler(Engine* engine, LatentKvCache* cache, SchedulerOptions options)
    : engine_(engine), cache_(cache), options_(options), config_(engine->config()) {
  load_.total_blocks = cache_->total_blocks();
  load_.free_blocks = cache_->free_blocks();
  load_.kv_bytes_per_token = cache_->bytes_per_token();
  load_.block_tokens = cache_->block_tokens();
}

Scheduler::~Scheduler() = default;

int64_t Scheduler::BlocksFor(int64_t tokens) const {
  return (tokens + cache_->block_tokens() - 1) / cache_->block_tokens();
}

absl::StatusOr<uint64_t> Scheduler::Submit(std::vector<int32_t> prompt,
                                           const SamplingParams& params,
                                           RequestCallbacks callbacks) {
  if (auto st = ValidateRequest(prompt, params, config_); !st.ok()) return st;
  const int64_t need = BlocksFor(static_cast<int64_t>(prompt.size()) + params.max_tokens);
  if (need > cache_->total_blocks()) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens: prompt + max_tokens needs ", need,
                                                   " KV blocks; the cache has ",
                                                   cache_->total_blocks()));
  }
  MutexLock l(&mu_);
  if (draining_) {
    return absl::UnavailableError("this attention node is shutting down; retry on another");
  }
  const uint64_t id = next_id_++;
  load_.queued_prefill_tokens += static_cast<int64_t>(prompt.size());
  ++load_.waiting;
  incoming_.push_back(
      std::make_unique<Seq>(id, std::move(prompt), params, std::move(callbacks), cache_));
  work_cv_.Signal();
  return id;
}

void Scheduler::Drain() {
  MutexLock l(&mu_);
  draining_ = true;
}

void Scheduler::Cancel(uint64_t id) {
  MutexLock l(&mu_);
  cancelled_.insert(id);
  work_cv_.Signal();
}

bool Scheduler::WaitForWork(std::chrono::milliseconds timeout) {
  MutexLock l(&mu_);
  auto has_work = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !incoming_.empty() || !cancelled_.empty();
  };
  if (has_work()) return true;
  ++idle_waiters_;
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (!has_work() && work_cv_.WaitUntil(&mu_, until)) {
  }
  --idle_waiters_;
  return has_work();
}

int Scheduler::idle_waiters() const {
  MutexLock l(&mu_);
  return idle_waiters_;
}

SchedulerLoad Scheduler::load() const {
  MutexLock l(&mu_);
  return load_;
}

SchedulerStats Scheduler::stats() const {
  MutexLock l(&mu_);
  return stats_;
}

void Scheduler::Finish(Seq* s, FinishReason reason, const absl::Status& st) {
  s->kv.Release();
  if (s->callbacks.on_finish) s->callbacks.on_finish(reason, st);
  MutexLock l(&mu_);
  ++stats_.finished;
}

void Scheduler::Preempt(Seq* s) {
  // Free everything; the tokens (prompt + generated so far) are recomputed when readmitted.
  s->kv.Release();
  MutexLock l(&mu_);
  ++stats_.preemptions;
}

void Scheduler::TakeIncomingAndCancel() {
  std::set<uint64_t> cancelled;
  {
    MutexLock l(&mu_);
    while (!incoming_.empty()) {
      waiting_.push_back(std::move(incoming_.front()));
      incoming_.pop_front();
    }
    cancelled.swap(cancelled_);
  }
  if (cancelled.empty()) return;
  auto cancel = [&](std::unique_ptr<Seq>& s) {
    if (s && cancelled.count(s->id)) {
      Finish(s.get(), FinishReason::kCancelled, absl::OkStatus());
      s.reset();
    }
  };
  for (auto& s : running_) cancel(s);
  for (auto& s : waiting_) cancel(s);
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), nullptr), waiting_.end());
}

void Scheduler::Admit() {
  // In order, while there is room in the batch and blocks for the whole prompt.
  int64_t reserved_blocks = 0;
  for (const auto& s : running_) {
    reserved_blocks += std::max<int64_t>(0, BlocksFor(static_cast<int64_t>(s->tokens.size()) + 1) -
                                                static_cast<int64_t>(s->kv.block_table().size()));
  }
  while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < options_.max_running) {
    Seq* s = waiting_.front().get();
    const int64_t need = BlocksFor(static_cast<int64_t>(s->tokens.size()) + 1);
    if (need + reserved_blocks > cache_->free_blocks() && !running_.empty()) break;
    reserved_blocks += need;
    const bool first_admission = s->admitted == 0;
    s->admitted = ++admit_counter_;
    // Prefix caching: reuse the cached blocks of the longest matching prefix.
    const int64_t hit = s->kv.AttachPrefix(s->tokens);
    if (hit > 0) {
      MutexLock l(&mu_);
      stats_.prefix_hit_tokens += static_cast<uint64_t>(hit);
    }
    if (first_admission && s->callbacks.on_admit) s->callbacks.on_admit(hit);
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

void Scheduler::ComposeBatch(std::vector<SequenceStep>* batch, std::vector<Seq*>* members) {
  batch->clear();
  members->clear();
  std::sort(running_.begin(), running_.end(),
            [](const auto& a, const auto& b) { return a->admitted < b->admitted; });
  int64_t budget = options_.step_token_budget;
  for (auto& s : running_) {
    if (s->pending() == 1) {
      batch->push_back(SequenceStep{&s->kv, {s->tokens.back()}, false});
      members->push_back(s.get());
      --budget;
    }
  }
  for (auto& s : running_) {
    if (s->pending() <= 1 || budget <= 0) continue;
    const int64_t n = std::min({s->pending(), options_.prefill_chunk, budget});
    const int64_t from = s->kv.length();
    batch->push_back(SequenceStep{
        &s->kv, std::vector<int32_t>(s->tokens.begin() + from, s->tokens.begin() + from + n),
        false});
    members->push_back(s.get());
    budget -= n;
  }
}

bool Scheduler::PlanBatch(std::vector<SequenceStep>* batch, std::vector<Seq*>* members) {
  // Every decoding sequence gets one token, then prefill chunks in admission order within the
  // token budget. Room in the cache is reserved up front; when it runs out, the latest-admitted
  // sequence is preempted and the plan is made again.
  for (;;) {
    ComposeBatch(batch, members);
    Seq* victim = nullptr;
    for (size_t i = 0; i < batch->size(); ++i) {
      if (!(*members)[i]->kv.Reserve(static_cast<int64_t>((*batch)[i].tokens.size())).ok()) {
        victim = running_.back().get();  // latest admitted
        break;
      }
    }
    if (victim == nullptr) return true;
    if (running_.size() == 1) {
      // Alone and still too big: the cache can never hold it.
      Finish(victim, FinishReason::kError,
             absl::ResourceExhaustedError("the KV cache cannot hold this request"));
      running_.clear();
      return false;
    }
    Preempt(victim);
    waiting_.push_front(std::move(running_.back()));
    running_.pop_back();
  }
}

absl::Status Scheduler::RunEngine(std::vector<SequenceStep>* steps,
                                  std::vector<std::vector<float>>* logits) {
  if (options_.experts_b == nullptr || steps->size() < 2) return engine_->Step(*steps, logits);
  const std::vector<SequenceStep>& batch = *steps;
  // Two micro-batches of about equal tokens.
  std::vector<SequenceStep> half[2];
  std::vector<size_t> index[2];
  int64_t tokens[2] = {0, 0};
  for (size_t i = 0; i < batch.size(); ++i) {
    const int side = tokens[0] <= tokens[1] ? 0 : 1;
    tokens[side] += static_cast<int64_t>(batch[i].tokens.size());
    half[side].push_back(batch[i]);
    index[side].push_back(i);
  }
  std::vector<std::vector<float>> out[2];
  RETURN_IF_ERROR(engine_->StepPingPong(half[0], half[1], options_.experts_b, &out[0], &out[1]));
  logits->resize(batch.size());
  for (int side = 0; side < 2; ++side) {
    for (size_t j = 0; j < index[side].size(); ++j) {
      (*logits)[index[side][j]] = std::move(out[side][j]);
    }
  }
  return absl::OkStatus();
}

void Scheduler::Stall(const std::vector<Seq*>& members, const absl::Status& st) {
  // Nothing was committed (KV lengths and samplers are unchanged), so the step is simply retried
  // until the experts are reachable again or the wait runs out.
  const auto now = options_.clock->Now();
  std::vector<Seq*> expired;
  double longest = 0;
  for (Seq* s : members) {
    if (s->stalled_since == std::chrono::steady_clock::time_point{}) s->stalled_since = now;
    const auto waited = now - s->stalled_since;
    longest = std::max(longest, std::chrono::duration<double>(waited).count());
    if (waited > options_.expert_wait) expired.push_back(s);
  }
  for (Seq* s : expired) {
    Finish(s, FinishReason::kError,
           absl::UnavailableError(absl::StrCat(
               "experts unreachable for ", options_.expert_wait.count(), " ms: ", st.message())));
    for (auto& r : running_) {
      if (r.get() == s) r.reset();
    }
  }
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  MutexLock l(&mu_);
  ++stats_.stalled_steps;
  stats_.longest_stall_seconds = std::max(stats_.longest_stall_seconds, longest);
  load_.running = static_cast<int64_t>(running_.size());
}

void Scheduler::FailAll(const std::vector<Seq*>& members, const absl::Status& st) {
  for (Seq* s : members) Finish(s, FinishReason::kError, st);
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [&](const auto& s) {
                                  return std::find(members.begin(), members.end(), s.get()) !=
                                         members.end();
                                }),
                 running_.end());
}

// Samples the next token of every sequence whose prompt is complete; finishes the ones that
// stop or reach their length.
Scheduler::Committed Scheduler::Commit(const std::vector<SequenceStep>& batch,
                                       const std::vector<Seq*>& members,
                                       const std::vector<std::vector<float>>& logits) {
  Committed c;
  for (size_t i = 0; i < members.size(); ++i) {
    Seq* s = members[i];
    if (s->stalled_since != std::chrono::steady_clock::time_point{}) {
      c.resumed_after =
          std::max(c.resumed_after,
                   std::chrono::duration<double>(options_.clock->Now() - s->stalled_since).count());
      s->stalled_since = {};
    }
    c.computed += batch[i].tokens.size();
    s->kv.RegisterFullBlocks(s->tokens);
    if (s->pending() != 0) continue;  // more prompt to prefill
    const SampledToken t = s->sampler.Sample(logits[i].data(), config_.vocab_size);
    s->tokens.push_back(t.token);
    ++c.generated;
    if (s->callbacks.on_token) s->callbacks.on_token(t);
    if (IsStopToken(s->params, config_, t.token)) {
      Finish(s, FinishReason::kStop, absl::OkStatus());
    } else if (s->generated() >= s->params.max_tokens ||
               static_cast<int64_t>(s->tokens.size()) >= config_.max_position_embeddings) {
      Finish(s, FinishReason::kLength, absl::OkStatus());
    } else {
      continue;
    }
    for (auto& r : running_) {
      if (r.get() == s) r.reset();
    }
  }
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  return c;
}

void Scheduler::PublishLoad(const Committed* c) {
  MutexLock l(&mu_);
  if (c != nullptr) {
    stats_.longest_stall_seconds = std::max(stats_.longest_stall_seconds, c->resumed_after);
    ++stats_.steps;
    stats_.prefilled_tokens += c->computed;
    stats_.generated_tokens += c->generated;
  }
  load_.running = static_cast<int64_t>(running_.size());
  load_.waiting = static_cast<int64_t>(waiting_.size() + incoming_.size());
  load_.free_blocks = cache_->free_blocks();
  if (c == nullptr) return;  // idle: the queued count is as it was
  int64_t queued = 0;
  for (const auto& s : waiting_) queued += s->pending();
  for (const auto& s : running_) queued += std::max<int64_t>(0, s->pending() - 1);
  for (const auto& s : incoming_) queued += s->pending();
  load_.queued_prefill_tokens = queued;
}

absl::StatusOr<bool> Scheduler::Step() {
  if (options_.between_steps) options_.between_steps();
  TakeIncomingAndCancel();
  Admit();
  if (running_.empty()) {
    PublishLoad(nullptr);
    return false;
  }
  std::vector<SequenceStep> batch;
  std::vector<Seq*> members;
  if (!PlanBatch(&batch, &members)) return true;
  std::vector<std::vector<float>> logits;
  const absl::Status st = RunEngine(&batch, &logits);
  const bool experts_down = st.code() == absl::StatusCode::kUnavailable ||
                            st.code() == absl::StatusCode::kDeadlineExceeded;
  if (!st.ok() && experts_down && options_.expert_wait.count() > 0) {
    Stall(members, st);
    return st;
  }
  if (!st.ok()) {
    FailAll(members, st);
    return st;
  }
  const Committed c = Commit(batch, members, logits);
  PublishLoad(&c);
  return true;
}

}  // namespace dmoe
