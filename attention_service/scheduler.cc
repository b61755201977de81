#include "attention_service/scheduler.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "attention_service/json_constraint.h"
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
      LatentKvCache* cache, LatentKvCache* mtp_cache)
      : id(id_in),
        tokens(std::move(prompt)),
        prompt_len(static_cast<int64_t>(tokens.size())),
        params(p),
        sampler(p, tokens),
        callbacks(std::move(cb)),
        kv(cache) {
    if (p.json_object) json = std::make_unique<JsonState>();
    if (mtp_cache != nullptr) {
      mtp = std::make_unique<PagedKvSequence>(mtp_cache);
      // An MTP row at position i depends on tokens 0..i+1: its blocks are keyed by the tokens
      // from 1 on, chained onto token 0.
      mtp->set_chain_seed(LatentKvCache::ChainHash(kMtpChainSalt, tokens.data(), 1));
    }
  }
  static constexpr uint64_t kMtpChainSalt = 0x6d74702d6b657973ull;
  uint64_t id;
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int64_t prompt_len;
  SamplingParams params;
  Sampler sampler;
  RequestCallbacks callbacks;
  PagedKvSequence kv;
  uint64_t admitted = 0;  // admission counter value: larger = admitted later
  // Finished (on_finish ran). With speculation a sequence stays in running_ so marked until the
  // end of its last step's MTP phase; no main step includes it.
  bool done = false;
  // Since when its steps have failed for unreachable experts (epoch: not stalled).
  std::chrono::steady_clock::time_point stalled_since{};
  int64_t generated() const { return static_cast<int64_t>(tokens.size()) - prompt_len; }
  // prompt_logprobs: the next prompt position to score (position 0 has no logprob).
  int64_t prompt_scored = 1;
  // Prompt positions are still to be scored: its prefill steps need logits at every position,
  // and it takes nothing from the prefix cache.
  bool scoring() const { return params.prompt_logprobs && prompt_scored < prompt_len; }
  // JSON mode: where the answer stands (null when off).
  std::unique_ptr<JsonState> json;
  // Tokens not yet in the cache.
  int64_t pending() const { return static_cast<int64_t>(tokens.size()) - kv.length(); }

  // Speculative decoding (null / empty when off).
  std::unique_ptr<PagedKvSequence> mtp;  // the MTP layer's rows, positions [0, mtp->length())
  std::vector<int32_t> draft;            // drafted tokens, verified by the next main step
  int64_t step_drafts = 0;               // drafts in the main step being run
  std::vector<float> hidden;             // the main step's final-normed hidden states
  std::vector<float> mtp_hidden;         // those of positions [mtp->length(), kv.length())
  std::vector<float> mtp_out;            // the MTP step's (the next drafting round's input)
  // How many drafts the next step may verify: it emits up to that + 1 tokens, within max_tokens
  // and max_position_embeddings.
  int64_t draft_room(int64_t max_positions) const {
    return std::min(params.max_tokens - generated(), max_positions - kv.length()) - 1;
  }
  // The MTP layer has not yet seen every position of the main cache: no main step until it has.
  bool mtp_behind() const { return mtp != nullptr && mtp->length() < kv.length(); }
  void ReleaseKv() {
    kv.Release();
    if (mtp == nullptr) return;
    mtp->Release();
    draft.clear();
    mtp_hidden.clear();
  }
};

int64_t MtpCacheBlocks(int64_t main_blocks, int64_t block_tokens, const SchedulerOptions& o) {
  return main_blocks +
         o.max_running * (2 + (o.speculative_tokens + block_tokens - 1) / block_tokens);
}

