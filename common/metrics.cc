#include "common/metrics.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace dmoe {

absl::StatusOr<std::string> Metrics::Serve(const std::string& listen) {
  // civetweb options. prometheus-cpp's defaults (2 workers, civetweb's 30 s request timeout) let
  // two idle or slowloris connections hold /metrics for 30 s each, one after the other. Each worker
  // serves one connection at a time, so: more workers, and every request (read and write) is cut
  // after kRequestTimeoutMs; one request per connection, so an idle keep-alive holds no worker.
  constexpr char kWorkers[] = "8";
  constexpr char kRequestTimeoutMs[] = "2000";
  std::vector<std::string> options = {"listening_ports",    listen,
                                      "num_threads",        kWorkers,
                                      "request_timeout_ms", kRequestTimeoutMs,
                                      "enable_keep_alive",  "no",
                                      "max_request_size",   "16384"};
  try {  // prometheus-cpp reports bind errors by throwing
    exposer_ = std::make_unique<prometheus::Exposer>(std::move(options));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("--metrics-listen ", listen, ": ", e.what()));
  }
  exposer_->RegisterCollectable(registry_);
  const auto ports = exposer_->GetListeningPorts();
  if (ports.empty()) return absl::UnavailableError("--metrics-listen: no port");
  return absl::StrCat(listen.substr(0, listen.rfind(':')), ":", ports[0]);
}

prometheus::Counter& Metrics::Counter(const std::string& name, const std::string& help,
                                      const prometheus::Labels& labels) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(*registry_).Add(labels);
}

prometheus::Gauge& Metrics::Gauge(const std::string& name, const std::string& help,
                                  const prometheus::Labels& labels) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(*registry_).Add(labels);
}

prometheus::Histogram& Metrics::Seconds(const std::string& name, const std::string& help,
                                        const prometheus::Labels& labels) {
  static const prometheus::Histogram::BucketBoundaries kBuckets = {
      1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
  return prometheus::BuildHistogram()
      .Name(name)
      .Help(help)
      .Register(*registry_)
      .Add(labels, kBuckets);
}

}  // namespace dmoe
