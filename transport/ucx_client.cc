#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "transport/buffer_pool.h"
#include "transport/slot_table.h"
#include "transport/ucx.h"
#include "transport/ucx_worker.h"

namespace dmoe::transport {
namespace ucx_internal {
namespace {

class UcxClient : public ClientTransport, public UcxWorker {
 public:
  explicit UcxClient(std::string token) : token_(std::move(token)) {}
  ~UcxClient() override {
    // Destruction: no other thread uses the peers any more (and the UCX calls below run the
    // callbacks that take mu_, so it cannot be held here).
    RunSync([this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      {
        // A wireup check ended by the closes below must not close its endpoint a second time.
        MutexLock l(&mu_);
        for (Peer& p : peers_) EndWiringLocked(&p);
      }
      // One bound for all the flushes below, however many peers.
      const auto until = Clock::now() + std::chrono::milliseconds(500);
      for (Peer& p : peers_) {
        if (p.ep != nullptr) {
          // Flush first (bounded): a connection whose wireup is still in flight, force-closed,
          // made Debian's UCX 1.13 on the *server* abort (ucp_request.c:684 "got REP message"
          // on the refused wireup reply) -- a client that connected and left at once killed a
          // shard.
          if (!p.failed) {
            ucp_request_param_t fprm;
            std::memset(&fprm, 0, sizeof(fprm));
            void* flush = ucp_ep_flush_nbx(p.ep, &fprm);
            if (flush != nullptr && !UCS_PTR_IS_ERR(flush)) {
              while (ucp_request_check_status(flush) == UCS_INPROGRESS && Clock::now() < until) {
                ucp_worker_progress(worker_);
              }
              // Unfinished (a hung peer): UCX releases it when the forced close below ends it
              // (flushes cannot be cancelled).
              ucp_request_free(flush);
            }
          }
          // The flush progressed the worker: OnPeerError may have failed this endpoint meanwhile
          // (it clears p.ep and closes it itself). Closing it again crashed (seen: SIGSEGV in
          // ucp_ep_close_nbx, 1 run in 20 of hot_path_alloc_test under load).
          if (p.ep == nullptr) continue;
          WaitRequest(ForceClose(p.ep));
          p.ep = nullptr;
        }
        // Only if a Post were still sending, which destruction rules out; closed all the same.
        if (p.close_pending != nullptr) WaitRequest(ForceClose(p.close_pending));
        p.close_pending = nullptr;
      }
    });
    StopThread();
    Destroy();
  }

  absl::Status Start() {
    if (auto s = Init(); !s.ok()) return s;
    ucp_am_handler_param_t hp;
    std::memset(&hp, 0, sizeof(hp));
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = kAmReply;
    hp.cb = &UcxClient::OnReply;
    hp.arg = this;
    const ucs_status_t s = ucp_worker_set_am_recv_handler(worker_, &hp);
    if (s != UCS_OK) return UcsError("ucp_worker_set_am_recv_handler", s);
    ucp_address_t* addr = nullptr;
    size_t len = 0;
    const ucs_status_t a = ucp_worker_get_address(worker_, &addr, &len);
    if (a != UCS_OK) return UcsError("ucp_worker_get_address", a);
    const auto* bytes = reinterpret_cast<const uint8_t*>(addr);
    hello_.assign(bytes, bytes + len);
    ucp_worker_release_address(worker_, addr);
    StartThread();
    return absl::OkStatus();
  }

