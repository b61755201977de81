// The gateway's Prometheus series: its own (dmoe_gateway_*) and the ones the Kubernetes Gateway
// API Inference Extension's model-server protocol reads, under vLLM's names with a model_name
// label: vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc (and the
// older vllm:gpu_cache_usage_perc), vllm:cache_config_info, and the latency histograms
// vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds,
// vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds (and
// vllm:time_per_output_token_seconds). The gauges sum the attention nodes behind this gateway: to
// the inference extension the gateway is the model server.
#ifndef DMOE_GATEWAY_GATEWAY_METRICS_H_
#define DMOE_GATEWAY_GATEWAY_METRICS_H_

#include <string>

#include "common/metrics.h"
#include "gateway/generation.h"
#include "gateway/http_front.h"
#include "gateway/node_pool.h"

namespace dmoe::gateway {

class GatewayMetricSet {
 public:
  // Points the options' callbacks at the series (`metrics` outlives both).
  GatewayMetricSet(Metrics* metrics, const std::string& model_name, GatewayOptions* options,
                   HttpMetrics* http);
  // Copies the nodes' last reported load into the gauges.
  void Refresh(const NodePool& pool);

 private:
  Metrics* m_;
  prometheus::Labels model_;
  prometheus::Gauge &waiting_, &running_, &kv_usage_, &kv_usage_old_;
  int64_t cache_blocks_ = -1, cache_block_tokens_ = -1;  // the cache_config_info labels set
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_GATEWAY_METRICS_H_
