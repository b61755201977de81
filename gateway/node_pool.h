// The attention nodes a gateway balances over: load polled through GetLoad, power-of-two-choices
// picks by reported load, unhealthy nodes skipped. A node is unhealthy once a poll is refused (or
// the connection fails) or kMaxMissedPolls polls in a row are late; a single late poll (a busy
// node on a loaded machine) leaves it as it was. Thread-safe.
#ifndef DMOE_GATEWAY_NODE_POOL_H_
#define DMOE_GATEWAY_NODE_POOL_H_

#include <atomic>
#include <condition_variable>
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
  explicit NodePool(const std::vector<std::string>& addresses,
                    std::chrono::milliseconds poll = std::chrono::milliseconds(50),
                    std::string cluster_token = "",
                    std::chrono::milliseconds keepalive = std::chrono::milliseconds(10000));
  ~NodePool();
  // A node to send a request to, not in `exclude`: a healthy one; when none is, one that is only
  // late (panic mode); -1 when every node is excluded or refused.
  int Pick(const std::set<int>& exclude);
  internal::AttentionService::Stub* stub(int i) {
    return nodes_[static_cast<size_t>(i)]->stub.get();
  }
  const std::string& address(int i) const { return nodes_[static_cast<size_t>(i)]->address; }
  const std::string& cluster_token() const { return cluster_token_; }
  // Nodes known and not retired.
  size_t size() const;
  // Adds a node (e.g. one the router lists); false if it is known already or the pool is full.
  // A retired node added again is taken back (true).
  bool Add(const std::string& address);
  // Retires the nodes not in `listed` (the router's list) that do not answer either: they are no
  // longer polled or picked (in Kubernetes every restart brings a new address, and each dead one
  // cost the polls a 500 ms timeout per round). A healthy node is kept even when unlisted (a
  // router restarted moments ago lists nobody yet). Returns how many it retired.
  int Retire(const std::set<std::string>& listed);
  // Nodes picked from: their last poll succeeded, or was late fewer than kMaxMissedPolls times.
  size_t healthy() const;
  // The last reported load of the healthy nodes, summed (block_tokens: the largest).
  struct Totals {
    int64_t running = 0, waiting = 0, free_blocks = 0, total_blocks = 0, block_tokens = 0;
  };
  Totals totals() const;
  // Marks a node down (not even tried in panic mode) until its next successful poll.
  void MarkFailed(int i);
  // Counts a request started on / finished with node i (load between polls).
  void Started(int i);
  void Ended(int i);

 private:
  // Fields other than address and stub are guarded by mu_ (not annotatable from a nested type).
  struct Node {
    std::string address;
    std::unique_ptr<internal::AttentionService::Stub> stub;
    bool healthy = false;
    internal::GetLoadReply load;
    int inflight = 0;      // requests this gateway has on it
    int missed = 0;        // polls late in a row
    bool refused = false;  // the last poll or request failed fast (refused, reset): down
    bool retired = false;  // gone from the router's list and not answering: left alone
  };
  double Score(const Node& n) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Poll();

  static constexpr size_t kMaxNodes = 16384;
  static constexpr int kMaxMissedPolls = 3;  // x 500 ms poll deadline
  // Reserved to kMaxNodes and only appended to: nodes_[i] stays valid without the lock.
  std::vector<std::unique_ptr<Node>> nodes_;
  mutable Mutex mu_;
  CondVar cv_;
  bool full_logged_ ABSL_GUARDED_BY(mu_) = false;  // Add refused a node: logged once
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::mt19937 rng_ ABSL_GUARDED_BY(mu_){12345};
  std::chrono::milliseconds poll_;
  const std::string cluster_token_;
  const std::chrono::milliseconds keepalive_;
  std::thread poller_;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_NODE_POOL_H_