  absl::StatusOr<int> Connect(const std::string& address) override {
    ucp_ep_params_t ep;
    std::memset(&ep, 0, sizeof(ep));
    std::vector<uint8_t> worker_addr;
    std::string by_worker = address;
    if (!absl::StartsWith(address, "ucx-addr:")) {  // HOST:PORT: ask it for the worker address
      auto parsed = ParseHostPort(address);
      if (!parsed.ok()) return parsed.status();
      auto fetched = FetchWorkerAddress(*parsed, address);
      if (!fetched.ok()) return fetched.status();
      by_worker = *std::move(fetched);
    }
    if (!FromHex(by_worker.substr(9), &worker_addr) ||
        (worker_addr = PeerWorkerAddress(worker_addr.data(), worker_addr.size())).empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad worker address \"", by_worker.substr(0, 200), "\""));
    }
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
    ep.address = reinterpret_cast<const ucp_address_t*>(worker_addr.data());
    ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &UcxClient::OnPeerError;
    ep.err_handler.arg = this;
    absl::StatusOr<int> result = absl::InternalError("not run");
    RunSync([&] {
      ucp_ep_h handle = nullptr;
      const ucs_status_t s = ucp_ep_create(worker_, &ep, &handle);
      if (s != UCS_OK) {
        result = UcsError(("connect to " + address).c_str(), s);
        return;
      }
      // The hello goes first on this endpoint (see kAmHello); a failure shows on the requests.
      ucp_request_param_t prm;
      std::memset(&prm, 0, sizeof(prm));
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      prm.flags = UCP_AM_SEND_FLAG_REPLY;
      void* req = ucp_am_send_nbx(handle, kAmHello, token_.data(), token_.size(), hello_.data(),
                                  hello_.size(), &prm);
      if (UCS_PTR_IS_ERR(req)) {
        result = UcsError(("hello to " + address).c_str(), UCS_PTR_STATUS(req));
        ForceCloseNoWait(handle);
        return;
      }
      // Released once sent; hello_ and token_ outlive it.
      if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);
      int index;
      {
        MutexLock l(&mu_);
        // Worker addresses are long; messages show a prefix.
        Peer p;
        p.ep = handle;
        p.address =
            absl::StartsWith(address, "ucx-addr:") ? address.substr(0, 25) + "..." : address;
        p.wiring = true;
        p.wiring_since = Clock::now();
        peers_.push_back(std::move(p));
        index = static_cast<int>(peers_.size() - 1);
        wiring_.fetch_add(1, std::memory_order_relaxed);
      }
      // Added before the flush starts: its callback may run at once (below) or on any thread
      // that progresses the worker.
      StartWireupCheck(handle, index);
      result = index;
    });
    return result;
  }

  absl::StatusOr<uint64_t> Post(int peer, std::vector<uint8_t> request) override {
    // (While the progress thread is kept off the worker by callers, Housekeeping waits; this
    // check does not. A relaxed load: nothing is wiring but in a connect's first milliseconds.)
    if (wiring_.load(std::memory_order_relaxed) > 0) ExpireWireups();
    Slot* slot;
    ucp_ep_h ep = nullptr;
    {
      MutexLock l(&mu_);
      if (peer < 0 || peer >= static_cast<int>(peers_.size())) {
        return absl::InvalidArgumentError(absl::StrCat("no peer ", peer));
      }
      Peer& p = peers_[static_cast<size_t>(peer)];
      if (p.failed || p.ep == nullptr) {
        return absl::UnavailableError(absl::StrCat("peer ", p.address, " has failed: ", p.why));
      }
      if (p.inflight >= kMaxInflightPerPeer) {
        return absl::ResourceExhaustedError(
            absl::StrCat("more than ", kMaxInflightPerPeer, " requests in flight to ", p.address));
      }
      slot = slots_.Allocate();
      if (slot == nullptr) {
        return absl::ResourceExhaustedError(
            absl::StrCat("more than ", kMaxInflight, " requests in flight"));
      }
      slot->owner = this;
      slot->peer = peer;
      slot->done = slot->waited = slot->receiving = false;
      slot->finished.store(false, std::memory_order_relaxed);
      slot->sending = true;
      slot->status = absl::OkStatus();
      slot->request_bytes.store(request.size(), std::memory_order_relaxed);
      slot->send = std::move(request);
      slot->live.store(slot->id, std::memory_order_release);
      ep = p.ep;
      ++p.inflight;
      ++p.senders;  // `ep` stays open until the send below has returned
    }
    const uint64_t id = slot->id;
    MarkActive();
    ucp_request_param_t prm;
    std::memset(&prm, 0, sizeof(prm));
    prm.op_attr_mask =
        UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_AM_SEND_FLAG_REPLY;
    prm.cb.send = &UcxClient::OnSent;
    prm.user_data = slot;
    // Header (the id) and payload must stay valid until the send completes: both live in the
    // slot, which is not freed before OnSent.
    void* req = ucp_am_send_nbx(ep, kAmRequest, &slot->id, sizeof(slot->id), slot->send.data(),
                                slot->send.size(), &prm);
    SendReturned(peer);
    if (req == nullptr) {
      // Sent already (the common case for small messages). Without mu_: until Wait marks the
      // slot waited (after this returns the id) nobody else reads `sending` (MaybeFree stops at
      // !waited), and Wait takes mu_ after this. The buffer goes back to the pool there.
      slot->sending = false;
    } else if (UCS_PTR_IS_ERR(req)) {
      OnSent(nullptr, UCS_PTR_STATUS(req), slot);
    } else {
      SendPending(slot->request_bytes.load(std::memory_order_relaxed));  // OnSent undoes it
    }
    return id;
  }

