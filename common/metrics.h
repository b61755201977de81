// Prometheus metrics of one dmoe process, exposed on /metrics by prometheus-cpp's HTTP exposer.
// Names follow Prometheus conventions: dmoe_<service>_..., _total for counters, base units.
#ifndef DMOE_COMMON_METRICS_H_
#define DMOE_COMMON_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace dmoe {

class Metrics {
 public:
  Metrics() : registry_(std::make_shared<prometheus::Registry>()) {}
  // Serves /metrics on `listen` ("127.0.0.1:0" picks a port); returns "HOST:PORT". Any other path
  // or method gets an HTTP error. Every process exports process_start_time_seconds (Unix time:
  // restarts and crash loops show as it changes). 8 workers, one request per connection, each cut
  // after 2 s: N idle or slow clients delay a scrape by at most about 2 s per 8 of them.
  absl::StatusOr<std::string> Serve(const std::string& listen);
  prometheus::Registry& registry() { return *registry_; }
  // The exposition text of every series (what GET /metrics answers).
  std::string Text() const;

  prometheus::Counter& Counter(const std::string& name, const std::string& help,
                               const prometheus::Labels& labels = {});
  prometheus::Gauge& Gauge(const std::string& name, const std::string& help,
                           const prometheus::Labels& labels = {});
  // Latency buckets from 100 us to 30 s.
  prometheus::Histogram& Seconds(const std::string& name, const std::string& help,
                                 const prometheus::Labels& labels = {});
  // Buckets from 10 ms to 1 h, for whole requests (a long generation takes minutes: with the
  // buckets above, every one over 30 s read as 30 s).
  prometheus::Histogram& LongSeconds(const std::string& name, const std::string& help,
                                     const prometheus::Labels& labels = {});

  // Remove a series made by Counter / Seconds with the same name and help (its family stays):
  // for series of things that are gone (an expert shard that left), whose label values would
  // otherwise pile up forever. The pointer is invalid afterwards.
  void Remove(const std::string& name, const std::string& help, prometheus::Counter* c) {
    prometheus::BuildCounter().Name(name).Help(help).Register(*registry_).Remove(c);
  }
  void Remove(const std::string& name, const std::string& help, prometheus::Histogram* h) {
    prometheus::BuildHistogram().Name(name).Help(help).Register(*registry_).Remove(h);
  }

  // Sets a counter to a total kept elsewhere (counters only go up).
  static void SetTotal(prometheus::Counter& c, double total) {
    if (total > c.Value()) c.Increment(total - c.Value());
  }

 private:
  prometheus::Histogram& Histogram(const std::string& name, const std::string& help,
                                   const prometheus::Labels& labels,
                                   const prometheus::Histogram::BucketBoundaries& buckets);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace dmoe

#endif  // DMOE_COMMON_METRICS_H_
