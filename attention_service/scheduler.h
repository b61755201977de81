// The attention node's scheduler: continuous batching over a paged latent KV cache. Requests join
// and leave between steps; prompts are prefilled in chunks under a per-step token budget; requests
// are admitted while KV blocks are free, preempted (blocks freed, recomputed later) when the cache
// runs out, and cancelled with their blocks freed before the next step. Full blocks are shared
// between requests with the same prefix (LatentKvCache's prefix cache).
//
// Thread safety: Submit, Cancel and load() may be called from any thread; Step from one thread.
#ifndef DMOE_ATTENTION_SERVICE_SCHEDULER_H_
#define DMOE_ATTENTION_SERVICE_SCHEDULER_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attention_service/engine.h"
#include "attention_service/json_constraint.h"
#include "attention_service/kv_cache.h"
#include "attention_service/sampler.h"
#include "common/clock.h"
#include "common/mutex.h"

namespace dmoe {

enum class FinishReason { kLength, kStop, kCancelled, kError };
const char* FinishReasonName(FinishReason r);

struct RequestCallbacks {
  // Each generated token, in order (on the scheduler's thread).
  std::function<void(const SampledToken&)> on_token;
  // SamplingParams::prompt_logprobs: the prompt tokens from the second on, scored (Sampler::
  // Score), in order, a step's at a time, all before the first on_token (scheduler's thread).
  std::function<void(const std::vector<SampledToken>&)> on_prompt_tokens;
  // Once, when the request is first admitted to the running batch (on the scheduler's thread):
  // how many of its prompt tokens were found in the prefix cache.
  std::function<void(int64_t prefix_hit_tokens)> on_admit;
  // Exactly once, last. `status` is OK unless reason is kError.
  std::function<void(FinishReason, const absl::Status&)> on_finish;
};

struct SchedulerOptions {
  int64_t max_running = 64;  // sequences in the running batch
  // Requests admitted but not yet running; more are UNAVAILABLE (the gateway tries another node).
  // 0: no limit.
  int64_t max_waiting = 4096;
  int64_t step_token_budget = 512;  // tokens (decode + prefill) per engine step
  int64_t prefill_chunk = 256;      // most prompt tokens of one sequence per step
  // When set (remote experts), a step with 2+ sequences runs as two micro-batches in ping-pong:
  // one micro-batch's attention overlaps the other's round trip to the experts.
  RoutedExperts* experts_b = nullptr;
  // Called at the start of every step, before the batch is formed (e.g. to switch to a new
  // expert placement between steps).
  std::function<void()> between_steps;
  // When a step fails because experts are unreachable (UNAVAILABLE / DEADLINE_EXCEEDED), its
  // sequences pause with their KV intact and the step is retried, for at most this long per
  // sequence; then they end with UNAVAILABLE. 0: they fail at once.
  std::chrono::milliseconds expert_wait{0};
  // Measures those stalls (a ManualClock in tests).
  const Clock* clock = Clock::Real();
  // Speculative decoding with the model's MTP layer (DeepSeek-V3): up to this many tokens
  // drafted per decoding sequence and step, verified by the main model in the next step (0:
  // off). Needs an engine with an MTP layer and `mtp_cache`; otherwise it stays off.
  int64_t speculative_tokens = 0;
  // The MTP layer's latent cache: one layer (Engine::MtpCacheConfig), the main cache's block
  // size, MtpCacheBlocks() blocks (enough that it never runs out before the main cache).
  LatentKvCache* mtp_cache = nullptr;
  // Benchmarks only: accept this fraction of drafts whatever the model says (the rest are
  // rejected); < 0: the verification rule. Outputs are then wrong by design.
  double force_accept = -1;
  // Tests only: replaces a sequence's drafts after the MTP layer made them (request id, its
  // tokens so far — the first draft is for position tokens.size() — and the drafts); greedy
  // output must not change whatever it does, nor sampling's distribution.
  std::function<void(uint64_t, const std::vector<int32_t>&, std::vector<int32_t>*)> draft_hook;
  // Each token's text ("" for special tokens; null: no tokenizer): what JSON mode
  // (SamplingParams::json_object) checks tokens against. Not owned.
  const std::vector<std::string>* token_bytes = nullptr;
};

// Blocks for SchedulerOptions::mtp_cache given the main cache's: MTP blocks are shared by
// prefix like the main ones, except each sequence's last one (keyed by one more token), and
// drafting writes up to speculative_tokens rows past the main length.
int64_t MtpCacheBlocks(int64_t main_blocks, int64_t block_tokens, const SchedulerOptions& o);

struct SchedulerLoad {
  uint64_t kv_bytes_per_token = 0;
  int64_t block_tokens = 0;
  int64_t free_blocks = 0;
  int64_t total_blocks = 0;
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t queued_prefill_tokens = 0;  // prompt tokens not yet in the cache
  bool draining = false;              // Drain() was called: nothing new is admitted
  // Sequences waiting now for unreachable experts (SchedulerOptions::expert_wait), and the
  // longest of their waits so far (0 when none): what an alert on a stall in progress reads.
  int64_t stalled = 0;
  double current_stall_seconds = 0;
};

struct SchedulerStats {
  uint64_t steps = 0;
  uint64_t prefilled_tokens = 0;   // tokens computed through the model (prompts and recompute)
  uint64_t prefix_hit_tokens = 0;  // prompt tokens found in the prefix cache (not computed)
  uint64_t generated_tokens = 0;
  uint64_t preemptions = 0;
  uint64_t finished = 0;
  uint64_t stalled_steps = 0;        // steps retried because experts were unreachable
  double longest_stall_seconds = 0;  // longest time a sequence waited for experts, ever
  // Speculative decoding: tokens drafted by the MTP layer, drafts the main model accepted, and
  // the sequence-steps that verified drafts (tokens per such step: 1 + accepted / steps).
  uint64_t drafted_tokens = 0;
  uint64_t accepted_tokens = 0;
  uint64_t speculative_steps = 0;
};

class Scheduler {
 public:
  Scheduler(StepEngine* engine, LatentKvCache* cache, SchedulerOptions options);
  ~Scheduler();