  bool Poll(uint64_t id) override {
    MutexLock l(&mu_);
    const Slot* s = slots_.Find(id);
    return s == nullptr || s->done;
  }

  absl::Status Wait(uint64_t id, Clock::time_point deadline, std::vector<uint8_t>* reply) override {
    // The reply of a large request takes a while even when nothing is wrong (the peer takes the
    // request in, computes, sends about as many bytes back); sleeping through it and being woken
    // cost a 2.5 MiB round trip over sm more than a millisecond. So the spin grows with the
    // request: 1 us per KiB, up to kMaxExchangeSpin.
    // No lock before the spin: the slot an id names is found by index, and `live` tells
    // whether it still holds this request (it does until this Wait marks it waited; a stale or
    // made-up id skips the spin and is refused below, under mu_).
    const Slot* probe = slots_.At(id);
    if (probe != nullptr && probe->live.load(std::memory_order_acquire) == id) {
      const std::chrono::microseconds spin =
          SpinTime() + ExchangeSpin(probe->request_bytes.load(std::memory_order_relaxed));
      SpinProgress(
          spin, [&] { return probe->finished.load(std::memory_order_acquire); }, deadline);
    }
    MutexLock l(&mu_);
    Slot* s = slots_.Find(id);
    if (s == nullptr || s->waited) {
      return absl::InvalidArgumentError(absl::StrCat("unknown request id ", id));
    }
    while (!s->done && cv_.WaitUntil(&mu_, deadline)) {
    }
    const bool done = s->done;
    absl::Status st;
    if (!done) {
      st = absl::DeadlineExceededError(absl::StrCat(
          "no reply from ", peers_[static_cast<size_t>(s->peer)].address, " before the deadline"));
    } else {
      st = s->status;
      if (st.ok()) *reply = std::move(s->reply);
    }
    s->waited = true;
    s->live.store(0, std::memory_order_relaxed);
    MaybeFree(s);
    return st;
  }

  int WaitAny(const uint64_t* ids, size_t n, Clock::time_point until) override {
    // As Wait: progress on this thread for a while (replies of a decode step come within
    // microseconds; a large exchange takes about 1 us per KiB), then sleep on the completion
    // signal.
    size_t bytes = 0;
    for (size_t i = 0; i < n; ++i) {
      const Slot* probe = slots_.At(ids[i]);
      if (probe != nullptr && probe->live.load(std::memory_order_acquire) == ids[i]) {
        bytes = std::max(bytes, probe->request_bytes.load(std::memory_order_relaxed));
      }
    }
    auto finished = [&]() -> bool {
      for (size_t i = 0; i < n; ++i) {
        const Slot* probe = slots_.At(ids[i]);
        if (probe == nullptr || probe->live.load(std::memory_order_acquire) != ids[i] ||
            probe->finished.load(std::memory_order_acquire)) {
          return true;
        }
      }
      return false;
    };
    SpinProgress(SpinTime() + ExchangeSpin(bytes), finished, until);
    MutexLock l(&mu_);
    for (;;) {
      for (size_t i = 0; i < n; ++i) {
        const Slot* s = slots_.Find(ids[i]);
        if (s == nullptr || s->done) return static_cast<int>(i);
      }
      if (!cv_.WaitUntil(&mu_, until)) break;
    }
    for (size_t i = 0; i < n; ++i) {
      const Slot* s = slots_.Find(ids[i]);
      if (s == nullptr || s->done) return static_cast<int>(i);
    }
    return -1;
  }

  void Disconnect(int peer) override {
    ucp_ep_h close = nullptr;
    {
      MutexLock l(&mu_);
      if (peer < 0 || static_cast<size_t>(peer) >= peers_.size()) return;
      close = FailPeerLocked(static_cast<size_t>(peer), "disconnected by this node");
    }
    CloseLater(close);
  }

  std::vector<uint8_t> AcquireBuffer() override {
    MutexLock l(&mu_);
    return pool_.Acquire();
  }
  void ReleaseBuffer(std::vector<uint8_t> b) override {
    if (b.capacity() == 0) return;
    MutexLock l(&mu_);
    pool_.Release(std::move(b));
  }

