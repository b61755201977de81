// Prometheus metrics of an attention node: requests and outcomes, time to first token and per
// output token, queues, KV blocks, prefix-cache hits, tokens per (layer, expert), and the expert
// round trips (per shard tokens, bytes, latency, errors). Thread-safe.
#ifndef DMOE_ATTENTION_SERVICE_ATTENTION_METRICS_H_
#define DMOE_ATTENTION_SERVICE_ATTENTION_METRICS_H_

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "attention_service/engine.h"
#include "attention_service/remote_experts.h"
#include "attention_service/scheduler.h"
#include "attention_service/shard_client.h"
#include "common/metrics.h"
#include "common/mutex.h"

namespace dmoe {

class AttentionMetrics {
 public:
  AttentionMetrics(Metrics* m, const ModelConfig& c);
  ~AttentionMetrics() { Stop(); }
  void ObserveTimeToFirstToken(double seconds) { ttft_->Observe(seconds); }
  void ObserveTimePerOutputToken(double seconds) { tpot_->Observe(seconds); }
  void ObserveStep(double seconds) { step_->Observe(seconds); }
  void Finished(FinishReason r);
  // A request refused before it ran: outcome "invalid" (INVALID_ARGUMENT, OUT_OF_RANGE) or
  // "refused" (draining, queue full, ...). Such requests were counted under no outcome.
  void Refused(absl::StatusCode code);
  RoundTripObserver RoundTrips();
  // Removes the series of shards without a round trip for 10 minutes before `now` (each restart
  // or scale-out brings a new shard label: ~22 series each, kept forever). Refresh calls it.
  void PruneShards(std::chrono::steady_clock::time_point now);
  // With a router: the active placement version, heartbeat age and stalls are exported too.
  // Call before Start.
  void SetShardSet(ExpertShardSet* set) { set_ = set; }
  // Copies the scheduler's load and the engine's counters into the metrics every 500 ms.
  void Start(const Scheduler* s, const StepEngine* e);
  void Stop();

 private:
  void Refresh(const Scheduler* s, const StepEngine* e);
  void RefreshHedging();
  Metrics* m_;
  ExpertShardSet* set_ = nullptr;
  prometheus::Gauge *placement_version_ = nullptr, *heartbeat_age_ = nullptr,
                    *longest_stall_ = nullptr, *stalled_ = nullptr, *current_stall_ = nullptr;
  prometheus::Counter *stalled_steps_ = nullptr, *rerouted_ = nullptr;
  // Hedged dispatch (registered with the first Refresh that has shards).
  prometheus::Counter *hedged_ = nullptr, *late_dropped_ = nullptr, *revivals_ = nullptr;
  prometheus::Gauge* set_aside_ = nullptr;
  ModelConfig config_;
  prometheus::Histogram* ttft_;
  prometheus::Histogram* tpot_;
  prometheus::Histogram* step_;
  prometheus::Gauge *running_, *waiting_, *queued_, *blocks_used_, *blocks_total_,
      *bytes_per_token_;
  prometheus::Counter *prefilled_, *prefix_hits_, *generated_, *preemptions_;
  // Speculative decoding (MTP).
  prometheus::Counter *drafted_, *accepted_, *spec_steps_;
  prometheus::Gauge *acceptance_, *tokens_per_step_;
  std::vector<prometheus::Counter*> outcomes_;
  prometheus::Counter *invalid_ = nullptr, *refused_ = nullptr;
  prometheus::Gauge* draining_ = nullptr;
  std::vector<prometheus::Counter*> expert_tokens_;  // [layer * E + expert], MoE layers only
  struct ShardSeries {
    prometheus::Histogram* rtt;
    prometheus::Counter *tokens, *errors;
    std::chrono::steady_clock::time_point last;  // the last round trip
  };

  Mutex shards_mu_;
  std::map<std::string, ShardSeries> shards_ ABSL_GUARDED_BY(shards_mu_);  // by name, on first use
  prometheus::Counter *bytes_out_, *bytes_in_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_ATTENTION_METRICS_H_