  // Validates (INVALID_ARGUMENT naming the field) and queues a request; returns its id.
  // A max_tokens_up_to_cache request's max_tokens is lowered to what one sequence fits in the
  // cache (OUT_OF_RANGE when its prompt leaves no room).
  absl::StatusOr<uint64_t> Submit(std::vector<int32_t> prompt, SamplingParams params,
                                  RequestCallbacks callbacks);
  // Ends a request: its blocks are freed and on_finish(kCancelled) runs at the next Step.
  void Cancel(uint64_t id);
  // Stops admitting: Submit returns UNAVAILABLE from now on (the gateway retries elsewhere), and
  // requests already accepted run to completion. With `hand_back_queued`, those queued that have
  // produced no token yet end UNAVAILABLE at the next Step instead, so that the gateway retries
  // them on another node at once rather than their waiting out the drain behind the running
  // ones (only where another node can take them: with none, they fail).
  void Drain(bool hand_back_queued = false);
  // Ends every request it holds, running or waiting, with `status` at the next Step (their
  // blocks freed): at the end of a drain, so that what could not finish in time ends with a
  // status the gateway acts on (UNAVAILABLE before the first token: retried elsewhere) rather than
  // with the process.
  void EndAll(absl::Status status);
  // Runs one engine step over the current batch. Returns false when there was nothing to do.
  // An engine error fails the requests of that step (kError) and is returned.
  absl::StatusOr<bool> Step();
  // For the scheduler thread after a Step that found nothing to do: returns as soon as a request
  // is submitted or cancelled, or after `timeout` (so that between_steps still runs now and then).
  // Returns true when there is work (at once if there was already), false after the timeout.
  bool WaitForWork(std::chrono::milliseconds timeout);
  // Threads blocked in WaitForWork now (tests: to submit only once the waiter sleeps).
  int idle_waiters() const;
  SchedulerLoad load() const;
  SchedulerStats stats() const;

