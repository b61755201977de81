#include "transport/inproc.h"

#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "transport/buffer_pool.h"

namespace dmoe::transport {
namespace {

class InprocClient;

// One pending request as both sides see it.
struct Exchange {
  Mutex mu;
  CondVar cv;
  int peer = -1;  // the client's peer index (set before the exchange is shared)
  bool done ABSL_GUARDED_BY(mu) = false;
  absl::Status status ABSL_GUARDED_BY(mu);
  std::vector<uint8_t> reply ABSL_GUARDED_BY(mu);
};

class InprocServer : public ServerTransport {
 public:
  ~InprocServer() override { Shutdown(); }
  absl::StatusOr<std::string> Listen(const std::string& address) override;
  void Receive(std::chrono::milliseconds timeout, std::vector<ServerRequest>* out) override {
    MutexLock l(&mu_);
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (queue_.empty() && !closed_ && cv_.WaitUntil(&mu_, until)) {
    }
    while (!queue_.empty()) {
      out->push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
  }
  void Reply(uint64_t token, std::vector<uint8_t> reply) override {
    std::shared_ptr<Exchange> ex;
    {
      MutexLock l(&mu_);
      auto it = pending_.find(token);
      if (it == pending_.end()) {
        ++stats_.dropped_replies;
        return;
      }
      ex = it->second;
      pending_.erase(it);
      ++stats_.replies;
      stats_.bytes_out += reply.size();
    }
    MutexLock l(&ex->mu);
    if (ex->done) return;  // the client disconnected the peer meanwhile
    ex->reply = std::move(reply);
    ex->done = true;
    ex->cv.SignalAll();
  }
  std::vector<uint8_t> AcquireBuffer() override { return pool_.Acquire(); }
  void ReleaseBuffer(std::vector<uint8_t> b) override { pool_.Release(std::move(b)); }
  ServerStats stats() const override {
    MutexLock l(&mu_);
    return stats_;
  }
  void Shutdown() override;

  // Called by clients: enqueue a request whose reply completes `ex`.
  bool Submit(std::vector<uint8_t> bytes, std::shared_ptr<Exchange> ex) {
    MutexLock l(&mu_);
    if (closed_) return false;
    const uint64_t token = next_token_++;
    pending_[token] = std::move(ex);
    ++stats_.requests;
    stats_.bytes_in += bytes.size();
    queue_.push_back(ServerRequest{token, std::move(bytes)});
    cv_.SignalAll();
    return true;
  }

 private:
  std::string name_;
  mutable Mutex mu_;
  CondVar cv_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_token_ ABSL_GUARDED_BY(mu_) = 1;
  std::deque<ServerRequest> queue_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::shared_ptr<Exchange>> pending_ ABSL_GUARDED_BY(mu_);
  ServerStats stats_ ABSL_GUARDED_BY(mu_);
  BufferPool pool_;
};

Mutex& RegistryMu() {
  static Mutex mu;
  return mu;
}
std::map<std::string, InprocServer*>& Registry() {
  static auto* r = new std::map<std::string, InprocServer*>();
  return *r;
}

absl::StatusOr<std::string> InprocServer::Listen(const std::string& address) {
  MutexLock l(&RegistryMu());
  std::string name = address;
  if (absl::StartsWith(name, "inproc:")) name = name.substr(7);
  if (name.empty() || name == "0") name = absl::StrCat("server-", Registry().size() + 1);
  while (Registry().count(name)) name += "+";
  Registry()[name] = this;
  name_ = name;
  return "inproc:" + name;
}

void InprocServer::Shutdown() {
  {
    MutexLock l(&RegistryMu());
    auto it = Registry().find(name_);
    if (it != Registry().end() && it->second == this) Registry().erase(it);
  }
  std::map<uint64_t, std::shared_ptr<Exchange>> pending;
  {
    MutexLock l(&mu_);
    closed_ = true;
    queue_.clear();
    pending.swap(pending_);
    cv_.SignalAll();
  }
  for (auto& [_, ex] : pending) {
    MutexLock l(&ex->mu);
    ex->done = true;
    ex->status = absl::UnavailableError(absl::StrCat("inproc server ", name_, " shut down"));
    ex->cv.SignalAll();
  }
}

absl::Status Disconnected(const std::string& server) {
  return absl::UnavailableError(
      absl::StrCat("inproc server ", server, ": disconnected by this node"));
}

class InprocClient : public ClientTransport {
 public:
  absl::StatusOr<int> Connect(const std::string& address) override {
    std::string name = address;
    if (absl::StartsWith(name, "inproc:")) name = name.substr(7);
    MutexLock rl(&RegistryMu());
    if (!Registry().count(name)) {
      return absl::UnavailableError(absl::StrCat("no inproc server named \"", name, "\""));
    }
    MutexLock l(&mu_);
    peers_.push_back(name);
    return static_cast<int>(peers_.size() - 1);
  }
  void Disconnect(int peer) override {
    std::vector<std::shared_ptr<Exchange>> ended;
    std::string name;
    {
      MutexLock l(&mu_);
      if (peer < 0 || peer >= static_cast<int>(peers_.size()) || !gone_.insert(peer).second) {
        return;
      }
      name = peers_[static_cast<size_t>(peer)];
      for (const auto& [id, ex] : inflight_) {
        if (ex->peer == peer) ended.push_back(ex);
      }
    }
    for (const auto& ex : ended) {
      MutexLock l(&ex->mu);
      if (ex->done) continue;
      ex->done = true;
      ex->status = Disconnected(name);
      ex->cv.SignalAll();
    }
  }
  absl::StatusOr<uint64_t> Post(int peer, std::vector<uint8_t> request) override {
    std::string name;
    {
      MutexLock l(&mu_);
      if (peer < 0 || peer >= static_cast<int>(peers_.size())) {
        return absl::InvalidArgumentError(absl::StrCat("no peer ", peer));
      }
      name = peers_[static_cast<size_t>(peer)];
      if (gone_.count(peer)) {
        return Disconnected(name);
      }
    }
    auto ex = std::make_shared<Exchange>();
    ex->peer = peer;
    {
      MutexLock rl(&RegistryMu());
      auto it = Registry().find(name);
      if (it == Registry().end() || !it->second->Submit(std::move(request), ex)) {
        return absl::UnavailableError(absl::StrCat("inproc server ", name, " is gone"));
      }
    }
    MutexLock l(&mu_);
    if (gone_.count(peer)) {  // disconnected while this was submitted: ended as Disconnect ends
      MutexLock e(&ex->mu);
      ex->done = true;
      ex->status = Disconnected(name);
    }
    const uint64_t id = next_id_++;
    inflight_[id] = std::move(ex);
    return id;
  }
  bool Poll(uint64_t id) override {
    std::shared_ptr<Exchange> ex = Find(id);
    if (!ex) return true;
    MutexLock l(&ex->mu);
    return ex->done;
  }
  absl::Status Wait(uint64_t id, Clock::time_point deadline, std::vector<uint8_t>* reply) override {
    std::shared_ptr<Exchange> ex = Find(id);
    if (!ex) return absl::InvalidArgumentError(absl::StrCat("unknown request id ", id));
    MutexLock l(&ex->mu);
    while (!ex->done && ex->cv.WaitUntil(&ex->mu, deadline)) {
    }
    const bool done = ex->done;
    absl::Status st = done ? ex->status : absl::DeadlineExceededError("inproc request timed out");
    if (done && st.ok()) *reply = std::move(ex->reply);
    l.Unlock();
    MutexLock g(&mu_);
    inflight_.erase(id);
    return st;
  }
  std::vector<uint8_t> AcquireBuffer() override { return pool_.Acquire(); }
  void ReleaseBuffer(std::vector<uint8_t> b) override { pool_.Release(std::move(b)); }

 private:
  std::shared_ptr<Exchange> Find(uint64_t id) {
    MutexLock l(&mu_);
    auto it = inflight_.find(id);
    return it == inflight_.end() ? nullptr : it->second;
  }
  Mutex mu_;
  std::vector<std::string> peers_;
  std::set<int> gone_;  // disconnected peers
  uint64_t next_id_ = 1;
  std::map<uint64_t, std::shared_ptr<Exchange>> inflight_;
  BufferPool pool_;
};

}  // namespace

std::unique_ptr<ServerTransport> NewInprocServer() { return std::make_unique<InprocServer>(); }
std::unique_ptr<ClientTransport> NewInprocClient() { return std::make_unique<InprocClient>(); }

}  // namespace dmoe::transport