 private:
  struct Peer {
    ucp_ep_h ep = nullptr;
    std::string address;
    bool failed = false;
    // Posts between reading `ep` and their ucp_am_send_nbx returning. While there are any, a
    // failed endpoint is not closed (that freed it under a send: SIGSEGV in ucp_am_send_nbx on
    // the attention node when a shard was killed mid-stream); the last of them closes it.
    int senders = 0;
    ucp_ep_h close_pending = nullptr;
    // Slots held by this peer's requests (until freed, after the wait and the send).
    int inflight = 0;
    // The UCX wireup has not been seen to finish (the flush StartWireupCheck began has not
    // completed). Over sm a peer that dies or hangs in this state is never failed by UCX's
    // keepalive: its sends stay pending, holding their slots, forever. So a peer still wiring
    // after WireupBound() is failed (ExpireWireups, from Housekeeping and Post).
    bool wiring = false;
    Clock::time_point wiring_since;
    std::string why;  // why it failed, for later Posts' errors
  };
  // One request in flight. Freed once its caller has waited and UCX no longer uses its buffers.
  struct Slot {
    uint64_t id = 0;
    UcxClient* owner = nullptr;
    int peer = -1;
    bool done = false;
    std::atomic<bool> finished{false};  // == done, for Wait's spin to read without mu_
    bool waited = false;                // Wait returned: nobody will read the reply
    bool sending = false;               // UCX still reads `send`
    bool receiving = false;             // a rendezvous receive still writes into `reply`
    absl::Status status;
    std::atomic<size_t> request_bytes{0};  // read by Wait's spin without mu_
    std::atomic<uint64_t> live{0};         // == id from Post until Wait marks it waited
    std::vector<uint8_t> send;             // until sent, then until freed (back to the pool)
    std::vector<uint8_t> reply;
  };
  static constexpr uint32_t kMaxInflight = 4096;
  // One peer that hangs (its sends never complete, and only request deadlines notice) holds at
  // most this many of the slots every peer shares.
  static constexpr int kMaxInflightPerPeer = kMaxInflight / 4;
  // A wireup takes milliseconds (a few round trips between the two workers), more on a loaded
  // machine; a peer still wiring after this (5 s; DMOE_UCX_WIREUP_MS) is taken for dead.
  static std::chrono::milliseconds WireupBound() {
    static const std::chrono::milliseconds bound = [] {
      const char* env = std::getenv("DMOE_UCX_WIREUP_MS");
      const int ms = env != nullptr ? std::atoi(env) : 0;
      return std::chrono::milliseconds(ms > 0 ? ms : 5000);
    }();
    return bound;
  }

