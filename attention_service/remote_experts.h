// Routed experts on other processes: the attention side of dispatch and combine (DESIGN.md §2).
// Per MoE layer, a plan sends each token's hidden row once per destination shard with the
// (expert, weight) pairs that shard serves; every shard works concurrently; Finish waits for all
// combines (each before the deadline) and adds the already-weighted partial rows.
//
// Replicas: when an expert has several shards, each token goes to a live replica it already
// reaches, else to the replica with the fewest tokens so far in this layer (spreading load).
// A shard that fails (endpoint error or deadline) is marked dead for this routing and its pairs
// are sent again to other live replicas in the same Finish; only when some expert has no live
// replica left does the layer fail, with UNAVAILABLE naming it.
#ifndef DMOE_ATTENTION_SERVICE_REMOTE_EXPERTS_H_
#define DMOE_ATTENTION_SERVICE_REMOTE_EXPERTS_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/mutex.h"
#include "model/config.h"
#include "model/routed_experts.h"
#include "transport/transport.h"
#include "transport/wire.h"

namespace dmoe {

// Which shards serve each (layer, expert) of the MoE layers.
class ExpertPlacement {
 public:
  ExpertPlacement() = default;
  ExpertPlacement(int64_t layers, int64_t experts)
      : experts_(experts), replicas_(static_cast<size_t>(layers * experts)) {}
  // Adds `shard` as a replica of each listed expert (ignored when out of the model's range).
  void Add(int shard, const std::vector<std::pair<int64_t, int64_t>>& experts);
  // The shards serving it (empty when none).
  const std::vector<int>& Replicas(int64_t layer, int64_t expert) const;
  // INVALID_ARGUMENT naming the first expert of a MoE layer that no shard serves.
  absl::Status CheckCovers(const ModelConfig& c) const;

 private:
  int64_t experts_ = 0;
  std::vector<std::vector<int>> replicas_;
  std::vector<int> none_;
};

// A snapshot of where the experts are: shard s is transport peer peers[s], named names[s].
struct ExpertRouting {
  uint64_t version = 0;  // placement version (0: static, from --expert-shards)
  std::vector<int> peers;
  std::vector<std::string> names;
  ExpertPlacement placement;
};

// Transport peers known to have failed. Shared by the RemoteRoutedExperts of one client.
class PeerHealth {
 public:
  void MarkDead(int peer);
  bool Dead(int peer) const;
  // Dead flags of `peers`, in order (one lock).
  void Snapshot(const std::vector<int>& peers, std::vector<char>* dead) const;

 private:
  mutable Mutex mu_;
  std::vector<char> dead_ ABSL_GUARDED_BY(mu_);
};

// One finished round trip to one shard: its name, seconds from dispatch to combine, tokens sent,
// bytes out and in, and whether it succeeded. Called on the engine's thread; must be cheap.
using RoundTripObserver =
    std::function<void(const std::string& shard, double seconds, int64_t tokens, uint64_t bytes_out,
                       uint64_t bytes_in, bool ok)>;

struct RemoteExpertsOptions {
  wire::WireDType dtype = wire::WireDType::kBF16;
  std::chrono::milliseconds deadline{5000};  // per round trip
  uint32_t sender_id = 0;
  RoundTripObserver observer;  // optional
};

class RemoteRoutedExperts : public RoutedExperts {
 public:
  RemoteRoutedExperts(const ModelConfig& c, transport::ClientTransport* client,
                      std::shared_ptr<const ExpertRouting> routing,
                      std::shared_ptr<PeerHealth> health, RemoteExpertsOptions options);
  // One static routing over `peers` (shard i = peers[i], named names[i]).
  RemoteRoutedExperts(const ModelConfig& c, transport::ClientTransport* client,
                      std::vector<int> peers, std::vector<std::string> names,
                      ExpertPlacement placement, RemoteExpertsOptions options);
  absl::Status Begin(int64_t layer, const float* x, int64_t t, const int32_t* ids, const float* w,
                     int64_t k) override;
  absl::Status Finish(float* out) override;

  // Used from the next Begin on. Call between steps (not between Begin and Finish).
  void SetRouting(std::shared_ptr<const ExpertRouting> routing);
  const ExpertRouting& routing() const { return *routing_; }

  // Round trips made (bytes and latency go to RemoteExpertsOptions::observer).
  uint64_t round_trips() const { return round_trips_; }
  // Pairs sent again to another replica after a shard failed.
  uint64_t rerouted_pairs() const { return rerouted_; }
  // Tokens sent per (layer, expert) since start (for load reports). Thread-safe.
  uint64_t expert_tokens(int64_t layer, int64_t expert) const {
    return expert_tokens_[static_cast<size_t>(layer * n_experts_ + expert)].load(
        std::memory_order_relaxed);
  }

 private:
  struct ShardCall {
    uint64_t id = 0;
    bool posted = false;
    uint64_t bytes_out = 0;
    std::vector<int64_t> tokens;  // local index -> token of the batch
    std::vector<int64_t> pairs;   // the dispatched pairs (indices into ids/w), in wire order
  };
  // Chooses shards for pairs `todo` (indices into ids/w) among live replicas not in `avoid`,
  // then posts one message per shard. UNAVAILABLE when a pair has no candidate.
  absl::Status Dispatch(const std::vector<int64_t>& todo, const std::vector<char>& avoid);
  // Dispatch's parts: a live replica per pair, not on an `avoid` shard (unique tokens per
  // destination shard); then one message to shard s with its tokens and pairs.
  absl::Status PlanReplicas(const std::vector<int64_t>& todo, const std::vector<char>& avoid);
  void Post(int s, const std::vector<int64_t>& todo);
  // Waits for every posted call; stores good replies' rows in pair_rows_; collects the failed
  // shards.
  absl::Status Collect(std::vector<int>* failed);

  int64_t hidden_;
  int64_t n_experts_;
  transport::ClientTransport* client_;
  std::shared_ptr<const ExpertRouting> routing_;
  std::shared_ptr<PeerHealth> health_;
  RemoteExpertsOptions options_;
  uint64_t seq_ = 0;
  // The call in progress.
  int64_t layer_ = 0, t_ = 0, k_ = 0;
  const float* x_ = nullptr;
  const int32_t* ids_ = nullptr;
  const float* w_ = nullptr;
  transport::Clock::time_point deadline_;
  transport::Clock::time_point begun_;
  std::vector<ShardCall> calls_;
  std::vector<int> choice_;  // shard per pair
  // Scratch reused across layers.
  std::vector<int64_t> all_pairs_, retry_pairs_;
  std::vector<char> dead_, avoid_;
  std::vector<int64_t> assigned_;
  std::vector<int64_t> local_index_;
  std::vector<float> rows_;
  std::vector<wire::Pair> pairs_;
  std::vector<uint8_t> reply_;
  std::vector<float> pair_rows_;  // [t, k, D]: the unweighted output of each pair
  std::vector<int> failed_;
  absl::Status first_failure_;
  uint64_t round_trips_ = 0, rerouted_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> expert_tokens_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_REMOTE_EXPERTS_H_
