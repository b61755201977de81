#include "common/metrics.h"

#include <unistd.h>

#include <ctime>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/build_info.h"
#include "prometheus/text_serializer.h"

namespace dmoe {

namespace {

// This process's start, Unix seconds: its start in clock ticks after boot (/proc/self/stat, field
// 22) plus the boot time (/proc/stat btime). Now, if either cannot be read.
double ProcessStartTime() {
  std::ifstream stat("/proc/self/stat");
  std::string line;
  std::getline(stat, line);
  const size_t comm_end = line.rfind(')');  // the command name may hold spaces
  std::istringstream fields(comm_end == std::string::npos ? "" : line.substr(comm_end + 2));
  std::string field;
  unsigned long long ticks = 0;
  for (int i = 3; i <= 22 && fields >> field; ++i) {
    if (i == 22) ticks = std::stoull(field);
  }
  std::ifstream proc("/proc/stat");
  unsigned long long btime = 0;
  for (std::string key; proc >> key;) {
    if (key == "btime") {
      proc >> btime;
      break;
    }
  }
  const long hz = sysconf(_SC_CLK_TCK);
  if (ticks == 0 || btime == 0 || hz <= 0) return static_cast<double>(std::time(nullptr));
  return static_cast<double>(btime) + static_cast<double>(ticks) / static_cast<double>(hz);
}

}  // namespace

std::string Metrics::Text() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

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
  Gauge("process_start_time_seconds", "Start time of the process since the Unix epoch, seconds")
      .Set(ProcessStartTime());
  Gauge("dmoe_build_info", "The version and commit this binary was built from (always 1)",
        {{"version", BuildVersion()}, {"commit", BuildCommit()}})
      .Set(1);
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

prometheus::Histogram& Metrics::Histogram(const std::string& name, const std::string& help,
                                          const prometheus::Labels& labels,
                                          const prometheus::Histogram::BucketBoundaries& buckets) {
  return prometheus::BuildHistogram()
      .Name(name)
      .Help(help)
      .Register(*registry_)
      .Add(labels, buckets);
}

prometheus::Histogram& Metrics::Seconds(const std::string& name, const std::string& help,
                                        const prometheus::Labels& labels) {
  static const prometheus::Histogram::BucketBoundaries kBuckets = {
      1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
  return Histogram(name, help, labels, kBuckets);
}

prometheus::Histogram& Metrics::LongSeconds(const std::string& name, const std::string& help,
                                            const prometheus::Labels& labels) {
  static const prometheus::Histogram::BucketBoundaries kBuckets = {
      0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 3600};
  return Histogram(name, help, labels, kBuckets);
}

}  // namespace dmoe
