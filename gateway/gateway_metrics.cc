#include "gateway/gateway_metrics.h"

namespace dmoe::gateway {

namespace {

void WireLatencies(Metrics* m, const prometheus::Labels& model, GatewayMetrics* g) {
  auto& ttft = m->Seconds("dmoe_gateway_time_to_first_token_seconds",
                          "From a request's arrival at the gateway to its first token");
  auto& vttft = m->Seconds("vllm:time_to_first_token_seconds",
                           "Time to the first token (at the gateway)", model);
  auto& itl = m->Seconds("vllm:inter_token_latency_seconds",
                         "Time between streamed responses of a request", model);
  auto& tpot = m->Seconds("vllm:time_per_output_token_seconds",
                          "Time per output token (the older name of inter-token latency)", model);
  auto& e2e = m->LongSeconds("vllm:e2e_request_latency_seconds",
                             "From a request's arrival to its last token", model);
  auto& queue = m->Seconds("vllm:request_queue_time_seconds",
                           "Time a request waited on its attention node before admission", model);
  g->time_to_first_token = [&ttft, &vttft](double s) {
    ttft.Observe(s);
    vttft.Observe(s);
  };
  g->inter_token = [&itl, &tpot](double s) {
    itl.Observe(s);
    tpot.Observe(s);
  };
  g->end_to_end = [&e2e](double s) { e2e.Observe(s); };
  g->queue_time = [&queue](double s) { queue.Observe(s); };
}

}  // namespace

GatewayMetricSet::GatewayMetricSet(Metrics* metrics, const std::string& model_name,
                                   GatewayOptions* options, HttpMetrics* http)
    : m_(metrics),
      model_{{"model_name", model_name}},
      waiting_(m_->Gauge("vllm:num_requests_waiting",
                         "Requests queued on the attention nodes for admission", model_)),
      running_(m_->Gauge("vllm:num_requests_running",
                         "Requests in the attention nodes' running batches", model_)),
      kv_usage_(m_->Gauge("vllm:kv_cache_usage_perc",
                          "Fraction of the attention nodes' KV blocks in use (1 = full)", model_)),
      kv_usage_old_(m_->Gauge("vllm:gpu_cache_usage_perc",
                              "Fraction of KV blocks in use (the older name)", model_)) {
  GatewayMetrics* g = &options->metrics;
  WireLatencies(m_, model_, g);
  auto& active = m_->Gauge("dmoe_gateway_active_streams", "Generations in flight (gRPC and HTTP)");
  g->active = [&active](int d) { active.Increment(d); };
  const char* help = "Generations (one per gRPC request or HTTP choice) by outcome";
  g->finished = [m = m_, help](const std::string& outcome) {
    m->Counter("dmoe_gateway_requests_total", help, {{"outcome", outcome}}).Increment();
  };
  auto& retries = m_->Counter("dmoe_gateway_retries_total",
                              "Requests moved to another attention node before their first token");
  g->retried = [&retries] { retries.Increment(); };
  // Every outcome from the start (a series born at its first error hides that error from
  // increase()): ok, cancelled, and the gRPC codes' names as Generation reports them.
  for (const char* outcome :
       {"ok", "cancelled", "unknown", "invalid_argument", "deadline_exceeded", "not_found",
        "already_exists", "permission_denied", "resource_exhausted", "failed_precondition",
        "aborted", "out_of_range", "unimplemented", "internal", "unavailable", "data_loss",
        "unauthenticated"}) {
    m_->Counter("dmoe_gateway_requests_total", help, {{"outcome", outcome}});
  }
  auto& conns = m_->Gauge("dmoe_gateway_http_connections", "Open HTTP connections");
  http->connections = [&conns](int d) { conns.Increment(d); };
  http->request = [m = m_](const std::string& route, int status) {
    m->Counter("dmoe_gateway_http_requests_total", "HTTP requests by route and status",
               {{"route", route}, {"code", std::to_string(status)}})
        .Increment();
  };
}

void GatewayMetricSet::Refresh(const NodePool& pool) {
  const NodePool::Totals t = pool.totals();
  waiting_.Set(static_cast<double>(t.waiting));
  running_.Set(static_cast<double>(t.running));
  const double used =
      t.total_blocks > 0 ? 1.0 - static_cast<double>(t.free_blocks) / t.total_blocks : 0.0;
  kv_usage_.Set(used);
  kv_usage_old_.Set(used);
  if (t.total_blocks > 0 &&
      (t.total_blocks != cache_blocks_ || t.block_tokens != cache_block_tokens_)) {
    if (cache_blocks_ >= 0) {
      m_->Gauge("vllm:cache_config_info", "KV cache configuration (labels)",
                {{"block_size", std::to_string(cache_block_tokens_)},
                 {"num_gpu_blocks", std::to_string(cache_blocks_)},
                 {"model_name", model_.at("model_name")}})
          .Set(0);
    }
    cache_blocks_ = t.total_blocks;
    cache_block_tokens_ = t.block_tokens;
    m_->Gauge("vllm:cache_config_info", "KV cache configuration (labels)",
              {{"block_size", std::to_string(t.block_tokens)},
               {"num_gpu_blocks", std::to_string(t.total_blocks)},
               {"model_name", model_.at("model_name")}})
        .Set(1);
  }
}

}  // namespace dmoe::gateway
