#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "common/secret_compare.h"
#include "transport/buffer_pool.h"
#include "transport/slot_table.h"
#include "transport/ucx.h"
#include "transport/ucx_worker.h"

namespace dmoe::transport {
namespace ucx_internal {
namespace {

class UcxServerImpl : public UcxServer, public UcxWorker {
 public:
  explicit UcxServerImpl(std::string token) : token_(std::move(token)) {}
  ~UcxServerImpl() override { Shutdown(); }

  absl::Status Start() {
    if (auto s = Init(); !s.ok()) return s;
    ucp_am_handler_param_t hp;
    std::memset(&hp, 0, sizeof(hp));
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = kAmRequest;
    hp.cb = &UcxServerImpl::OnRequest;
    hp.arg = this;
    ucs_status_t s = ucp_worker_set_am_recv_handler(worker_, &hp);
    if (s != UCS_OK) return UcsError("ucp_worker_set_am_recv_handler", s);
    hp.id = kAmHello;
    hp.cb = &UcxServerImpl::OnHello;
    s = ucp_worker_set_am_recv_handler(worker_, &hp);
    if (s != UCS_OK) return UcsError("ucp_worker_set_am_recv_handler", s);
    ucp_address_t* addr = nullptr;
    size_t len = 0;
    if (ucp_worker_get_address(worker_, &addr, &len) == UCS_OK) {
      worker_address_ = "ucx-addr:" + ToHex(addr, len);
      ucp_worker_release_address(worker_, addr);
    }
    StartThread();
    return absl::OkStatus();
  }

  std::string WorkerAddress() const override { return worker_address_; }

  // Answers "ucx-addr:HEX\n" on `address` (see FetchWorkerAddress). Once per server.
  absl::StatusOr<std::string> Listen(const std::string& address) override {
    auto sa = ParseHostPort(address);
    if (!sa.ok()) return sa.status();
    if (address_fd_ >= 0) return absl::FailedPreconditionError("Listen: already listening");
    const auto fail = [&](const char* what) {
      const absl::Status st = absl::UnavailableError(
          absl::StrCat("listen on ", address, ": ", what, ": ", std::strerror(errno)));
      close(address_fd_);
      address_fd_ = -1;
      return st;
    };
    address_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (address_fd_ < 0) return fail("socket");
    const int one = 1;
    setsockopt(address_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(address_fd_, reinterpret_cast<const sockaddr*>(&*sa), sizeof(*sa)) != 0) {
      return fail("bind");
    }
    if (listen(address_fd_, 128) != 0) return fail("listen");
    sockaddr_in bound;
    socklen_t len = sizeof(bound);
    if (getsockname(address_fd_, reinterpret_cast<sockaddr*>(&bound), &len) != 0) {
      return fail("getsockname");
    }
    address_thread_ = std::thread([this] { ServeWorkerAddress(); });
    char host[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &bound.sin_addr, host, sizeof(host));
    return absl::StrCat(host, ":", ntohs(bound.sin_port));
  }

  void Receive(std::chrono::milliseconds timeout, std::vector<ServerRequest>* out) override {
    // The serving thread progresses the worker itself while it waits here. It lets go lazily when
    // requests came (it is back after processing them; if that takes longer than kLazyHandoff,
    // the progress thread moves transfers meanwhile) and at once when a spin finds nothing.
    // Likewise the next request of a client that sent a large one comes after it has taken in
    // the reply and prepared the next: while requests flow (one came in the last kFlowGap) the
    // spin grows with the last request's size; an idle shard only spins SpinTime per call.
    std::chrono::microseconds spin = SpinTime();
    const size_t last_bytes = last_request_bytes_.load(std::memory_order_relaxed);
    if (last_bytes >= kFlowBytes && NowNs() - last_request_ns_.load(std::memory_order_relaxed) <
                                        std::chrono::nanoseconds(kFlowGap).count()) {
      spin += ExchangeSpin(last_bytes);
    }
    SpinProgress(spin, [&] { return has_work_.load(std::memory_order_acquire); });
    MutexLock l(&mu_);
    // The deadline reads the clock: not when there is work already (on every request).
    if (queue_.empty() && !closed_) {
      const auto until = std::chrono::steady_clock::now() + timeout;
      while (queue_.empty() && !closed_ && cv_.WaitUntil(&mu_, until)) {
      }
    }
    for (ServerRequest& r : queue_) out->push_back(std::move(r));
    queue_.clear();  // keeps its capacity
    if (!closed_) has_work_.store(false, std::memory_order_relaxed);
  }