Scheduler::Scheduler(StepEngine* engine, LatentKvCache* cache, SchedulerOptions options)
    : engine_(engine), cache_(cache), options_(options), config_(engine->config()) {
  speculative_ =
      options_.speculative_tokens > 0 && options_.mtp_cache != nullptr && engine_->has_mtp();
  load_.total_blocks = cache_->total_blocks();
  load_.free_blocks = cache_->free_blocks();
  load_.kv_bytes_per_token = cache_->bytes_per_token();
  load_.block_tokens = cache_->block_tokens();
}

Scheduler::~Scheduler() = default;

int64_t Scheduler::BlocksFor(int64_t tokens) const {
  return (tokens + cache_->block_tokens() - 1) / cache_->block_tokens();
}

absl::StatusOr<uint64_t> Scheduler::Submit(std::vector<int32_t> prompt, SamplingParams params,
                                           RequestCallbacks callbacks) {
  if (auto st = ValidateRequest(prompt, params, config_); !st.ok()) return st;
  if (params.json_object && options_.token_bytes == nullptr) {
    return absl::FailedPreconditionError(
        "response_format: JSON mode (json_object, or a named tool_choice's arguments) needs the "
        "attention node's tokenizer (tokenizer.json in its checkpoint directory)");
  }
  const int64_t prompt_len = static_cast<int64_t>(prompt.size());
  int64_t need = BlocksFor(prompt_len + params.max_tokens);
  if (need > cache_->total_blocks() && params.max_tokens_up_to_cache) {
    // A default max_tokens (the rest of the context): as many as one sequence fits here.
    const int64_t room = cache_->total_blocks() * cache_->block_tokens() - prompt_len;
    if (room < 1) {
      return absl::OutOfRangeError(absl::StrCat(
          "prompt: ", prompt_len, " tokens leave no room for an answer in this node's KV cache of ",
          cache_->total_blocks() * cache_->block_tokens(), " tokens"));
    }
    params.max_tokens = room;
    need = BlocksFor(prompt_len + room);
  }
  if (need > cache_->total_blocks()) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens: prompt + max_tokens needs ", need,
                                                   " KV blocks; the cache has ",
                                                   cache_->total_blocks()));
  }
  MutexLock l(&mu_);
  if (draining_) {
    return absl::UnavailableError("this attention node is shutting down; retry on another");
  }
  if (options_.max_waiting > 0 && load_.waiting >= options_.max_waiting) {
    return absl::UnavailableError(absl::StrCat("this attention node has ", load_.waiting,
                                               " requests waiting (--max-waiting); retry on ",
                                               "another"));
  }
  const uint64_t id = next_id_++;
  load_.queued_prefill_tokens += static_cast<int64_t>(prompt.size());
  ++load_.waiting;
  incoming_.push_back(std::make_unique<Seq>(id, std::move(prompt), params, std::move(callbacks),
                                            cache_, speculative_ ? options_.mtp_cache : nullptr));
  work_cv_.Signal();
  return id;
}

void Scheduler::Drain(bool hand_back_queued) {
  MutexLock l(&mu_);
  draining_ = true;
  hand_back_ = hand_back_queued;
  load_.draining = true;
  work_cv_.Signal();
}

void Scheduler::Cancel(uint64_t id) {
  MutexLock l(&mu_);
  cancelled_.insert(id);
  work_cv_.Signal();
}

void Scheduler::EndAll(absl::Status status) {
  MutexLock l(&mu_);
  end_all_ = std::move(status);
  work_cv_.Signal();
}

bool Scheduler::WaitForWork(std::chrono::milliseconds timeout) {
  MutexLock l(&mu_);
  auto has_work = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !incoming_.empty() || !cancelled_.empty() || !end_all_.ok() || hand_back_;
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
  s->ReleaseKv();
  MarkDone(s, reason, st);
}

void Scheduler::MarkDone(Seq* s, FinishReason reason, const absl::Status& st) {
  if (s->done) return;  // its on_finish already ran
  s->done = true;
  if (s->callbacks.on_finish) s->callbacks.on_finish(reason, st);
  MutexLock l(&mu_);
  ++stats_.finished;
}

