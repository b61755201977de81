// Routed experts on other processes: the attention side of dispatch and combine (DESIGN.md §2).
// Per MoE layer, a plan sends each token's hidden row once per destination shard with the
// (expert, weight) pairs that shard serves; every shard works concurrently; Finish waits until
// every pair has an answer (each call at most until its deadline) and adds the weighted rows.
//
// Replicas: when an expert has several shards, each token goes to a live replica it already
// reaches, else to the replica with the fewest tokens so far in this layer (spreading load).
// A shard that fails (endpoint error or deadline) is marked dead for this routing and its pairs
// are sent again to other replicas in the same Finish (one that was only late is used when no
// other is left); only when some expert has no usable replica left does the layer fail, with
// UNAVAILABLE naming it.
//
// Hedging: a call still unanswered HedgeOptions::factor x its shard's recent p99 round trip after
// dispatch (a stopped or slow shard) has its pairs sent to another replica as well, one they have
// not been to in this layer (live first, else a set-aside or hedged-away one); the first
// good answer per pair wins and the late one is dropped. Replicas compute bitwise the same rows
// (batch-invariant kernels), so hedging never changes a result. A shard that keeps losing these
// races is set aside (PeerHealth) until its late reply arrives.
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

// When a round trip is late enough to send its pairs to another replica as well (hedging).
struct HedgeOptions {
  // Hedge a call after `factor` x its shard's recent p99 round trip (the second longest of its
  // last 128); 0 never hedges.
  double factor = 3.0;
  std::chrono::microseconds floor{2000};     // never sooner than this
  std::chrono::microseconds initial{50000};  // before a shard has 16 round trips on record
  // A shard that loses this many races in a row (a hedge answered first) is set aside: it gets
  // work only where no other replica is live, until its late reply (the probe) arrives. One: a
  // shard that was merely slow once is back as soon as that reply comes (milliseconds), while a
  // stopped one costs each stream a single hedge delay.
  int set_aside_after = 1;
};

// What is known about each transport peer: failed (dead), set aside (slow), and its recent round
// trips. Shared by the RemoteRoutedExperts of one client; thread-safe.
class PeerHealth {
 public:
  enum State : char { kLive = 0, kSetAside = 1, kDead = 2 };

  void MarkDead(int peer);
  bool Dead(int peer) const;
  bool SetAside(int peer) const;
  // States of `peers`, in order (one lock).
  void Snapshot(const std::vector<int>& peers, std::vector<char>* state) const;

  // A reply from `peer` came `rtt` after its dispatch: kept for HedgeAfter, and ends a run of
  // lost races.
  void RecordRoundTrip(int peer, std::chrono::nanoseconds rtt);
  // How long after its dispatch a call to `peer` is hedged (Clock::duration::max() when never).
  transport::Clock::duration HedgeAfter(int peer, const HedgeOptions& o) const;
  // A hedge answered before `peer`'s call `id`. Returns true when the peer is now set aside and
  // `id` became its probe: the caller must not Wait it (CheckProbes does). False: Wait it.
  bool LostRace(int peer, uint64_t id, const HedgeOptions& o);
  // Looks at the probes of set-aside peers: a probe that completed makes its peer live again (a
  // reply) or dead (a failure); abandons the probes of peers marked dead since. Cheap when no
  // peer is set aside.
  void CheckProbes(transport::ClientTransport* client);

  uint64_t set_aside_total() const { return set_aside_total_.load(std::memory_order_relaxed); }
  uint64_t revived_total() const { return revived_total_.load(std::memory_order_relaxed); }
  // Peers set aside now.
  int set_aside_now() const { return probes_.load(std::memory_order_relaxed); }

 private:
  static constexpr int kRing = 128;
  struct Peer {
    State state = kLive;
    int misses = 0;
    uint64_t probe = 0;  // set aside: the late call whose completion revives the peer
    int samples = 0;     // round trips on record (at most kRing)
    int next = 0;
    int64_t p99_ns = 0;  // second longest of the ring
    std::vector<int64_t> ring;
  };
  Peer& At(int peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable Mutex mu_;
  std::vector<Peer> peers_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> orphans_ ABSL_GUARDED_BY(mu_);  // probes of peers marked dead: to abandon
  std::atomic<int> probes_{0};
  std::atomic<int> orphan_count_{0};
  std::atomic<uint64_t> set_aside_total_{0}, revived_total_{0};
};

// One finished round trip to one shard: its name, seconds from dispatch to combine, tokens sent,
// bytes out and in, and whether it succeeded. Called on the engine's thread; must be cheap.
using RoundTripObserver =
    std::function<void(const std::string& shard, double seconds, int64_t tokens, uint64_t bytes_out,
                       uint64_t bytes_in, bool ok)>;

struct RemoteExpertsOptions {
  wire::WireDType dtype = wire::WireDType::kBF16;
  std::chrono::milliseconds deadline{5000};  // per round trip
  HedgeOptions hedge;
  uint32_t sender_id = 0;
  RoundTripObserver observer;  // optional
  // The most pairs one message to a shard carries; a step with more for one shard goes as several
  // messages (the result is the same bits). 0: as many as the wire takes (MaxPairsPerMessage).
  int64_t max_pairs_per_call = 0;
};

// The most pairs a dispatch can carry with `hidden`-wide rows of `dtype`: its combine has a row
// per pair, within wire::kMaxTokens rows and wire::kMaxPayloadBytes bytes (the dispatch, at most
// a row per pair plus the pairs themselves, then fits too).
int64_t MaxPairsPerMessage(int64_t hidden, wire::WireDType dtype);

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
  // Calls that were late enough to be hedged, and late replies dropped because another replica
  // answered first (hedge or original). Thread-safe.
  uint64_t hedged_calls() const { return hedged_.load(std::memory_order_relaxed); }
  uint64_t late_replies_dropped() const { return late_dropped_.load(std::memory_order_relaxed); }
  // Tokens sent per (layer, expert) since start (for load reports). Thread-safe.
  uint64_t expert_tokens(int64_t layer, int64_t expert) const {
    return expert_tokens_[static_cast<size_t>(layer * n_experts_ + expert)].load(
        std::memory_order_relaxed);
  }

