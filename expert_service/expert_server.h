// Serves an ExpertShard on a ServerTransport: one thread receives every request that has arrived,
// processes them together (tokens merged per expert) and replies.
#ifndef DMOE_EXPERT_SERVICE_EXPERT_SERVER_H_
#define DMOE_EXPERT_SERVICE_EXPERT_SERVER_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <thread>

#include "expert_service/expert_shard.h"
#include "transport/transport.h"

namespace dmoe {

class ExpertServer {
 public:
  // Does not own `shard` or `transport`; both must outlive Stop().
  ExpertServer(ExpertShard* shard, transport::ServerTransport* transport)
      : shard_(shard), transport_(transport) {}
  ~ExpertServer() { Stop(); }
  // Test only (fault-injection scenarios): wait `delay` before processing each batch, as a slow
  // shard would. Call before Start.
  void SetInjectedDelay(std::chrono::milliseconds delay) { delay_ = delay; }
  // Called with the compute time of each batch of requests (from the first request taken to the
  // last reply handed to the transport), on the server's thread. Call before Start.
  void SetBatchObserver(std::function<void(double seconds)> f) { on_batch_ = std::move(f); }
  void Start();
  void Stop();

 private:
  void Loop();
  ExpertShard* shard_;
  transport::ServerTransport* transport_;
  std::atomic<bool> stop_{false};
  std::chrono::milliseconds delay_{0};
  std::function<void(double)> on_batch_;
  std::thread thread_;
};

// The experts a shard hosts, from a spec: comma-separated LAYERS:EXPERTS items, each side "*",
// "N" or "A-B" (inclusive); only MoE layers count. Or "I/N": the I-th of N contiguous, equal
// slices of the experts of every MoE layer (aligned with expert groups when N divides n_group or
// n_group divides N). INVALID_ARGUMENT naming the flag on a bad spec.
absl::StatusOr<std::vector<std::pair<int64_t, int64_t>>> ParseExpertSpec(const std::string& spec,
                                                                         const ModelConfig& c);

}  // namespace dmoe

#endif  // DMOE_EXPERT_SERVICE_EXPERT_SERVER_H_
