// `dmoe bench`: the load runner (worker threads over the clients) and the report.
#include <atomic>
#include <cstdio>
#include <map>
#include <thread>

#include "absl/strings/str_format.h"
#include "cli/openai_bench_internal.h"
#include "common/mutex.h"

namespace dmoe::cli::bench {
namespace {

double Seconds(SteadyClock::duration d) { return std::chrono::duration<double>(d).count(); }

// Calls `fn` every 250 ms on its own thread until Stop.
class Ticker {
 public:
  explicit Ticker(std::function<void()> fn) : fn_(std::move(fn)) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~Ticker() { Stop(); }

  void Stop() {
    {
      MutexLock l(&mu_);
      stop_ = true;
    }
    cv_.SignalAll();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Loop() {
    MutexLock l(&mu_);
    while (!stop_) {
      cv_.WaitFor(&mu_, std::chrono::milliseconds(250));
      if (stop_) break;
      l.Unlock();
      fn_();
      l.Lock();
    }
  }

  std::function<void()> fn_;
  Mutex mu_;
  CondVar cv_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace

LoadResult RunLoad(const std::vector<BenchRequest>& requests, const std::vector<double>& arrivals,
                   const std::vector<BenchClient*>& clients, const ProgressFn& progress) {
  LoadResult out;
  const size_t n = requests.size();
  out.results.resize(n);
  std::atomic<size_t> next{0}, done{0};
  const auto start = SteadyClock::now();
  std::unique_ptr<Ticker> ticker;
  if (progress) {
    ticker = std::make_unique<Ticker>(
        [&] { progress(done.load(), n, Seconds(SteadyClock::now() - start)); });
  }
  std::vector<std::thread> workers;
  for (BenchClient* client : clients) {
    workers.emplace_back([&, client] {
      for (size_t i; (i = next.fetch_add(1)) < n;) {
        std::this_thread::sleep_until(start + std::chrono::duration_cast<SteadyClock::duration>(
                                                  std::chrono::duration<double>(arrivals[i])));
        RequestResult r = client->Send(requests[i]);
        r.prompt_len = requests[i].prompt_len;
        out.results[i] = std::move(r);  // each index is written by one thread
        done.fetch_add(1);
      }
    });
  }
  for (std::thread& t : workers) t.join();
  out.duration_s = Seconds(SteadyClock::now() - start);
  if (ticker) ticker->Stop();
  if (progress) progress(n, n, out.duration_s);
  return out;
}

namespace {

nlohmann::json StatsMs(std::vector<double> seconds) {
  for (double& v : seconds) v *= 1e3;
  const Stats s = Summarize(std::move(seconds));
  return {{"mean", s.mean}, {"p50", s.p50}, {"p90", s.p90}, {"p99", s.p99}, {"count", s.count}};
}

}  // namespace

nlohmann::json MakeReport(const LoadResult& load, const nlohmann::json& config) {
  int64_t completed = 0, failed = 0, input_tokens = 0, output_tokens = 0;
  std::vector<double> ttft, tpot, itl, e2el;
  std::map<std::string, int64_t> errors;
  for (const RequestResult& r : load.results) {
    if (!r.ok) {
      ++failed;
      ++errors[r.error];
      continue;
    }
    ++completed;
    const int64_t out = r.has_usage ? r.completion_tokens : r.events;
    output_tokens += out;
    input_tokens += r.has_usage ? r.prompt_tokens : r.prompt_len;
    ttft.push_back(r.ttft_s);
    e2el.push_back(r.e2e_s);
    itl.insert(itl.end(), r.itl.begin(), r.itl.end());
    if (out > 1) tpot.push_back((r.e2e_s - r.ttft_s) / static_cast<double>(out - 1));
  }
  const double d = load.duration_s > 0 ? load.duration_s : 1e-9;
  nlohmann::json j = {
      {"completed", completed},
      {"failed", failed},
      {"duration_s", load.duration_s},
      {"total_input_tokens", input_tokens},
      {"total_output_tokens", output_tokens},
      {"request_throughput", static_cast<double>(completed) / d},
      {"output_throughput", static_cast<double>(output_tokens) / d},
      {"total_token_throughput", static_cast<double>(input_tokens + output_tokens) / d},
      {"ttft_ms", StatsMs(ttft)},
      {"tpot_ms", StatsMs(tpot)},
      {"itl_ms", StatsMs(itl)},
      {"e2el_ms", StatsMs(e2el)},
      {"errors", nlohmann::json::object()},
      {"config", config},
  };
  for (const auto& [kind, count] : errors) j["errors"][kind] = count;
  return j;
}

namespace {

void Row(std::string* out, const std::string& name, const std::string& value) {
  absl::StrAppendFormat(out, "%-40s %s\n", name + ":", value);
}

std::string Title(const std::string& title, char fill = '-') {
  const int pad = std::max<int>(0, 50 - static_cast<int>(title.size()));
  return std::string(pad / 2, fill) + title + std::string(pad - pad / 2, fill) + "\n";
}

void Latency(std::string* out, const nlohmann::json& s, const std::string& title,
             const std::string& name) {
  *out += Title(title);
  Row(out, "Mean " + name + " (ms)", absl::StrFormat("%.2f", s["mean"].get<double>()));
  Row(out, "Median " + name + " (ms)", absl::StrFormat("%.2f", s["p50"].get<double>()));
  Row(out, "P90 " + name + " (ms)", absl::StrFormat("%.2f", s["p90"].get<double>()));
  Row(out, "P99 " + name + " (ms)", absl::StrFormat("%.2f", s["p99"].get<double>()));
}

}  // namespace

std::string ReportTable(const nlohmann::json& r) {
  std::string out = Title(" Serving Benchmark Result ", '=');
  const auto i = [&](const char* k) { return std::to_string(r[k].get<int64_t>()); };
  const auto f = [&](const char* k) { return absl::StrFormat("%.2f", r[k].get<double>()); };
  Row(&out, "Successful requests", i("completed"));
  Row(&out, "Failed requests", i("failed"));
  Row(&out, "Benchmark duration (s)", f("duration_s"));
  Row(&out, "Total input tokens", i("total_input_tokens"));
  Row(&out, "Total generated tokens", i("total_output_tokens"));
  Row(&out, "Request throughput (req/s)", f("request_throughput"));
  Row(&out, "Output token throughput (tok/s)", f("output_throughput"));
  Row(&out, "Total token throughput (tok/s)", f("total_token_throughput"));
  Latency(&out, r["ttft_ms"], "Time to First Token", "TTFT");
  Latency(&out, r["tpot_ms"], "Time per Output Token (excl. 1st token)", "TPOT");
  Latency(&out, r["itl_ms"], "Inter-token Latency", "ITL");
  Latency(&out, r["e2el_ms"], "End-to-end Latency", "E2EL");
  if (!r["errors"].empty()) {
    out += Title("Errors");
    for (const auto& [kind, count] : r["errors"].items()) {
      Row(&out, kind, std::to_string(count.get<int64_t>()));
    }
  }
  out += std::string(50, '=') + "\n";
  return out;
}

}  // namespace dmoe::cli::bench