void Scheduler::Preempt(Seq* s) {
  // Free everything; the tokens (prompt + generated so far) are recomputed when readmitted (and
  // the MTP rows and drafts with them, to the same values).
  s->ReleaseKv();
  MutexLock l(&mu_);
  ++stats_.preemptions;
}

void Scheduler::TakeIncomingAndCancel() {
  std::set<uint64_t> cancelled;
  absl::Status end_all;
  bool hand_back;
  {
    MutexLock l(&mu_);
    while (!incoming_.empty()) {
      waiting_.push_back(std::move(incoming_.front()));
      incoming_.pop_front();
    }
    cancelled.swap(cancelled_);
    end_all = std::exchange(end_all_, absl::OkStatus());
    hand_back = std::exchange(hand_back_, false);
  }
  if (!end_all.ok()) {
    auto end = [&](auto& list) {
      for (auto& s : list) Finish(s.get(), FinishReason::kError, end_all);
      list.clear();
    };
    end(running_);
    end(waiting_);
    return;
  }
  if (!cancelled.empty()) {
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
  // After the cancellations: a cancelled request handed back would count as an error.
  if (hand_back) HandBackQueued();
}

void Scheduler::HandBackQueued() {
  const absl::Status st =
      absl::UnavailableError("this attention node is shutting down; retry on another");
  for (auto& s : waiting_) {
    if (s->generated() > 0) continue;  // preempted after tokens went out: it finishes here
    Finish(s.get(), FinishReason::kError, st);
    s.reset();
  }
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), nullptr), waiting_.end());
}

void Scheduler::Admit() {
  // In order, while there is room in the batch and blocks for the whole prompt.
  int64_t reserved_blocks = 0;
  // Room for every running sequence's next step, drafts included.
  const int64_t ahead = 1 + (speculative_ ? options_.speculative_tokens : 0);
  for (const auto& s : running_) {
    reserved_blocks +=
        std::max<int64_t>(0, BlocksFor(static_cast<int64_t>(s->tokens.size()) + ahead) -
                                 static_cast<int64_t>(s->kv.block_table().size()));
  }
  while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < options_.max_running) {
    Seq* s = waiting_.front().get();
    const int64_t need = BlocksFor(static_cast<int64_t>(s->tokens.size()) + 1);
    if (need + reserved_blocks > cache_->free_blocks() && !running_.empty()) break;
    reserved_blocks += need;
    const bool first_admission = s->admitted == 0;
    s->admitted = ++admit_counter_;
    // Prefix caching: reuse the cached blocks of the longest matching prefix (with speculative
    // decoding, no longer than the MTP layer's cached rows: positions attached have no hidden
    // states to compute MTP rows from).
    int64_t hit = s->scoring() ? 0 : s->kv.AttachPrefix(s->tokens);
    if (s->mtp != nullptr && hit > 0) {
      // MTP rows 0..P-1 are keyed by tokens 1..P; P <= hit <= n - 1, so every key is in range
      // (AttachPrefix's "leave one to compute" applies to the main cache, not to these).
      const int64_t n = static_cast<int64_t>(s->tokens.size());
      const int64_t mtp_hit = s->mtp->AttachPrefix(s->tokens.data() + 1, n, hit);
      if (mtp_hit < hit) {
        s->kv.Release();
        hit = s->kv.AttachPrefix(s->tokens.data(), n, mtp_hit);
      }
    }
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
    if (s->pending() == 1 && !s->mtp_behind()) {
      // JSON mode takes no drafts: each token's allowed set depends on the one before.
      if (s->json != nullptr) s->draft.clear();
      // With drafts: the last token and the drafts, logits at every position to verify them.
      SequenceStep step{&s->kv, {s->tokens.back()}, !s->draft.empty()};
      step.tokens.insert(step.tokens.end(), s->draft.begin(), s->draft.end());
      step.hidden = s->mtp != nullptr ? &s->hidden : nullptr;
      s->step_drafts = static_cast<int64_t>(s->draft.size());
      budget -= static_cast<int64_t>(step.tokens.size());
      batch->push_back(std::move(step));
      members->push_back(s.get());
    }
  }
  // Scored prompts' chunks have logits at every position: at most kScoredChunk such rows of
  // vocabulary-sized logits per step, all sequences together.
  int64_t scored_budget = kScoredChunk;
  for (auto& s : running_) {
    if (s->pending() <= 1 || budget <= 0 || s->mtp_behind()) continue;
    const int64_t chunk =
        s->scoring() ? std::min(options_.prefill_chunk, scored_budget) : options_.prefill_chunk;
    const int64_t n = std::min({s->pending(), chunk, budget});
    if (n <= 0) continue;  // this step's scored rows are taken
    if (s->scoring()) scored_budget -= n;
    const int64_t from = s->kv.length();
    SequenceStep step{&s->kv,
                      std::vector<int32_t>(s->tokens.begin() + from, s->tokens.begin() + from + n),
                      s->scoring()};
    step.hidden = s->mtp != nullptr ? &s->hidden : nullptr;
    s->step_drafts = 0;
    batch->push_back(std::move(step));
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
      // OUT_OF_RANGE: too long for this node, as a context overflow is (RESOURCE_EXHAUSTED
      // reads as a rate limit, and clients retry it).
      Finish(victim, FinishReason::kError,
             absl::OutOfRangeError(
                 absl::StrCat("max_tokens: the prompt and the tokens generated so far (",
                              victim->tokens.size(), ") do not fit this node's KV cache (",
                              cache_->total_blocks() * cache_->block_tokens(), " tokens)")));
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
  PublishStalls();
}