  void MaybeFree(Slot* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!s->waited || s->sending || s->receiving) return;
    if (s->send.capacity() > 0) pool_.Release(std::move(s->send));
    s->send = std::vector<uint8_t>();
    if (s->reply.capacity() > 0) pool_.Release(std::move(s->reply));
    s->reply = std::vector<uint8_t>();
    s->status = absl::OkStatus();
    --peers_[static_cast<size_t>(s->peer)].inflight;
    slots_.Free(s);
  }

  static void OnSent(void* req, ucs_status_t status, void* user) {
    auto* s = static_cast<Slot*>(user);
    UcxClient* self = s->owner;
    if (req != nullptr) self->SendDone(s->request_bytes.load(std::memory_order_relaxed));
    {
      MutexLock l(&self->mu_);
      s->sending = false;
      self->pool_.Release(std::move(s->send));
      s->send = std::vector<uint8_t>();
      if (status != UCS_OK && !s->done) self->FinishLocked(s, UcsError("send", status));
      self->MaybeFree(s);
    }
    if (req != nullptr) ucp_request_free(req);
  }

  // Marks `id` done with `st`; `reply` (may be null) is moved in.
  void Complete(uint64_t id, absl::Status st, std::vector<uint8_t>* reply) {
    MutexLock l(&mu_);
    Slot* s = slots_.Find(id);
    if (s == nullptr || s->done) {
      if (reply != nullptr) pool_.Release(std::move(*reply));  // a late reply
      return;
    }
    if (reply != nullptr) s->reply = std::move(*reply);
    FinishLocked(s, std::move(st));
  }

  // Marks `s` done with `st` and wakes its waiter (spinning on `finished`, or on cv_).
  // REQUIRES: !s->done.
  void FinishLocked(Slot* s, absl::Status st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    s->done = true;
    s->status = std::move(st);
    s->finished.store(true, std::memory_order_release);
    cv_.SignalAll();
  }

  static ucs_status_t OnReply(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxClient*>(arg);
    if (header_length != sizeof(uint64_t)) return UCS_OK;
    uint64_t id;
    std::memcpy(&id, header, sizeof(id));
    if (length > kMaxMessageBytes) {  // not read, nothing allocated: its request fails now
      MutexLock l(&self->mu_);
      Slot* s = self->slots_.Find(id);
      if (s != nullptr && !s->done) {
        self->FinishLocked(s, absl::ResourceExhaustedError(
                                  absl::StrCat("a reply of ", length, " bytes is over the ",
                                               kMaxMessageBytes, " a transport takes")));
      }
      return UCS_OK;
    }
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
      Slot* s;
      {
        MutexLock l(&self->mu_);
        s = self->slots_.Find(id);
        if (s == nullptr || s->done) {
          // A late reply: UCX cancels a rendezvous the callback neither receives nor keeps
          // (UCS_OK); releasing it here as well would free its descriptor twice.
          return UCS_OK;
        }
        s->receiving = true;
        // A pooled buffer: a fresh multi-MiB vector would page-fault on every reply (and a
        // cleared one would be zero-filled before the transfer overwrites it).
        if (s->reply.capacity() < length) {
          self->pool_.Release(std::move(s->reply));
          s->reply = self->pool_.AcquireSized(length);
        }
      }
      s->reply.resize(length);
      self->ReceiveRendezvous(data, s->reply.data(), length, &UcxClient::OnRndvDone, s);
      return UCS_OK;
    }
    if (length <= kCopyUnderLock) {  // one lock: find, copy out, complete
      MutexLock l(&self->mu_);
      Slot* s = self->slots_.Find(id);
      if (s == nullptr || s->done) return UCS_OK;  // a late reply: nothing to keep
      if (s->reply.capacity() > 0) self->pool_.Release(std::move(s->reply));
      s->reply = self->pool_.AcquireSized(length);
      if (length > 0) std::memcpy(s->reply.data(), data, length);
      self->FinishLocked(s, absl::OkStatus());
      return UCS_OK;
    }
    std::vector<uint8_t> bytes;
    {
      MutexLock l(&self->mu_);
      bytes = self->pool_.AcquireSized(length);
    }
    std::memcpy(bytes.data(), data, length);
    self->Complete(id, absl::OkStatus(), &bytes);
    return UCS_OK;
  }

  static void OnRndvDone(void* req, ucs_status_t status, size_t, void* user) {
    auto* s = static_cast<Slot*>(user);
    UcxClient* self = s->owner;
    {
      MutexLock l(&self->mu_);
      s->receiving = false;
      if (!s->done) {
        self->FinishLocked(s, status == UCS_OK ? absl::OkStatus() : UcsError("receive", status));
      }
      self->MaybeFree(s);
    }
    if (req != nullptr) ucp_request_free(req);
  }

  // A Post's send on `peer` has returned: the last one closes an endpoint that failed meanwhile.
  void SendReturned(int peer) {
    ucp_ep_h ep = nullptr;
    {
      MutexLock l(&mu_);
      Peer& p = peers_[static_cast<size_t>(peer)];
      if (--p.senders > 0 || p.close_pending == nullptr) return;
      ep = p.close_pending;
      p.close_pending = nullptr;
    }
    CloseLater(ep);
  }

  static void OnPeerError(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<UcxClient*>(arg);
    ucp_ep_h close = nullptr;
    {
      MutexLock l(&self->mu_);
      for (size_t i = 0; i < self->peers_.size(); ++i) {
        if (self->peers_[i].ep == ep) close = self->FailPeerLocked(i, ucs_status_string(status));
      }
    }
    self->CloseLater(close);
  }

  // Closes `ep` (if any) from the progress thread, outside any callback. Called without mu_:
  // older UCX versions signal the worker under its lock, which callbacks hold while taking mu_.
  void CloseLater(ucp_ep_h ep) {
    if (ep != nullptr) RunAsync([ep] { ForceCloseNoWait(ep); });
  }

  // The peer's wireup is over (done, failed, or no longer watched): clears `wiring`, keeping
  // wiring_ its count.
  void EndWiringLocked(Peer* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!p->wiring) return;
    p->wiring = false;
    wiring_.fetch_sub(1, std::memory_order_relaxed);
  }

  // Marks peer `i` failed: its requests end UNAVAILABLE (`why` says why). Returns its endpoint
  // for the caller to CloseLater once it has let go of mu_, or nullptr: none, or a Post is still
  // sending on it (the last one closes it). A forced close also ends the pending sends, which
  // frees their slots.
  ucp_ep_h FailPeerLocked(size_t i, const std::string& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Peer& p = peers_[i];
    if (p.failed) return nullptr;
    p.failed = true;
    p.why = why;
    EndWiringLocked(&p);
    for (Slot& f : slots_.slots()) {
      if (f.id != 0 && f.peer == static_cast<int>(i) && !f.done) {
        FinishLocked(&f,
                     absl::UnavailableError(absl::StrCat("peer ", p.address, " failed: ", why)));
      }
    }
    cv_.SignalAll();
    const ucp_ep_h ep = p.ep;
    p.ep = nullptr;
    if (ep != nullptr && p.senders > 0) {
      p.close_pending = ep;
      return nullptr;
    }
    return ep;
  }

  // What a wireup check's flush callback needs (UCX passes one pointer).
  struct WireupCheck {
    UcxClient* self;
    int peer;
  };

  // Flushes the new endpoint of `peer` without waiting: the flush completes once the wireup has
  // (the hello sent before it delivered), and OnWireup marks the peer wired, or failed. A
  // blocking flush in Connect would stall the caller (the attention engine's thread, reviving
  // a paused shard every 2 s) for the whole bound.
  void StartWireupCheck(ucp_ep_h ep, int peer) {
    auto* check = new WireupCheck{this, peer};
    ucp_request_param_t prm;
    std::memset(&prm, 0, sizeof(prm));
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    prm.cb.send = &UcxClient::OnWireup;
    prm.user_data = check;
    void* req = ucp_ep_flush_nbx(ep, &prm);
    if (req == nullptr) {
      OnWireup(nullptr, UCS_OK, check);
    } else if (UCS_PTR_IS_ERR(req)) {
      OnWireup(nullptr, UCS_PTR_STATUS(req), check);
    }
    // Else OnWireup runs when the flush ends: done, failed, or cancelled by a forced close (a
    // flush UCX never ends leaks `check`, a few bytes).
  }

  static void OnWireup(void* req, ucs_status_t status, void* user) {
    auto* check = static_cast<WireupCheck*>(user);
    UcxClient* self = check->self;
    ucp_ep_h close = nullptr;
    {
      MutexLock l(&self->mu_);
      Peer& p = self->peers_[static_cast<size_t>(check->peer)];
      if (p.wiring) {
        if (status == UCS_OK) {
          self->EndWiringLocked(&p);
        } else {
          close = self->FailPeerLocked(static_cast<size_t>(check->peer),
                                       absl::StrCat("wireup: ", ucs_status_string(status)));
        }
      }
    }
    self->CloseLater(close);
    delete check;
    if (req != nullptr) ucp_request_free(req);
  }

  void Housekeeping() override {
    if (wiring_.load(std::memory_order_relaxed) > 0) ExpireWireups();
  }

  // Fails every peer still wiring WireupBound() after its connect.
  void ExpireWireups() {
    std::vector<ucp_ep_h> close;
    {
      MutexLock l(&mu_);
      const auto now = Clock::now();
      for (size_t i = 0; i < peers_.size(); ++i) {
        if (!peers_[i].wiring || now - peers_[i].wiring_since <= WireupBound()) continue;
        close.push_back(FailPeerLocked(
            i, absl::StrCat("no UCX wireup within ", WireupBound().count(),
                            " ms of the connect (the peer hangs, or died connecting)")));
      }
    }
    for (ucp_ep_h ep : close) CloseLater(ep);
  }

  std::vector<uint8_t> hello_;  // this worker's address, sent as kAmHello
  std::string token_;           // the cluster token: the hello's header
  Mutex mu_;
  CondVar cv_;
  std::vector<Peer> peers_ ABSL_GUARDED_BY(mu_);
  std::atomic<int> wiring_{0};  // peers with `wiring` set (Housekeeping reads it without mu_)
  SlotTable<Slot> slots_{kMaxInflight};  // At() is read without mu_ (a probe); the rest under it
  UnlockedBufferPool pool_ ABSL_GUARDED_BY(mu_);
};

}  // namespace
}  // namespace ucx_internal

absl::StatusOr<std::unique_ptr<ClientTransport>> NewUcxClient(std::string cluster_token) {
  auto c = std::make_unique<ucx_internal::UcxClient>(std::move(cluster_token));
  if (auto s = c->Start(); !s.ok()) return s;
  return std::unique_ptr<ClientTransport>(std::move(c));
}

}  // namespace dmoe::transport
