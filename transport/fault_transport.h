// Test only: a ClientTransport that forwards every call to a real one and injects faults per peer
// (leveldb's fault_injection_test pattern: wrap the real implementation, do not fake it). It also
// counts, per peer, the dispatch messages handed to the real transport and the tokens and pairs
// in them (decoded with wire::DecodeMessage), so that tests can see where a client sent its work.
//
// Thread-safe (like the transport it wraps).
#ifndef DMOE_TRANSPORT_FAULT_TRANSPORT_H_
#define DMOE_TRANSPORT_FAULT_TRANSPORT_H_

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "transport/transport.h"
#include "transport/wire.h"

namespace dmoe::testing {

class FaultInjectingClient : public transport::ClientTransport {
 public:
  enum class Fault {
    kNone,
    // Post fails with UNAVAILABLE ("peer known to have failed"); nothing reaches the peer.
    kRefusePost,
    // The request reaches the peer, but Wait reports UNAVAILABLE, as when the peer dies mid-call.
    kFailWait,
    // The request reaches the peer (which computes it) but the reply never comes back: Wait
    // returns DEADLINE_EXCEEDED at the caller's deadline, not before.
    kWithholdReply,
    // The reply is held back, as by a stopped (SIGSTOP) peer, until ReleaseHeld (SIGCONT): then
    // Poll, WaitAny and Wait see the real reply. A Wait whose deadline passes first abandons it.
    kHoldReply,
    // The reply is held back until SetDelay's delay after the Post (a slow peer), then seen as
    // it is. A Wait whose deadline comes first abandons it.
    kDelayReply,
    // The real reply comes back with its first byte (the magic) flipped.
    kCorruptReply,
    // The real reply comes back cut to half its length.
    kTruncateReply,
    // The real reply comes back well-formed but answering another dispatch: its step_seq is one
    // less (re-encoded with wire::EncodeCombine; an error reply is left as it is).
    kStaleReply,
  };

  // Does not own `real`, which must outlive this.
  explicit FaultInjectingClient(transport::ClientTransport* real) : real_(real) {}
  ~FaultInjectingClient() override { ReleaseWithheld(); }

  // Applies to requests posted from now on.
  void SetFault(int peer, Fault f) {
    MutexLock l(&mu_);
    faults_[peer] = f;
  }
  // The delay of kDelayReply for requests posted to `peer` from now on.
  void SetDelay(int peer, transport::Clock::duration d) {
    MutexLock l(&mu_);
    delays_[peer] = d;
  }
  // Ends every Wait that is withholding a reply (they return DEADLINE_EXCEEDED at once).
  void ReleaseWithheld() {
    MutexLock l(&mu_);
    released_ = true;
    cv_.SignalAll();
  }

  // Lets every held reply through (kHoldReply), now and from now on.
  void ReleaseHeld() {
    MutexLock l(&mu_);
    hold_released_ = true;
    cv_.SignalAll();
  }

  // Dispatch messages handed to the real transport for `peer` (refused posts are not counted),
  // and the tokens / (token, expert) pairs they carried.
  uint64_t posts(int peer) const { return Count(peer).posts; }
  uint64_t tokens(int peer) const { return Count(peer).tokens; }
  uint64_t pairs(int peer) const { return Count(peer).pairs; }
  // Post calls refused by kRefusePost.
  uint64_t refused(int peer) const { return Count(peer).refused; }
  void ResetCounts() {
    MutexLock l(&mu_);
    counts_.clear();
  }

  absl::StatusOr<int> Connect(const std::string& address) override {
    return real_->Connect(address);
  }
  // Forwarded only: requests whose replies this holds (kHoldReply, kDelayReply, kWithholdReply)
  // keep their fault's behaviour, where the real transport would end them UNAVAILABLE.
  void Disconnect(int peer) override { real_->Disconnect(peer); }

