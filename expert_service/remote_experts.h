// Routed experts on other processes: the attention side of dispatch and combine (DESIGN.md §2).
// Per MoE layer, a plan sends each token's hidden row once per destination shard with the
// (expert, weight) pairs that shard hosts; every shard works concurrently; Finish waits for all
// combines (each before the deadline) and adds the already-weighted partial rows.
#ifndef DMOE_EXPERT_SERVICE_REMOTE_EXPERTS_H_
#define DMOE_EXPERT_SERVICE_REMOTE_EXPERTS_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "expert_service/routed_experts.h"
#include "model/config.h"
#include "transport/transport.h"
#include "transport/wire.h"

namespace dmoe {

// Which shard serves each (layer, expert). One replica per expert for now (the router adds more).
class ExpertPlacement {
 public:
  // Adds `shard` as the server of each listed expert (the first one listed wins).
  void Add(int shard, const std::vector<std::pair<int64_t, int64_t>>& experts);
  // -1 when no shard serves it.
  int ShardOf(int64_t layer, int64_t expert) const;
  // INVALID_ARGUMENT naming the first expert of a MoE layer that no shard serves.
  absl::Status CheckCovers(const ModelConfig& c) const;

 private:
  std::map<std::pair<int64_t, int64_t>, int> shard_;
};

// One finished round trip to one shard: its index, seconds from dispatch to combine, tokens sent,
// bytes out and in, and whether it succeeded. Called on the engine's thread; must be cheap.
using RoundTripObserver = std::function<void(int shard, double seconds, int64_t tokens,
                                             uint64_t bytes_out, uint64_t bytes_in, bool ok)>;

struct RemoteExpertsOptions {
  wire::WireDType dtype = wire::WireDType::kBF16;
  std::chrono::milliseconds deadline{5000};  // per round trip
  uint32_t sender_id = 0;
  RoundTripObserver observer;  // optional
};

class RemoteRoutedExperts : public RoutedExperts {
 public:
  // `peers[i]` is the transport peer index of shard i; `names[i]` its address for messages.
  RemoteRoutedExperts(const ModelConfig& c, transport::ClientTransport* client,
                      std::vector<int> peers, std::vector<std::string> names,
                      ExpertPlacement placement, RemoteExpertsOptions options);
  absl::Status Begin(int64_t layer, const float* x, int64_t t, const int32_t* ids, const float* w,
                     int64_t k) override;
  absl::Status Finish(float* out) override;

  // Round trips made (bytes and latency go to RemoteExpertsOptions::observer).
  uint64_t round_trips() const { return round_trips_; }

 private:
  struct ShardCall {
    uint64_t id = 0;
    bool posted = false;
    uint64_t bytes_out = 0;
    std::vector<int64_t> tokens;  // local index -> token of the batch
  };
  int64_t hidden_;
  transport::ClientTransport* client_;
  std::vector<int> peers_;
  std::vector<std::string> names_;
  ExpertPlacement placement_;
  RemoteExpertsOptions options_;
  uint64_t seq_ = 0;
  int64_t layer_ = 0;
  transport::Clock::time_point deadline_;
  transport::Clock::time_point begun_;
  std::vector<ShardCall> calls_;
  // Scratch reused across layers.
  std::vector<int64_t> local_index_;
  std::vector<float> rows_;
  std::vector<wire::Pair> pairs_;
  std::vector<uint8_t> reply_;
  std::vector<float> row_;
  uint64_t round_trips_ = 0;
};

}  // namespace dmoe

#endif  // DMOE_EXPERT_SERVICE_REMOTE_EXPERTS_H_