 private:
  // One message to one shard. A layer may send several to one shard (a hedge or retry of another
  // shard's pairs while its own call is out); a pair may be in two calls (original and hedge):
  // the first good answer for it wins.
  struct ShardCall {
    int shard = -1;
    uint64_t id = 0;
    uint64_t seq = 0;
    bool open = false;    // posted, not yet waited
    bool hedged = false;  // its pairs went to another replica too
    transport::Clock::time_point posted, hedge_at, deadline;
    uint64_t bytes_out = 0;
    std::vector<int64_t> tokens;  // local index -> token of the batch
    std::vector<int64_t> pairs;   // the dispatched pairs (indices into ids/w), in wire order
  };
  // Chooses shards for pairs `todo` (indices into ids/w) among live replicas not in avoid_
  // (else set-aside or hedged-away ones the pair has not been to, else any not failed), then
  // posts one message per shard. UNAVAILABLE when a pair has no candidate.
  absl::Status Dispatch(const std::vector<int64_t>& todo);
  absl::Status PlanReplicas(const std::vector<int64_t>& todo);
  // UNAVAILABLE for pair p: no usable replica, naming the shards that host it.
  absl::Status NoReplica(int64_t p) const;
  // The call posted to shard s in this round that takes another token (a new one when there is
  // none yet, or when the last one holds call_tokens_ tokens).
  size_t RoundCall(int s);
  void Post(size_t c, const std::vector<int64_t>& todo);
  // Waits for the call: a good reply fills its pairs' rows; a failure marks the shard dead or
  // unusable for this layer and sends its pairs that no other open call carries elsewhere.
  void Complete(size_t c);
  // The call is late: its pairs not yet answered go to another replica too, one they have not
  // been to: a live one, else a slow one (set aside, or hedged away from in this layer) rather
  // than waiting out the deadline of a shard that may be stopped.
  void Hedge(size_t c);
  // Sends `pairs` again, away from the shards in avoid_; fatal_ when some pair has no replica
  // left.
  void Resend(const std::vector<int64_t>& pairs);
  // Resends the pairs of call c that are unanswered and in no other open call.
  void ResendOrphans(size_t c);
  void RecordFailure(absl::Status st);
  // Closes the open calls once every pair is answered (late replies are dropped or become
  // probes).
  void DropLate();

  int64_t hidden_;
  int64_t n_experts_;
  transport::ClientTransport* client_;
  std::shared_ptr<const ExpertRouting> routing_;
  std::shared_ptr<PeerHealth> health_;
  RemoteExpertsOptions options_;
  uint64_t seq_ = 0;
  // The call in progress.
  int64_t layer_ = 0, t_ = 0, k_ = 0;
  size_t call_tokens_ = 1;  // the most tokens per call: each has up to k_ pairs in it
  const float* x_ = nullptr;
  const int32_t* ids_ = nullptr;
  const float* w_ = nullptr;
  std::vector<ShardCall> calls_;  // [0, n_calls_) are this layer's
  size_t n_calls_ = 0;
  std::vector<int> choice_;      // shard per pair, in the current round
  std::vector<int> round_call_;  // call per shard, in the current round
  std::vector<char> pair_done_;  // per pair: its row is in pair_rows_
  std::vector<int> pair_open_;   // per pair: open calls carrying it
  // Per pair: the replicas (bit j: Replicas(layer, expert)[j], j < 32) it was sent to in this
  // layer. A hedge sends a pair only to a replica it has not been to, which bounds the hedges.
  std::vector<uint32_t> pair_tried_;
  std::vector<int> chosen_j_;  // per pair: the index of its replica in the current round
  int64_t pairs_left_ = 0;
  std::vector<size_t> post_failed_;  // calls whose Post failed: their pairs go elsewhere
  absl::Status first_failure_, fatal_;
  // Scratch reused across layers.
  std::vector<int64_t> all_pairs_, retry_pairs_;
  // avoid_ per shard, for the layer in progress.
  static constexpr char kUsable = 0;
  static constexpr char kHedgedAway = 1;  // late: used again only where nothing else is left
  static constexpr char kFailed = 2;      // never again in this layer
  std::vector<char> state_, avoid_;
  std::vector<int64_t> assigned_;
  // Per (token, shard) in the current round: the token's index in its call to that shard, and
  // that call.
  std::vector<int64_t> local_index_;
  std::vector<int> local_call_;
  std::vector<float> rows_;
  std::vector<wire::Pair> pairs_;
  std::vector<uint8_t> reply_;
  std::vector<float> pair_rows_;  // [t, k, D]: the unweighted output of each pair
  std::vector<uint64_t> wait_ids_;
  std::vector<size_t> wait_calls_;
  uint64_t round_trips_ = 0, rerouted_ = 0;
  std::atomic<uint64_t> hedged_{0}, late_dropped_{0};
  std::unique_ptr<std::atomic<uint64_t>[]> expert_tokens_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_REMOTE_EXPERTS_H_