  absl::StatusOr<uint64_t> Post(int peer, std::vector<uint8_t> request) override {
    Fault f;
    {
      MutexLock l(&mu_);
      auto it = faults_.find(peer);
      f = it == faults_.end() ? Fault::kNone : it->second;
      if (f == Fault::kRefusePost) {
        ++counts_[peer].refused;
      } else {
        PerPeer& c = counts_[peer];
        ++c.posts;
        auto v = wire::DecodeMessage(request.data(), request.size());
        if (v.ok()) {
          c.tokens += v->header.token_count;
          c.pairs += v->header.pair_count;
        }
      }
    }
    if (f == Fault::kRefusePost) {
      real_->ReleaseBuffer(std::move(request));
      return absl::UnavailableError(absl::StrCat("injected: peer ", peer, " refused the post"));
    }
    const transport::Clock::time_point posted = transport::Clock::now();
    auto id = real_->Post(peer, std::move(request));
    if (id.ok()) {
      MutexLock l(&mu_);
      fault_of_id_[*id] = f;
      if (f == Fault::kDelayReply) release_at_[*id] = posted + delays_[peer];
    }
    return id;
  }

  bool Poll(uint64_t id) override { return !Held(id) && real_->Poll(id); }

  int WaitAny(const uint64_t* ids, size_t n, transport::Clock::time_point until) override {
    std::vector<uint64_t> open;
    std::vector<int> index;
    // A delayed reply comes through at its time: no wait goes past it. (One clock reading under
    // one lock: a reply released between two readings would be neither open nor waited for.)
    transport::Clock::time_point wake = until;
    {
      MutexLock l(&mu_);
      const transport::Clock::time_point now = transport::Clock::now();
      for (size_t i = 0; i < n; ++i) {
        if (HeldLocked(ids[i], now)) {
          auto at = release_at_.find(ids[i]);
          if (at != release_at_.end()) wake = std::min(wake, at->second);
          continue;
        }
        open.push_back(ids[i]);
        index.push_back(static_cast<int>(i));
      }
    }
    if (open.empty()) {
      // Only held (or withheld) replies: nothing completes before a release or `until`.
      {
        MutexLock l(&mu_);
        while (cv_.WaitUntil(&mu_, wake)) {
          bool all_held = true;
          for (size_t i = 0; i < n && all_held; ++i) all_held = HeldLocked(ids[i]);
          if (!all_held) break;
        }
      }
      return transport::Clock::now() >= until ? -1 : WaitAny(ids, n, until);
    }
    const int i = real_->WaitAny(open.data(), open.size(), wake);
    if (i >= 0) return index[static_cast<size_t>(i)];
    return transport::Clock::now() >= until ? -1 : WaitAny(ids, n, until);
  }

