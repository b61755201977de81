// The attention nodes a gateway balances over: load polled through GetLoad, power-of-two-choices
// picks by reported load, unhealthy nodes skipped. A node is unhealthy once a poll is refused (or
// the connection fails) or kMaxMissedPolls polls in a row are late; a single late poll (a busy
// node on a loaded machine) leaves it as it was. Thread-safe.
#ifndef DMOE_GATEWAY_NODE_POOL_H_
#define DMOE_GATEWAY_NODE_POOL_H_

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/mutex.h"
#include "proto/attention.grpc.pb.h"

namespace dmoe::gateway {

class NodePool {
 public:
  // `cluster_token` (common/cluster_token.h) goes with every call to a node; empty: none.
  // `keepalive`: each node's channel pings it this often while a call is open, and closes (its
  // streams ending UNAVAILABLE) when a ping goes unanswered as long: a node that stalls without
  // closing its connection (SIGSTOP, a hung host) cannot hold a stream forever.
  // `max_nodes`: nodes held at once (retired ones with requests on them included).
  explicit NodePool(const std::vector<std::string>& addresses,
                    std::chrono::milliseconds poll = std::chrono::milliseconds(50),
                    std::string cluster_token = "",
                    std::chrono::milliseconds keepalive = std::chrono::milliseconds(10000),
                    size_t max_nodes = 16384);
  ~NodePool();
  // A node to send a request to, not in `exclude`: a healthy one; when none is, one that is only
  // late (panic mode); -1 when every node is excluded or refused. A node's number is never
  // reused, though the node may be gone (retired and forgotten) by the time Started is called.
  int Pick(const std::set<int>& exclude);
  const std::string& cluster_token() const { return cluster_token_; }
  // Nodes known and not retired.
  size_t size() const;
  // Adds a node (e.g. one the router lists); false if it is known already or the pool is full.
  // A retired node added again is taken back (true).
  bool Add(const std::string& address);
  // Retires the nodes not in `listed` (the router's list) that do not answer either: they are no
  // longer polled or picked (in Kubernetes every restart brings a new address, and each dead one
  // cost the polls a 500 ms timeout per round). A healthy node is kept even when unlisted (a
  // router restarted moments ago lists nobody yet). Returns how many it retired. A retired node
  // is forgotten (its channel closed) once no request of this gateway is on it.
  int Retire(const std::set<std::string>& listed);
  // Nodes picked from: their last poll succeeded, or was late fewer than kMaxMissedPolls times.
  size_t healthy() const;
  // The last reported load of the healthy nodes, summed (block_tokens: the largest;
  // smallest_cache_tokens: the fewest tokens one node's cache holds, 0 with no healthy node).
  struct Totals {
    int64_t running = 0, waiting = 0, free_blocks = 0, total_blocks = 0, block_tokens = 0;
    int64_t smallest_cache_tokens = 0;
  };
  Totals totals() const;
  // Marks a node down (not even tried in panic mode) until its next successful poll.
  void MarkFailed(int i);
  // Counts a request started on node i (load between polls) and returns the stub to send it
  // with, or null when node i is gone (the caller picks again). Every Started that returned a
  // stub is followed by one Ended(i).
  std::shared_ptr<internal::AttentionService::Stub> Started(int i);
  void Ended(int i);
  // Nodes held, retired ones not yet forgotten included (tests).
  size_t held() const;

 private:
  // Fields other than address and stub are guarded by mu_ (not annotatable from a nested type).
  struct Node {
    std::string address;
    std::shared_ptr<internal::AttentionService::Stub> stub;
    bool healthy = false;
    internal::GetLoadReply load;
    int inflight = 0;      // requests this gateway has on it
    int missed = 0;        // polls late in a row
    bool refused = false;  // the last poll or request failed fast (refused, reset): down
    bool retired = false;  // gone from the router's list and not answering: left alone
  };
  double Score(const Node& n) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Poll();

  static constexpr int kMaxMissedPolls = 3;  // x 500 ms poll deadline
  mutable Mutex mu_;
  // By number (from next_id_, never reused). Shared: a poll in flight keeps its node alive.
  std::map<int, std::shared_ptr<Node>> nodes_ ABSL_GUARDED_BY(mu_);
  int next_id_ ABSL_GUARDED_BY(mu_) = 0;
  CondVar cv_;
  bool full_logged_ ABSL_GUARDED_BY(mu_) = false;  // Add refused a node: logged once
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::mt19937 rng_ ABSL_GUARDED_BY(mu_){12345};
  std::chrono::milliseconds poll_;
  const std::string cluster_token_;
  const std::chrono::milliseconds keepalive_;
  const size_t max_nodes_;
  std::thread poller_;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_NODE_POOL_H_