 private:
  struct Seq;
  void AdmitLocked();
  // The phases of Step, in order.
  struct Committed {
    uint64_t computed = 0, generated = 0;
    uint64_t drafted = 0, accepted = 0, speculative = 0;
    double resumed_after = 0;  // longest stall that ended with this step
  };
  void TakeIncomingAndCancel();
  // Drain's hand-back: ends the waiting sequences without a token yet, UNAVAILABLE.
  void HandBackQueued();
  void Admit();
  void ComposeBatch(std::vector<SequenceStep>* batch, std::vector<Seq*>* members);
  // False when the batch's only sequence can never fit the cache (it was ended).
  bool PlanBatch(std::vector<SequenceStep>* batch, std::vector<Seq*>* members);
  absl::Status RunEngine(std::vector<SequenceStep>* batch, std::vector<std::vector<float>>* logits);
  void Stall(const std::vector<Seq*>& members, const absl::Status& st);
  void FailAll(const std::vector<Seq*>& members, const absl::Status& st);
  Committed Commit(const std::vector<SequenceStep>& batch, const std::vector<Seq*>& members,
                   const std::vector<std::vector<float>>& logits);
  // One sequence's part of Commit: verifies its drafts, samples, truncates rejected rows, keeps
  // the hidden states the MTP layer needs. True when the sequence finished.
  bool CommitSequence(const SequenceStep& step, Seq* s, const std::vector<float>& logits,
                      Committed* c);
  // Speculative decoding, after the main step: the MTP layer over every position the main
  // model computed (its rows, and the next drafts of decoding sequences). All or nothing: on
  // error no MTP row or draft changed, and those sequences wait (skip main steps) until it
  // succeeds.
  absl::Status RunMtp();
  absl::Status RunMtpPhase();
  // prompt_logprobs: scores the prompt tokens that the step's `rows` rows (from position
  // `first`, logits at every one) predict and that were not scored yet.
  void ScorePrompt(Seq* s, int64_t first, int64_t rows, const std::vector<float>& logits);
  static constexpr int64_t kScoredChunk = 64;  // scored rows per step, all sequences together
  // Appends the first `rows` hidden states of the step to what the MTP layer will read.
  void KeepHiddenForMtp(Seq* s, int64_t rows);
  absl::Status DraftMore(const std::vector<Seq*>& members, int64_t round);
  void AfterStepError(const std::vector<Seq*>& members, const absl::Status& st);
  // JSON mode: `row` with the tokens that cannot come next at -infinity (in json_logits_); null
  // when no token can (the answer then ends).
  const float* JsonMasked(Seq* s, const float* row);
  // Benchmarks' forced verdict (+1 accept, -1 reject), 0 for the rule.
  int ForcedVerdict();
  // Load and counters for GetLoad and metrics; `c` null for an idle step.
  void PublishLoad(const Committed* c) ABSL_LOCKS_EXCLUDED(mu_);
  // load_'s stalled and current_stall_seconds from the running sequences (scheduler thread).
  void PublishStalls() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Releases the sequence's KV and runs MarkDone.
  void Finish(Seq* s, FinishReason reason, const absl::Status& st);
  // Once per sequence: done, on_finish(reason, st), counted as finished.
  void MarkDone(Seq* s, FinishReason reason, const absl::Status& st);
  void Preempt(Seq* s);
  int64_t BlocksFor(int64_t tokens) const;

  StepEngine* engine_;
  LatentKvCache* cache_;
  SchedulerOptions options_;
  const ModelConfig& config_;

  mutable Mutex mu_;
  CondVar work_cv_;                            // incoming_ or cancelled_ gained an entry
  int idle_waiters_ ABSL_GUARDED_BY(mu_) = 0;  // threads in WaitForWork
  std::deque<std::unique_ptr<Seq>> incoming_ ABSL_GUARDED_BY(mu_);
  std::set<uint64_t> cancelled_ ABSL_GUARDED_BY(mu_);
  absl::Status end_all_ ABSL_GUARDED_BY(mu_);  // EndAll's status, until the next Step takes it
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool hand_back_ ABSL_GUARDED_BY(mu_) = false;  // Drain was called; the next Step hands back
  SchedulerLoad load_ ABSL_GUARDED_BY(mu_);
  SchedulerStats stats_ ABSL_GUARDED_BY(mu_);

  // Scheduler thread only.
  std::deque<std::unique_ptr<Seq>> waiting_;  // admission order; preempted ones go first
  std::vector<std::unique_ptr<Seq>> running_;
  uint64_t admit_counter_ = 0;
  bool speculative_ = false;
  uint64_t force_counter_ = 0;
  std::vector<float> mtp_in_;              // the hidden states of an MTP step, in batch order
  std::unique_ptr<JsonVocab> json_vocab_;  // of options_.token_bytes, when given
  std::vector<float> json_logits_;         // JsonMasked's
  std::vector<uint8_t> json_allowed_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_SCHEDULER_H_