void Scheduler::PublishStalls() {
  const auto now = options_.clock->Now();
  int64_t stalled = 0;
  double longest = 0;
  for (const auto& s : running_) {
    if (s == nullptr || s->stalled_since == std::chrono::steady_clock::time_point{}) continue;
    ++stalled;
    longest = std::max(longest, std::chrono::duration<double>(now - s->stalled_since).count());
  }
  load_.stalled = stalled;
  load_.current_stall_seconds = longest;
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

int Scheduler::ForcedVerdict() {
  if (options_.force_accept < 0) return 0;
  // A fixed low-discrepancy sequence: exactly the asked fraction over any long run.
  const double x = static_cast<double>(force_counter_++) * 0.6180339887498949;
  return x - static_cast<double>(static_cast<uint64_t>(x)) < options_.force_accept ? 1 : -1;
}

bool Scheduler::CommitSequence(const SequenceStep& step, Seq* s, const std::vector<float>& logits,
                               Committed* c) {
  const int64_t m = static_cast<int64_t>(step.tokens.size());
  const int64_t k = s->step_drafts;
  const int64_t first = s->kv.length() - m;  // position of the step's first token
  s->step_drafts = 0;
  int64_t accepted = 0;
  if (step.all_logits && s->scoring() && k == 0) ScorePrompt(s, first, m, logits);
  if (s->pending() <= 0) {  // the prompt is complete: the next token (and the drafts' verdicts)
    const int64_t v = config_.vocab_size;
    const float* row0 = logits.data() + (static_cast<int64_t>(logits.size()) / v - 1 - k) * v;
    bool finished = false;
    FinishReason reason = FinishReason::kLength;
    int64_t verified = 0;
    for (int64_t j = 0; j <= k && !finished; ++j) {
      verified += j < k ? 1 : 0;
      bool ok = false;
      const float* row = row0 + j * v;
      if (s->json != nullptr && (row = JsonMasked(s, row)) == nullptr) {
        finished = true;  // no token can continue the object (not with this vocabulary)
        reason = FinishReason::kStop;
        break;
      }
      SampledToken t =
          j < k ? s->sampler.Verify(row, v, s->draft[static_cast<size_t>(j)], &ok, ForcedVerdict())
                : s->sampler.Sample(row, v);
      t.stop = IsStopToken(s->params, config_, t.token);
      s->tokens.push_back(t.token);
      ++c->generated;
      if (s->callbacks.on_token) s->callbacks.on_token(t);
      // JSON mode: the answer ends where the object closes.
      const bool closed = s->json != nullptr &&
                          s->json->Feed((*options_.token_bytes)[static_cast<size_t>(t.token)]) &&
                          s->json->complete();
      if (t.stop || closed) {
        finished = true;
        reason = FinishReason::kStop;
      } else if (s->generated() >= s->params.max_tokens ||
                 static_cast<int64_t>(s->tokens.size()) >= config_.max_position_embeddings) {
        finished = true;
      }
      if (!ok) break;
      ++accepted;
    }
    s->draft.clear();
    if (k > 0) {
      c->drafted += static_cast<uint64_t>(verified);  // a stop before a draft leaves it unjudged
      c->accepted += static_cast<uint64_t>(accepted);
      ++c->speculative;
      // The rows of rejected drafts. And when an accepted draft was the request's last token,
      // its row too: every cached position keeps a known next token (what the MTP layer reads).
      s->kv.Truncate(std::min(first + 1 + accepted, static_cast<int64_t>(s->tokens.size()) - 1));
    }
    if (finished) {
      s->kv.RegisterFullBlocks(s->tokens);  // committed rows: later requests may reuse them
      if (s->mtp == nullptr) {
        Finish(s, reason, absl::OkStatus());
        return true;
      }
      // Finished, but its KV stays until the MTP layer has seen this step's positions, so that
      // its MTP blocks are registered too (else a later request with this prefix could attach
      // no more main blocks than MTP ones). RunMtp releases it.
      MarkDone(s, reason, absl::OkStatus());
      KeepHiddenForMtp(s, s->kv.length() - first);
      return false;
    }
  }
  s->kv.RegisterFullBlocks(s->tokens);
  KeepHiddenForMtp(s, s->kv.length() - first);
  return false;
}

const float* Scheduler::JsonMasked(Seq* s, const float* row) {
  const int64_t v = config_.vocab_size;
  std::vector<int32_t> stops = s->params.stop_token_ids;
  for (int64_t id : config_.eos_token_ids) stops.push_back(static_cast<int32_t>(id));
  if (json_vocab_ == nullptr) json_vocab_ = std::make_unique<JsonVocab>(options_.token_bytes);
  JsonMask(*s->json, *json_vocab_, stops, &json_allowed_);
  json_logits_.assign(row, row + v);
  bool any = false;
  for (int64_t i = 0; i < v; ++i) {
    const bool ok = static_cast<size_t>(i) < json_allowed_.size() && json_allowed_[i] != 0;
    any |= ok;
    if (!ok) json_logits_[static_cast<size_t>(i)] = -std::numeric_limits<float>::infinity();
  }
  return any ? json_logits_.data() : nullptr;
}

void Scheduler::ScorePrompt(Seq* s, int64_t first, int64_t rows, const std::vector<float>& logits) {
  // Row j (position first + j) holds the distribution of the token at first + j + 1.
  const int64_t v = config_.vocab_size;
  std::vector<SampledToken> scores;
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t pos = first + j + 1;
    if (pos < s->prompt_scored || pos >= s->prompt_len) continue;
    scores.push_back(
        s->sampler.Score(logits.data() + j * v, v, s->tokens[static_cast<size_t>(pos)]));
    s->prompt_scored = pos + 1;
  }
  if (!scores.empty() && s->callbacks.on_prompt_tokens) s->callbacks.on_prompt_tokens(scores);
}