  absl::Status Wait(uint64_t id, transport::Clock::time_point deadline,
                    std::vector<uint8_t>* reply) override {
    Fault f = Fault::kNone;
    {
      MutexLock l(&mu_);
      auto it = fault_of_id_.find(id);
      if (it != fault_of_id_.end()) {
        f = it->second;
        fault_of_id_.erase(it);
      }
    }
    if (f == Fault::kDelayReply) {
      transport::Clock::time_point at;
      {
        MutexLock l(&mu_);
        at = release_at_[id];
        release_at_.erase(id);
      }
      if (deadline < at) {
        std::this_thread::sleep_until(deadline);
        std::vector<uint8_t> dropped;
        if (real_->Wait(id, transport::Clock::now(), &dropped).ok()) {
          real_->ReleaseBuffer(std::move(dropped));
        }
        return absl::DeadlineExceededError("injected: reply delayed past the deadline");
      }
      std::this_thread::sleep_until(at);
    }
    if (f == Fault::kHoldReply) {
      MutexLock l(&mu_);
      while (!hold_released_ && cv_.WaitUntil(&mu_, deadline)) {
      }
      if (!hold_released_) {
        // Still held at the deadline: the request is abandoned, as a late one would be.
        l.Unlock();
        std::vector<uint8_t> dropped;
        if (real_->Wait(id, transport::Clock::now(), &dropped).ok()) {
          real_->ReleaseBuffer(std::move(dropped));
        }
        return absl::DeadlineExceededError("injected: reply held past the deadline");
      }
    }
    absl::Status st = real_->Wait(id, deadline, reply);
    switch (f) {
      case Fault::kNone:
      case Fault::kRefusePost:
        return st;
      case Fault::kFailWait:
        if (st.ok()) real_->ReleaseBuffer(std::move(*reply));
        return absl::UnavailableError("injected: peer failed during the call");
      case Fault::kWithholdReply: {
        if (st.ok()) real_->ReleaseBuffer(std::move(*reply));
        // The real reply (if any) is dropped; the caller sees a peer that never answered, so its
        // wait ends at its own deadline (bounded), or earlier on ReleaseWithheld.
        MutexLock l(&mu_);
        while (!released_ && cv_.WaitUntil(&mu_, deadline)) {
        }
        return absl::DeadlineExceededError("injected: no reply before the deadline");
      }
      case Fault::kHoldReply:
      case Fault::kDelayReply:
        return st;
      case Fault::kCorruptReply:
        if (st.ok() && !reply->empty()) (*reply)[0] ^= 0xff;
        return st;
      case Fault::kTruncateReply:
        if (st.ok()) reply->resize(reply->size() / 2);
        return st;
      case Fault::kStaleReply:
        if (st.ok()) Restamp(reply);
        return st;
    }
    return st;
  }

  std::vector<uint8_t> AcquireBuffer() override { return real_->AcquireBuffer(); }
  void ReleaseBuffer(std::vector<uint8_t> buffer) override {
    real_->ReleaseBuffer(std::move(buffer));
  }

 private:
  static void Restamp(std::vector<uint8_t>* reply) {
    auto v = wire::DecodeMessage(reply->data(), reply->size());
    if (!v.ok() || v->header.kind != wire::Kind::kCombine) return;
    wire::Header h = v->header;
    h.step_seq -= 1;
    std::vector<float> rows(static_cast<size_t>(h.token_count) * h.hidden_size);
    for (uint32_t i = 0; i < h.token_count; ++i) {
      v->RowToFloat(i, rows.data() + static_cast<size_t>(i) * h.hidden_size);
    }
    std::vector<uint8_t> out;
    wire::EncodeCombine(h, rows.data(), &out);
    *reply = std::move(out);
  }

  // Whether `id`'s reply is being kept from the caller (withheld, or held and not released).
  bool Held(uint64_t id) const {
    MutexLock l(&mu_);
    return HeldLocked(id);
  }
  bool HeldLocked(uint64_t id, transport::Clock::time_point now = transport::Clock::now()) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = fault_of_id_.find(id);
    if (it == fault_of_id_.end()) return false;
    if (it->second == Fault::kWithholdReply) return !released_;
    if (it->second == Fault::kDelayReply) {
      auto at = release_at_.find(id);
      return at != release_at_.end() && now < at->second;
    }
    return it->second == Fault::kHoldReply && !hold_released_;
  }

  struct PerPeer {
    uint64_t posts = 0, tokens = 0, pairs = 0, refused = 0;
  };
  PerPeer Count(int peer) const {
    MutexLock l(&mu_);
    auto it = counts_.find(peer);
    return it == counts_.end() ? PerPeer() : it->second;
  }

  transport::ClientTransport* real_;
  mutable Mutex mu_;
  CondVar cv_;
  bool released_ ABSL_GUARDED_BY(mu_) = false;
  bool hold_released_ ABSL_GUARDED_BY(mu_) = false;
  std::map<int, Fault> faults_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, Fault> fault_of_id_ ABSL_GUARDED_BY(mu_);
  std::map<int, transport::Clock::duration> delays_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, transport::Clock::time_point> release_at_ ABSL_GUARDED_BY(mu_);
  std::map<int, PerPeer> counts_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmoe::testing

#endif  // DMOE_TRANSPORT_FAULT_TRANSPORT_H_
