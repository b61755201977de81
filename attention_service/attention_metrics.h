// Prometheus metrics of an attention node: requests and outcomes, time to first token and per
// output token, queues, KV blocks, prefix-cache hits, tokens per (layer, expert), and the expert
// round trips (per shard tokens, bytes, latency, errors). Thread-safe.
#ifndef DMOE_ATTENTION_SERVICE_ATTENTION_METRICS_H_
#define DMOE_ATTENTION_SERVICE_ATTENTION_METRICS_H_

#include <atomic>
#include <thread>
#include <vector>

#include "attention_service/engine.h"
#include "attention_service/scheduler.h"
#include "common/metrics.h"
#include "expert_service/remote_experts.h"

namespace dmoe {

class AttentionMetrics {
 public:
  // `shards`: the expert shard names (empty with in-process experts).
  AttentionMetrics(Metrics* m, const ModelConfig& c, std::vector<std::string> shards);
  ~AttentionMetrics() { Stop(); }
  void ObserveTimeToFirstToken(double seconds) { ttft_->Observe(seconds); }
  void ObserveTimePerOutputToken(double seconds) { tpot_->Observe(seconds); }
  void Finished(FinishReason r);
  RoundTripObserver RoundTrips();
  // Copies the scheduler's load and the engine's counters into the metrics every 500 ms.
  void Start(const Scheduler* s, const Engine* e);
  void Stop();

 private:
  void Refresh(const Scheduler* s, const Engine* e);
  Metrics* m_;
  ModelConfig config_;
  std::vector<std::string> shards_;
  prometheus::Histogram* ttft_;
  prometheus::Histogram* tpot_;
  prometheus::Gauge *running_, *waiting_, *queued_, *blocks_used_, *blocks_total_,
      *bytes_per_token_;
  prometheus::Counter *prefilled_, *prefix_hits_, *generated_, *preemptions_;
  std::vector<prometheus::Counter*> outcomes_;
  std::vector<prometheus::Counter*> expert_tokens_;  // [layer * E + expert], MoE layers only
  std::vector<prometheus::Histogram*> rtt_;
  std::vector<prometheus::Counter*> shard_tokens_, shard_errors_;
  prometheus::Counter *bytes_out_, *bytes_in_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_ATTENTION_METRICS_H_
