#include "gateway/node_pool.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <limits>

#include "common/cluster_token.h"
#include "common/internal_tls.h"
#include "common/logging.h"
#include "common/mutex.h"

namespace dmoe::gateway {

NodePool::NodePool(const std::vector<std::string>& addresses, std::chrono::milliseconds poll,
                   std::string cluster_token, std::chrono::milliseconds keepalive, size_t max_nodes)
    : poll_(poll),
      cluster_token_(std::move(cluster_token)),
      keepalive_(keepalive),
      max_nodes_(max_nodes) {
  for (const std::string& a : addresses) Add(a);
  Poll();  // a first view before serving
  poller_ = std::thread([this] {
    MutexLock l(&mu_);
    while (!stop_) {
      const auto until = std::chrono::steady_clock::now() + poll_;
      while (!stop_ && cv_.WaitUntil(&mu_, until)) {
      }
      if (stop_) break;
      l.Unlock();
      Poll();
      l.Lock();
    }
  });
}

NodePool::~NodePool() {
  {
    MutexLock l(&mu_);
    stop_ = true;
    cv_.SignalAll();
  }
  poller_.join();
}

size_t NodePool::size() const {
  MutexLock l(&mu_);
  size_t n = 0;
  for (const auto& [i, x] : nodes_) n += !x->retired;
  return n;
}

size_t NodePool::held() const {
  MutexLock l(&mu_);
  return nodes_.size();
}

int NodePool::Retire(const std::set<std::string>& listed) {
  MutexLock l(&mu_);
  int retired = 0;
  for (auto it = nodes_.begin(); it != nodes_.end();) {
    Node& n = *it->second;
    if (!n.retired && !n.healthy && !listed.count(n.address)) {
      n.retired = true;
      ++retired;
    }
    // Forgotten once no request is on it (else the last Ended does it): each restart of an
    // attention pod brings a new address, and a long-lived gateway would hold them all.
    it = n.retired && n.inflight == 0 ? nodes_.erase(it) : std::next(it);
  }
  return retired;
}

bool NodePool::Add(const std::string& address) {
  MutexLock l(&mu_);
  for (auto& [i, n] : nodes_) {
    if (n->address != address) continue;
    if (!n->retired) return false;
    n->retired = false;  // listed again before it was forgotten: polled again
    n->missed = 0;
    cv_.SignalAll();
    return true;
  }
  if (nodes_.size() >= max_nodes_) {
    if (!full_logged_) {
      spdlog::error(
          "the gateway holds {} attention nodes (retired ones with requests on them included) "
          "and takes no more ({} is not used)",
          max_nodes_, address);
      full_logged_ = true;
    }
    return false;
  }
  auto n = std::make_shared<Node>();
  n->address = address;
  grpc::ChannelArguments args;
  const int ms = static_cast<int>(keepalive_.count());
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, ms);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ms);
  // A generation stream sends nothing after its request: pings must not wait for client data.
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  n->stub = internal::AttentionService::NewStub(InternalChannel(address, args));
  nodes_.emplace(next_id_++, std::move(n));
  cv_.SignalAll();  // poll it soon
  return true;
}

size_t NodePool::healthy() const {
  MutexLock l(&mu_);
  size_t n = 0;
  for (const auto& [i, x] : nodes_) n += x->healthy;
  return n;
}

NodePool::Totals NodePool::totals() const {
  MutexLock l(&mu_);
  Totals t;
  for (const auto& [i, x] : nodes_) {
    if (!x->healthy) continue;
    t.running += x->load.running();
    t.waiting += x->load.waiting();
    t.free_blocks += x->load.free_blocks();
    t.total_blocks += x->load.total_blocks();
    t.block_tokens = std::max(t.block_tokens, x->load.block_tokens());
    int64_t tokens = 0;  // what the node reports: saturated, and none when not positive
    if (__builtin_mul_overflow(x->load.total_blocks(), x->load.block_tokens(), &tokens)) {
      tokens = std::numeric_limits<int64_t>::max();
    }
    if (tokens <= 0) continue;
    if (t.smallest_cache_tokens == 0 || tokens < t.smallest_cache_tokens) {
      t.smallest_cache_tokens = tokens;
    }
  }
  return t;
}

void NodePool::Poll() {
  std::vector<std::shared_ptr<Node>> nodes;
  {
    MutexLock l(&mu_);
    for (auto& [i, n] : nodes_) {
      if (!n->retired) nodes.push_back(n);
    }
  }
  for (const std::shared_ptr<Node>& n : nodes) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
    AddClusterToken(&ctx, cluster_token_);
    internal::GetLoadReply reply;
    const grpc::Status st = n->stub->GetLoad(&ctx, internal::GetLoadRequest(), &reply);
    MutexLock l(&mu_);
    if (n->retired) continue;
    if (st.ok()) {
      n->healthy = !reply.draining();  // (a draining node refuses new requests)
      n->refused = false;
      n->missed = 0;
      n->load = reply;
    } else if (st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      // A late answer is a busy node (a loaded machine), not yet a dead one.
      if (++n->missed >= kMaxMissedPolls) n->healthy = false;
    } else {
      n->healthy = false;  // refused or reset: down
      n->refused = true;
    }
  }
}

double NodePool::Score(const Node& n) const {
  // Lower is better: work queued there (prompt tokens, waiting and running sequences, and what we
  // sent since the last poll), with fewer free KV blocks breaking ties.
  const auto& l = n.load;
  const double used =
      l.total_blocks() > 0 ? 1.0 - static_cast<double>(l.free_blocks()) / l.total_blocks() : 0.0;
  return static_cast<double>(l.queued_prefill_tokens()) + 256.0 * l.waiting() + 16.0 * l.running() +
         16.0 * n.inflight + used;
}

int NodePool::Pick(const std::set<int>& exclude) {
  MutexLock l(&mu_);
  std::vector<int> ok;
  for (const auto& [i, n] : nodes_) {
    if (n->healthy && !exclude.count(i)) ok.push_back(i);
  }
  if (ok.empty()) {
    // Panic mode (as load balancers do when too few hosts look healthy): rather than refuse, try a
    // node that is only late, not refused; a dead one fails fast and the caller excludes it.
    for (const auto& [i, n] : nodes_) {
      if (!n->refused && !n->retired && !exclude.count(i)) ok.push_back(i);
    }
  }
  if (ok.empty()) return -1;
  if (ok.size() == 1) return ok[0];
  // Power of two choices.
  std::uniform_int_distribution<size_t> d(0, ok.size() - 1);
  const int a = ok[d(rng_)];
  int b = ok[d(rng_)];
  if (b == a) b = ok[(std::find(ok.begin(), ok.end(), a) - ok.begin() + 1) % ok.size()];
  return Score(*nodes_.at(a)) <= Score(*nodes_.at(b)) ? a : b;
}

void NodePool::MarkFailed(int i) {
  MutexLock l(&mu_);
  auto it = nodes_.find(i);
  if (it == nodes_.end()) return;
  it->second->healthy = false;
  it->second->refused = true;
}

std::shared_ptr<internal::AttentionService::Stub> NodePool::Started(int i) {
  MutexLock l(&mu_);
  auto it = nodes_.find(i);
  if (it == nodes_.end()) return nullptr;
  ++it->second->inflight;
  return it->second->stub;
}

void NodePool::Ended(int i) {
  MutexLock l(&mu_);
  auto it = nodes_.find(i);
  if (it == nodes_.end()) return;
  if (--it->second->inflight == 0 && it->second->retired) nodes_.erase(it);
}

}  // namespace dmoe::gateway