void Scheduler::KeepHiddenForMtp(Seq* s, int64_t rows) {
  if (s->mtp == nullptr) return;
  const size_t d = static_cast<size_t>(config_.hidden_size);
  s->mtp_hidden.insert(s->mtp_hidden.end(), s->hidden.begin(),
                       s->hidden.begin() + static_cast<ptrdiff_t>(d * rows));
}

// Samples the next token of every sequence whose prompt is complete (verifying drafts);
// finishes the ones that stop or reach their length.
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
    if (!CommitSequence(batch[i], s, logits[i], &c)) continue;
    for (auto& r : running_) {
      if (r.get() == s) r.reset();
    }
  }
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  return c;
}

absl::Status Scheduler::RunMtp() {
  const absl::Status st = RunMtpPhase();
  // Sequences that finished in this step leave now, their MTP rows registered (or not: on error).
  for (auto& s : running_) {
    if (s != nullptr && s->done) {
      s->ReleaseKv();
      s.reset();
    }
  }
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  return st;
}

absl::Status Scheduler::RunMtpPhase() {
  std::vector<SequenceStep> batch;
  std::vector<Seq*> members;
  mtp_in_.clear();
  for (auto& s : running_) {
    if (!s->mtp_behind()) continue;
    const int64_t from = s->mtp->length(), to = s->kv.length();
    if (to >= static_cast<int64_t>(s->tokens.size())) {  // CommitSequence keeps a next token
      return absl::InternalError(absl::StrCat("request ", s->id, ": ", to,
                                              " cached positions but only ", s->tokens.size(),
                                              " tokens: no next token for the MTP layer"));
    }
    if (!s->mtp->Reserve(to - from).ok()) {
      // Sized not to happen (MtpCacheBlocks); if it does, the sequence is recomputed later (a
      // finished one just leaves).
      if (s->done) {
        s->ReleaseKv();
        s.reset();
        continue;
      }
      Preempt(s.get());
      waiting_.push_front(std::move(s));
      continue;
    }
    // Position p takes token p + 1 (always known: the pending token or more prompt).
    SequenceStep step{
        s->mtp.get(),
        std::vector<int32_t>(s->tokens.begin() + from + 1, s->tokens.begin() + to + 1), false};
    step.hidden = &s->mtp_out;
    batch.push_back(std::move(step));
    members.push_back(s.get());
    mtp_in_.insert(mtp_in_.end(), s->mtp_hidden.begin(), s->mtp_hidden.end());
  }
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  if (batch.empty()) return absl::OkStatus();
  std::vector<int64_t> before(members.size());
  for (size_t i = 0; i < members.size(); ++i) before[i] = members[i]->mtp->length();
  std::vector<std::vector<float>> logits;
  absl::Status st = engine_->StepMtp(batch, mtp_in_.data(), &logits);
  // Drafts for the sequences that decode next: the argmax of the MTP logits, then more rounds.
  for (size_t i = 0; st.ok() && i < members.size(); ++i) {
    Seq* s = members[i];
    // (JSON mode takes no drafts: each token's allowed set depends on the one before.)
    if (!s->done && s->json == nullptr && s->pending() == 1 &&
        s->draft_room(config_.max_position_embeddings) > 0) {
      s->draft.assign(1, ArgMax(logits[i].data(), config_.vocab_size));
    }
  }
  for (int64_t round = 1; st.ok() && round < options_.speculative_tokens; ++round) {
    st = DraftMore(members, round);
  }
  for (size_t i = 0; i < members.size(); ++i) {
    Seq* s = members[i];
    if (!st.ok()) {  // all or nothing
      s->mtp->Truncate(before[i]);
      s->draft.clear();
      continue;
    }
    s->mtp->Truncate(s->kv.length());  // the drafting rounds' rows
    s->mtp->RegisterFullBlocks(s->tokens.data() + 1);
    if (options_.draft_hook && !s->draft.empty()) {
      options_.draft_hook(s->id, s->tokens, &s->draft);
      const int64_t room = std::max<int64_t>(0, s->draft_room(config_.max_position_embeddings));
      if (static_cast<int64_t>(s->draft.size()) > room) s->draft.resize(static_cast<size_t>(room));
    }
    s->mtp_hidden.clear();
    if (s->stalled_since != std::chrono::steady_clock::time_point{}) {
      const double waited =
          std::chrono::duration<double>(options_.clock->Now() - s->stalled_since).count();
      MutexLock l(&mu_);
      stats_.longest_stall_seconds = std::max(stats_.longest_stall_seconds, waited);
    }
    s->stalled_since = {};
  }
  if (!st.ok()) AfterStepError(members, st);
  return st;
}