  void Reply(uint64_t token, std::vector<uint8_t> reply) override {
    Pending* p;
    ucp_ep_h ep;
    size_t bytes;  // read before the send: once it is posted, another thread may complete it
                   // and free `p`
    {
      MutexLock l(&mu_);
      p = pending_.Find(token);
      if (p == nullptr || p->dead || closed_) {
        if (p != nullptr) pending_.Free(p);
        ++stats_.dropped_replies;
        pool_.Release(std::move(reply));
        return;
      }
      ep = p->ep;
      p->sending = true;
      // Shutdown waits for this send to be posted before it closes the endpoints and the worker.
      replies_posting_.fetch_add(1, std::memory_order_relaxed);
      bytes = p->reply_bytes = reply.size();
      p->buffer = std::move(reply);
      ++stats_.replies;
      stats_.bytes_out += p->buffer.size();
    }
    ucp_request_param_t prm;
    std::memset(&prm, 0, sizeof(prm));
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    prm.cb.send = &UcxServerImpl::OnReplySent;
    prm.user_data = p;
    MarkActive();
    void* req = ucp_am_send_nbx(ep, kAmReply, &p->client_id, sizeof(p->client_id), p->buffer.data(),
                                p->buffer.size(), &prm);
    if (req == nullptr) {
      OnReplySent(nullptr, UCS_OK, p);
    } else if (UCS_PTR_IS_ERR(req)) {
      OnReplySent(nullptr, UCS_PTR_STATUS(req), p);
    } else {
      SendPending(bytes);  // OnReplySent with a request undoes it
    }
    replies_posting_.fetch_sub(1, std::memory_order_release);
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

  ServerStats stats() const override {
    MutexLock l(&mu_);
    return stats_;
  }

  void Shutdown() override {
    if (shut_down_.exchange(true)) return;
    {
      MutexLock l(&mu_);
      closed_ = true;
      has_work_.store(true, std::memory_order_release);  // nothing more to wait for
      cv_.SignalAll();
    }
    // A Reply past its closed_ check posts its send outside mu_: closing the endpoint or
    // destroying the worker under it would free what ucp_am_send_nbx uses. No Reply starts one
    // now; those under way end within a call (the send does not block).
    while (replies_posting_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    if (address_fd_ >= 0) {
      ::shutdown(address_fd_, SHUT_RDWR);  // wakes accept() with EINVAL
      address_thread_.join();
      close(address_fd_);
      address_fd_ = -1;
    }
    RunSync([this] {
      std::set<ucp_ep_h> eps;
      {
        MutexLock l(&mu_);
        eps.swap(live_eps_);
      }
      for (ucp_ep_h ep : eps) {
        WaitRequest(ForceClose(ep));
      }
    });
    StopThread();
    Destroy();
  }

 private:
  // One request between its arrival and the end of its reply's send. `id` is the token.
  struct Pending {
    uint64_t id = 0;
    UcxServerImpl* owner = nullptr;
    ucp_ep_h ep = nullptr;
    uint64_t client_id = 0;  // the client's request id, echoed in the reply header
    bool dead = false;       // the client's endpoint failed: drop the reply
    bool receiving = false;  // a rendezvous receive still writes into `buffer`
    bool sending = false;    // UCX still reads `buffer` (the reply)
    size_t reply_bytes = 0;
    std::vector<uint8_t> buffer;
  };
  static constexpr uint32_t kMaxPending = 4096;

  // The address port's thread: every connection gets worker_address_ + "\n" and is closed at
  // once. It reads nothing, so garbage, slow or silent clients hold nothing; the answer (a few
  // hundred bytes) fits a fresh socket's send buffer, so the non-blocking send does not wait.
  void ServeWorkerAddress() {
    const std::string answer = worker_address_ + "\n";
    for (;;) {
      const int c = accept4(address_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (c < 0) {
        if (errno == EINVAL || errno == EBADF || errno == ENOTSOCK) return;  // EINVAL: Shutdown
        if (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN) continue;
        // Out of descriptors or memory, or a network error of the connection being accepted
        // (EPROTO, EPERM from a firewall, ENETDOWN, ...: accept(2) says to retry): back off and
        // go on. Returning left the port listening with nobody answering, every connect by
        // address timing out while the shard looked healthy.
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        continue;
      }
      (void)send(c, answer.data(), answer.size(), MSG_NOSIGNAL);
      close(c);
    }
  }

  // kAmHello: the client's worker address. Our endpoint to it is made on the progress thread
  // (not inside this callback) and kept only if UCX paired it with `reply_ep`, the endpoint this
  // client's requests arrive on; an unpaired one (the pairing counters of the two workers
  // disagree, e.g. a hello lost with a failed endpoint) is closed, and that client's replies go
  // through reply_ep as UCX made it.
  // With a cluster token, the hello's header must be it: then (and only then) the endpoint's
  // requests are served (authorized_).
  static ucs_status_t OnHello(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxServerImpl*>(arg);
    const ucp_ep_h reply_ep = param->reply_ep;
    if (reply_ep == nullptr || length == 0 || length > kMaxHello ||
        (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
      MutexLock l(&self->mu_);
      ++self->stats_.peer_errors;
      return UCS_OK;
    }
    if (!self->token_.empty()) {
      const std::string presented(static_cast<const char*>(header), header_length);
      MutexLock l(&self->mu_);
      if (!ConstantTimeEquals(self->token_, presented)) {
        ++self->stats_.refused_peers;
        // An endpoint address UCX reuses keeps no authorization from its previous owner.
        self->authorized_.erase(reply_ep);
        return UCS_OK;
      }
      self->authorized_.insert(reply_ep);
    }
    std::vector<uint8_t> peer = PeerWorkerAddress(static_cast<const uint8_t*>(data), length);
    if (peer.empty()) {  // UCX would abort on it
      MutexLock l(&self->mu_);
      ++self->stats_.peer_errors;
      return UCS_OK;
    }
    self->RunAsync([self, reply_ep, address = std::move(peer)] {
      if (self->shut_down_) return;
      ucp_ep_params_t ep;
      std::memset(&ep, 0, sizeof(ep));
      ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
      ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      ep.err_handler.cb = &UcxServerImpl::OnPeerError;
      ep.err_handler.arg = self;
      ucp_ep_h handle = nullptr;
      if (ucp_ep_create(self->worker_, &ep, &handle) != UCS_OK) return;
      if (handle == reply_ep) {
        MutexLock l(&self->mu_);
        self->live_eps_.insert(handle);
        return;
      }
      ForceCloseNoWait(handle);
    });
    return UCS_OK;
  }

  static void OnPeerError(void* arg, ucp_ep_h ep, ucs_status_t) {
    auto* self = static_cast<UcxServerImpl*>(arg);
    {
      MutexLock l(&self->mu_);
      ++self->stats_.peer_errors;
      self->live_eps_.erase(ep);
      self->authorized_.erase(ep);
      // Requests of the dead client can no longer be answered; mark them now, because a later
      // endpoint may reuse this handle's address.
      for (Pending& p : self->pending_.slots()) {
        if (p.id != 0 && p.ep == ep) p.dead = true;
      }
      // A Reply that found its request alive just before the marks above sends outside mu_;
      // closing the endpoint under it would free what that send uses (seen: SIGSEGV in
      // ucp_am_send_nbx with clients killed mid-stream). Then OnReplySent closes it, once the
      // last such send is done (sends on a failed endpoint complete, with an error, soon).
      if (self->SendingOnLocked(ep)) {
        self->closing_.insert(ep);
        return;
      }
    }
    self->CloseFailed(ep);
  }

  bool SendingOnLocked(ucp_ep_h ep) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const Pending& p : pending_.slots()) {
      if (p.id != 0 && p.ep == ep && p.sending) return true;
    }
    return false;
  }

  // Closes a failed endpoint, on the progress thread.
  void CloseFailed(ucp_ep_h ep) {
    RunAsync([ep] { ForceCloseNoWait(ep); });
  }

  void EnqueueLocked(Pending* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    NoteRequest(p->buffer.size());
    ++stats_.requests;
    stats_.bytes_in += p->buffer.size();
    queue_.push_back(ServerRequest{p->id, std::move(p->buffer)});
    has_work_.store(true, std::memory_order_release);
    p->buffer = std::vector<uint8_t>();
    cv_.SignalAll();
  }
  // For Receive's spin: the size of the last request, and when it came (only for those large
  // enough to lengthen the spin: a clock read per small request is a tenth of its round trip).
  void NoteRequest(size_t bytes) {
    last_request_bytes_.store(bytes, std::memory_order_relaxed);
    if (bytes >= kFlowBytes) last_request_ns_.store(NowNs(), std::memory_order_relaxed);
  }

  static ucs_status_t OnRequest(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxServerImpl*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    const bool valid = header_length == sizeof(uint64_t) &&
                       (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) != 0 &&
                       length <= kMaxMessageBytes;
    // A small eager message is copied out and queued under the one lock that allocates its slot
    // and buffer; a large one is copied between two (the lock is not held for a long copy).
    std::vector<uint8_t> bytes;
    if (valid && !rndv && length > kCopyUnderLock) {
      {
        MutexLock l(&self->mu_);
        bytes = self->pool_.AcquireSized(length);
      }
      std::memcpy(bytes.data(), data, length);
    }
    Pending* p = nullptr;
    {
      MutexLock l(&self->mu_);
      const bool refused =
          valid && !self->token_.empty() && self->authorized_.count(param->reply_ep) == 0;
      if (valid && !refused) p = self->pending_.Allocate();
      if (p == nullptr) {  // malformed, unauthorized, or more in flight than slots: drop it
        ++(refused ? self->stats_.refused_requests : self->stats_.peer_errors);
        // A rendezvous not received: returning UCS_OK without ucp_am_recv_data_nbx makes UCX
        // cancel it and free its descriptor (ucp_am_data_release here as well freed it twice).
        if (bytes.capacity() > 0) self->pool_.Release(std::move(bytes));
        return UCS_OK;
      }
      p->owner = self;
      p->ep = param->reply_ep;
      std::memcpy(&p->client_id, header, sizeof(p->client_id));
      p->dead = p->sending = false;
      p->receiving = rndv;
      if (!rndv) {
        if (length <= kCopyUnderLock) {
          bytes = self->pool_.AcquireSized(length);
          if (length > 0) std::memcpy(bytes.data(), data, length);
        }
        p->buffer = std::move(bytes);
        self->EnqueueLocked(p);
        return UCS_OK;
      }
      p->buffer = self->pool_.AcquireSized(length);
    }
    self->ReceiveRendezvous(data, p->buffer.data(), length, &UcxServerImpl::OnRndvDone, p);
    return UCS_OK;
  }

  static void OnRndvDone(void* req, ucs_status_t status, size_t, void* user) {
    auto* p = static_cast<Pending*>(user);
    UcxServerImpl* self = p->owner;
    if (status == UCS_OK) {
      MutexLock l(&self->mu_);
      p->receiving = false;
      self->EnqueueLocked(p);
    } else {
      MutexLock l(&self->mu_);
      ++self->stats_.peer_errors;
      self->pool_.Release(std::move(p->buffer));
      p->buffer = std::vector<uint8_t>();
      self->pending_.Free(p);
    }
    if (req != nullptr) ucp_request_free(req);
  }

  static void OnReplySent(void* req, ucs_status_t status, void* user) {
    auto* p = static_cast<Pending*>(user);
    UcxServerImpl* self = p->owner;
    if (req != nullptr) self->SendDone(p->reply_bytes);
    const ucp_ep_h ep = p->ep;
    bool close = false;
    {
      MutexLock l(&self->mu_);
      if (status != UCS_OK) ++self->stats_.dropped_replies;
      self->pool_.Release(std::move(p->buffer));
      p->buffer = std::vector<uint8_t>();
      p->sending = false;
      const bool dead = p->dead;
      self->pending_.Free(p);
      // The last send on an endpoint that failed meanwhile (see OnPeerError).
      close = dead && self->closing_.count(ep) > 0 && !self->SendingOnLocked(ep);
      if (close) self->closing_.erase(ep);
    }
    if (req != nullptr) ucp_request_free(req);
    if (close) self->CloseFailed(ep);
  }

  int address_fd_ = -1;  // Listen's socket
  std::thread address_thread_;
  std::string worker_address_;
  std::atomic<bool> shut_down_{false};
  static constexpr std::chrono::milliseconds kFlowGap{10};
  static constexpr size_t kFlowBytes = 1024;  // ExchangeSpin is 0 below this
  std::atomic<size_t> last_request_bytes_{0};
  std::atomic<bool> has_work_{false};  // queue_ not empty, or closed_ (set under mu_)
  std::atomic<int64_t> last_request_ns_{0};
  mutable Mutex mu_;
  CondVar cv_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<ServerRequest> queue_ ABSL_GUARDED_BY(mu_);
  SlotTable<Pending> pending_{kMaxPending};
  std::set<ucp_ep_h> live_eps_ ABSL_GUARDED_BY(mu_);
  const std::string token_;  // the cluster token ("": every client is served)
  std::set<ucp_ep_h> authorized_ ABSL_GUARDED_BY(mu_);  // endpoints whose hello had the token
  // Failed, closed once their last reply send is done.
  std::set<ucp_ep_h> closing_ ABSL_GUARDED_BY(mu_);
  std::atomic<int> replies_posting_{0};  // Replies between their closed_ check and their send
  ServerStats stats_ ABSL_GUARDED_BY(mu_);
  UnlockedBufferPool pool_ ABSL_GUARDED_BY(mu_);
};

}  // namespace
}  // namespace ucx_internal

absl::StatusOr<std::unique_ptr<UcxServer>> NewUcxServer(std::string cluster_token) {
  auto s = std::make_unique<ucx_internal::UcxServerImpl>(std::move(cluster_token));
  if (auto st = s->Start(); !st.ok()) return st;
  return std::unique_ptr<UcxServer>(std::move(s));
}

}  // namespace dmoe::transport
