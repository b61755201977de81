#include "attention_service/attention_metrics.h"

#include <chrono>

#include "common/mutex.h"

namespace dmoe {

AttentionMetrics::AttentionMetrics(Metrics* m, const ModelConfig& c) : m_(m), config_(c) {
  ttft_ = &m->Seconds("dmoe_attention_time_to_first_token_seconds",
                      "From a request's arrival to its first generated token");
  tpot_ = &m->Seconds("dmoe_attention_time_per_output_token_seconds",
                      "Gap between consecutive generated tokens of a request");
  step_ = &m->Seconds("dmoe_attention_step_seconds",
                      "Wall time of one engine step over the running batch (prefill chunks and "
                      "decode tokens together, expert round trips included)");
  running_ = &m->Gauge("dmoe_attention_running_sequences", "Sequences in the running batch");
  waiting_ = &m->Gauge("dmoe_attention_waiting_sequences", "Requests queued for admission");
  queued_ = &m->Gauge("dmoe_attention_queued_prefill_tokens", "Prompt tokens not yet in the cache");
  blocks_used_ = &m->Gauge("dmoe_attention_kv_blocks_used", "KV cache blocks in use");
  blocks_total_ = &m->Gauge("dmoe_attention_kv_blocks_total", "KV cache blocks");
  bytes_per_token_ = &m->Gauge("dmoe_attention_kv_bytes_per_token",
                               "Latent KV cache bytes per cached token (all layers)");
  prefilled_ = &m->Counter("dmoe_attention_prefilled_tokens_total",
                           "Tokens computed through the model (prompts and recomputation)");
  prefix_hits_ = &m->Counter("dmoe_attention_prefix_cache_hit_tokens_total",
                             "Prompt tokens served from the prefix cache");
  generated_ = &m->Counter("dmoe_attention_generated_tokens_total", "Tokens generated");
  preemptions_ = &m->Counter("dmoe_attention_preemptions_total", "Sequences preempted");
  drafted_ = &m->Counter("dmoe_attention_spec_drafted_tokens_total",
                         "Speculative decoding: tokens drafted by the MTP layer");
  accepted_ = &m->Counter("dmoe_attention_spec_accepted_tokens_total",
                          "Speculative decoding: drafted tokens the main model accepted");
  spec_steps_ = &m->Counter("dmoe_attention_spec_verify_steps_total",
                            "Speculative decoding: sequence-steps that verified drafts");
  acceptance_ = &m->Gauge("dmoe_attention_spec_acceptance_ratio",
                          "Speculative decoding: accepted / drafted tokens since start");
  tokens_per_step_ = &m->Gauge(
      "dmoe_attention_spec_tokens_per_step",
      "Speculative decoding: tokens generated per verifying sequence-step since start (1 + "
      "accepted / steps)");
  for (FinishReason r : {FinishReason::kLength, FinishReason::kStop, FinishReason::kCancelled,
                         FinishReason::kError}) {
    outcomes_.push_back(&m->Counter("dmoe_attention_requests_total", "Requests by outcome",
                                    {{"outcome", FinishReasonName(r)}}));
  }
  invalid_ =
      &m->Counter("dmoe_attention_requests_total", "Requests by outcome", {{"outcome", "invalid"}});
  refused_ =
      &m->Counter("dmoe_attention_requests_total", "Requests by outcome", {{"outcome", "refused"}});
  draining_ = &m->Gauge("dmoe_attention_draining",
                        "1 while the node drains (SIGTERM): it admits nothing new");
  expert_tokens_.resize(static_cast<size_t>(c.num_expert_layers() * c.n_routed_experts), nullptr);
  for (int64_t l = 0; l < c.num_expert_layers(); ++l) {
    if (!c.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      expert_tokens_[static_cast<size_t>(l * c.n_routed_experts + e)] =
          &m->Counter("dmoe_attention_expert_tokens_total", "Tokens routed to (layer, expert)",
                      {{"layer", std::to_string(l)}, {"expert", std::to_string(e)}});
    }
  }
  bytes_out_ =
      &m->Counter("dmoe_transport_bytes_total", "Data-plane bytes", {{"direction", "out"}});
  bytes_in_ = &m->Counter("dmoe_transport_bytes_total", "Data-plane bytes", {{"direction", "in"}});
  stalled_steps_ = &m->Counter("dmoe_attention_stalled_steps_total",
                               "Steps retried because an expert had no reachable replica");
  longest_stall_ = &m->Gauge("dmoe_attention_longest_stall_seconds",
                             "Longest time a sequence waited for unreachable experts since the "
                             "process started (never goes down; alert on the current one)");
  stalled_ = &m->Gauge("dmoe_attention_stalled_sequences",
                       "Sequences waiting now for unreachable experts");
  current_stall_ = &m->Gauge("dmoe_attention_current_stall_seconds",
                             "Longest wait so far of the sequences waiting now for unreachable "
                             "experts (0: none)");
  rerouted_ =
      &m->Counter("dmoe_transport_rerouted_pairs_total",
                  "(token, expert) pairs sent again to another replica after a shard failed");
}

void AttentionMetrics::Finished(FinishReason r) { outcomes_[static_cast<size_t>(r)]->Increment(); }

void AttentionMetrics::Refused(absl::StatusCode code) {
  const bool invalid =
      code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kOutOfRange;
  (invalid ? invalid_ : refused_)->Increment();
}

namespace {
constexpr char kRttName[] = "dmoe_transport_round_trip_seconds";
constexpr char kRttHelp[] = "Dispatch to combine, per expert shard";
constexpr char kTokensName[] = "dmoe_transport_shard_tokens_total";
constexpr char kTokensHelp[] = "Token rows dispatched, per expert shard";
constexpr char kErrorsName[] = "dmoe_transport_errors_total";
constexpr char kErrorsHelp[] = "Failed or timed-out round trips, per expert shard";
}  // namespace

RoundTripObserver AttentionMetrics::RoundTrips() {
  return [this](const std::string& shard, double seconds, int64_t tokens, uint64_t out, uint64_t in,
                bool ok) {
    {
      // Updated under the lock: PruneShards may remove a shard's series.
      MutexLock l(&shards_mu_);
      auto it = shards_.find(shard);
      if (it == shards_.end()) {
        ShardSeries n;
        n.rtt = &m_->Seconds(kRttName, kRttHelp, {{"shard", shard}});
        n.tokens = &m_->Counter(kTokensName, kTokensHelp, {{"shard", shard}});
        n.errors = &m_->Counter(kErrorsName, kErrorsHelp, {{"shard", shard}});
        it = shards_.emplace(shard, n).first;
      }
      ShardSeries& series = it->second;
      series.last = std::chrono::steady_clock::now();
      series.rtt->Observe(seconds);
      series.tokens->Increment(static_cast<double>(tokens));
      if (!ok) series.errors->Increment();
    }
    bytes_out_->Increment(static_cast<double>(out));
    bytes_in_->Increment(static_cast<double>(in));
  };
}

void AttentionMetrics::PruneShards(std::chrono::steady_clock::time_point now) {
  MutexLock l(&shards_mu_);
  for (auto it = shards_.begin(); it != shards_.end();) {
    if (now - it->second.last < std::chrono::minutes(10)) {
      ++it;
      continue;
    }
    m_->Remove(kRttName, kRttHelp, it->second.rtt);
    m_->Remove(kTokensName, kTokensHelp, it->second.tokens);
    m_->Remove(kErrorsName, kErrorsHelp, it->second.errors);
    it = shards_.erase(it);
  }
}

void AttentionMetrics::Refresh(const Scheduler* s, const StepEngine* e) {
  PruneShards(std::chrono::steady_clock::now());
  const SchedulerLoad load = s->load();
  const SchedulerStats stats = s->stats();
  running_->Set(static_cast<double>(load.running));
  waiting_->Set(static_cast<double>(load.waiting));
  queued_->Set(static_cast<double>(load.queued_prefill_tokens));
  blocks_used_->Set(static_cast<double>(load.total_blocks - load.free_blocks));
  blocks_total_->Set(static_cast<double>(load.total_blocks));
  draining_->Set(load.draining ? 1 : 0);
  bytes_per_token_->Set(static_cast<double>(load.kv_bytes_per_token));
  Metrics::SetTotal(*prefilled_, static_cast<double>(stats.prefilled_tokens));
  Metrics::SetTotal(*prefix_hits_, static_cast<double>(stats.prefix_hit_tokens));
  Metrics::SetTotal(*generated_, static_cast<double>(stats.generated_tokens));
  Metrics::SetTotal(*preemptions_, static_cast<double>(stats.preemptions));
  Metrics::SetTotal(*stalled_steps_, static_cast<double>(stats.stalled_steps));
  Metrics::SetTotal(*drafted_, static_cast<double>(stats.drafted_tokens));
  Metrics::SetTotal(*accepted_, static_cast<double>(stats.accepted_tokens));
  Metrics::SetTotal(*spec_steps_, static_cast<double>(stats.speculative_steps));
  if (stats.drafted_tokens > 0) {
    acceptance_->Set(static_cast<double>(stats.accepted_tokens) / stats.drafted_tokens);
    tokens_per_step_->Set(1.0 + static_cast<double>(stats.accepted_tokens) /
                                    static_cast<double>(stats.speculative_steps));
  }
  longest_stall_->Set(stats.longest_stall_seconds);
  stalled_->Set(static_cast<double>(load.stalled));
  current_stall_->Set(load.current_stall_seconds);
  if (set_ != nullptr) {
    if (placement_version_ == nullptr) {
      placement_version_ =
          &m_->Gauge("dmoe_attention_placement_version", "Expert placement version in use");
      heartbeat_age_ = &m_->Gauge("dmoe_attention_heartbeat_age_seconds",
                                  "Time since the last heartbeat the router answered");
    }
    placement_version_->Set(static_cast<double>(set_->version()));
    if (set_->member() != nullptr) heartbeat_age_->Set(set_->member()->heartbeat_age_seconds());
    Metrics::SetTotal(*rerouted_, static_cast<double>(set_->experts()->rerouted_pairs() +
                                                      set_->experts_b()->rerouted_pairs()));
    RefreshHedging();
  }
  for (int64_t l = 0; l < config_.num_expert_layers(); ++l) {
    for (int64_t x = 0; x < config_.n_routed_experts; ++x) {
      prometheus::Counter* c =
          expert_tokens_[static_cast<size_t>(l * config_.n_routed_experts + x)];
      if (c != nullptr) Metrics::SetTotal(*c, static_cast<double>(e->expert_tokens(l, x)));
    }
  }
}

void AttentionMetrics::RefreshHedging() {
  if (hedged_ == nullptr) {
    hedged_ = &m_->Counter("dmoe_transport_hedged_calls_total",
                           "Round trips late enough that their pairs went to another replica too");
    late_dropped_ = &m_->Counter("dmoe_transport_late_replies_dropped_total",
                                 "Replies not waited for because another replica answered first");
    set_aside_ = &m_->Gauge("dmoe_transport_shards_set_aside",
                            "Expert shards set aside for losing hedge races, awaiting their probe");
    revivals_ = &m_->Counter("dmoe_transport_shard_revivals_total",
                             "Set-aside expert shards used again after their probe answered");
  }
  const RemoteRoutedExperts* a = set_->experts();
  const RemoteRoutedExperts* b = set_->experts_b();
  Metrics::SetTotal(*hedged_, static_cast<double>(a->hedged_calls() + b->hedged_calls()));
  Metrics::SetTotal(*late_dropped_,
                    static_cast<double>(a->late_replies_dropped() + b->late_replies_dropped()));
  set_aside_->Set(static_cast<double>(set_->health().set_aside_now()));
  Metrics::SetTotal(*revivals_, static_cast<double>(set_->health().revived_total()));
}

void AttentionMetrics::Start(const Scheduler* s, const StepEngine* e) {
  stop_ = false;
  thread_ = std::thread([this, s, e] {
    while (!stop_) {
      Refresh(s, e);
      for (int i = 0; i < 10 && !stop_; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
}

void AttentionMetrics::Stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

}  // namespace dmoe