absl::Status Scheduler::DraftMore(const std::vector<Seq*>& members, int64_t round) {
  // Round r drafts token r + 1 from the MTP layer's own output at the previous position (before
  // its shared_head.norm; the main model's hidden state there is not known yet).
  std::vector<SequenceStep> batch;
  std::vector<Seq*> drafting;
  mtp_in_.clear();
  const size_t d = static_cast<size_t>(config_.hidden_size);
  for (Seq* s : members) {
    if (static_cast<int64_t>(s->draft.size()) != round ||
        s->draft_room(config_.max_position_embeddings) <= round) {
      continue;
    }
    if (!s->mtp->Reserve(1).ok()) continue;  // sized not to happen; fewer drafts are still exact
    SequenceStep step{s->mtp.get(), {s->draft.back()}, false};
    mtp_in_.insert(mtp_in_.end(), s->mtp_out.end() - static_cast<ptrdiff_t>(d), s->mtp_out.end());
    step.hidden = &s->mtp_out;
    batch.push_back(std::move(step));
    drafting.push_back(s);
  }
  if (batch.empty()) return absl::OkStatus();
  std::vector<std::vector<float>> logits;
  RETURN_IF_ERROR(engine_->StepMtp(batch, mtp_in_.data(), &logits));
  for (size_t i = 0; i < drafting.size(); ++i) {
    drafting[i]->draft.push_back(ArgMax(logits[i].data(), config_.vocab_size));
  }
  return absl::OkStatus();
}

void Scheduler::AfterStepError(const std::vector<Seq*>& members, const absl::Status& st) {
  const bool experts_down = st.code() == absl::StatusCode::kUnavailable ||
                            st.code() == absl::StatusCode::kDeadlineExceeded;
  if (experts_down && options_.expert_wait.count() > 0) {
    Stall(members, st);
  } else {
    FailAll(members, st);
  }
}

void Scheduler::PublishLoad(const Committed* c) {
  MutexLock l(&mu_);
  if (c != nullptr) {
    stats_.longest_stall_seconds = std::max(stats_.longest_stall_seconds, c->resumed_after);
    ++stats_.steps;
    stats_.prefilled_tokens += c->computed;
    stats_.generated_tokens += c->generated;
    stats_.drafted_tokens += c->drafted;
    stats_.accepted_tokens += c->accepted;
    stats_.speculative_steps += c->speculative;
  }
  load_.running = static_cast<int64_t>(running_.size());
  load_.waiting = static_cast<int64_t>(waiting_.size() + incoming_.size());
  load_.free_blocks = cache_->free_blocks();
  PublishStalls();
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
  Committed c;
  if (!batch.empty()) {  // empty when every sequence waits for its MTP rows
    std::vector<std::vector<float>> logits;
    const absl::Status st = RunEngine(&batch, &logits);
    if (!st.ok()) {
      AfterStepError(members, st);
      return st;
    }
    c = Commit(batch, members, logits);
  }
  if (speculative_) {
    const absl::Status st = RunMtp();
    if (!st.ok()) {
      PublishLoad(&c);
      return st;
    }
  }
  PublishLoad(&c);
  return true;
}

}  // namespace dmoe
