#include "transport/ucx.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/epoll.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "transport/buffer_pool.h"

namespace dmoe::transport {
namespace {

constexpr unsigned kAmRequest = 17;
constexpr unsigned kAmReply = 18;

absl::Status UcsError(const char* what, ucs_status_t s) {
  return absl::UnavailableError(absl::StrCat(what, ": ", ucs_status_string(s)));
}

// Context + worker + a progress thread that owns them. Subclasses add handlers.
class UcxWorker {
 public:
  virtual ~UcxWorker() = default;

  absl::Status Init() {
    ucp_params_t params;
    std::memset(&params, 0, sizeof(params));
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return UcsError("ucp_config_read", s);
    // Rendezvous over tcp costs extra round trips; below 256 KiB eager copies were faster here
    // (BUILD_NOTES.md). The environment still wins.
    if (std::getenv("UCX_RNDV_THRESH") == nullptr) ucp_config_modify(config, "RNDV_THRESH", "256k");
    s = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    if (s != UCS_OK) return UcsError("ucp_init", s);
    ucp_worker_params_t wp;
    std::memset(&wp, 0, sizeof(wp));
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    // MULTI: callers send and progress on their own threads (no hand-off on the hot path); the
    // progress thread covers everything that happens while nobody is waiting.
    wp.thread_mode = UCS_THREAD_MODE_MULTI;
    s = ucp_worker_create(context_, &wp, &worker_);
    if (s != UCS_OK) return UcsError("ucp_worker_create", s);
    s = ucp_worker_get_efd(worker_, &efd_);
    if (s != UCS_OK) return UcsError("ucp_worker_get_efd", s);
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    epoll_event ev;
    std::memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    epoll_ctl(epoll_, EPOLL_CTL_ADD, efd_, &ev);
    return absl::OkStatus();
  }

  void StartThread() {
    thread_ = std::thread([this] { Loop(); });
  }

  // Runs `fn` on the progress thread and waits for it.
  void RunSync(std::function<void()> fn) {
    if (std::this_thread::get_id() == thread_.get_id()) {
      fn();
      return;
    }
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    RunAsync([&] {
      fn();
      std::lock_guard<std::mutex> l(m);
      done = true;
      cv.notify_all();
    });
    std::unique_lock<std::mutex> l(m);
    cv.wait(l, [&] { return done; });
  }

  // Queues `fn` for the progress thread.
  void RunAsync(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> l(ops_mu_);
      ops_.push_back(std::move(fn));
      ops_cv_.notify_all();
    }
    ucp_worker_signal(worker_);
  }

  void StopThread() {
    if (!thread_.joinable()) return;
    stop_ = true;
    {
      std::lock_guard<std::mutex> l(ops_mu_);
      ops_cv_.notify_all();
    }
    ucp_worker_signal(worker_);
    thread_.join();
  }

  void Destroy() {
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
    if (epoll_ >= 0) close(epoll_);
    worker_ = nullptr;
    context_ = nullptr;
    epoll_ = -1;
  }

 protected:
  // Progresses the worker on the calling thread until `ready()` or `spin` has passed. For the
  // short gaps of a decode step this beats waking a sleeping thread; it is bounded so that idle
  // processes do not burn a core (BUILD_NOTES.md: never busy-poll both sides of a 2-core box).
  template <typename Ready>
  bool SpinProgress(std::chrono::microseconds spin, Ready ready) {
    HoldWorker();
    const bool done = SpinHeld(spin, ready);
    ReleaseWorker();
    return done;
  }

  // Progresses on the calling thread, which already holds the worker (HoldWorker).
  template <typename Ready>
  bool SpinHeld(std::chrono::microseconds spin, Ready ready) {
    const auto end = Clock::now() + spin;
    do {
      if (ready()) return true;
      if (ucp_worker_progress(worker_) == 0) {
        // Nothing happened: let another runnable thread have the core (with more spinning
        // threads than cores, e.g. several shards on one small machine, this is what keeps the
        // latency at microseconds instead of scheduler slices).
        sched_yield();
      }
    } while (Clock::now() < end);
    return ready();
  }

  // While a caller holds the worker, the progress thread stays off it (it would only contend for
  // the worker lock and a core).
  void HoldWorker() { ++spinners_; }
  void ReleaseWorker() {
    if (--spinners_ == 0) {
      std::lock_guard<std::mutex> l(ops_mu_);
      ops_cv_.notify_all();
    }
  }

  static std::chrono::microseconds SpinTime() {
    static const std::chrono::microseconds spin = [] {
      const char* env = std::getenv("DMOE_UCX_SPIN_US");
      return std::chrono::microseconds(env ? std::atoi(env) : 200);
    }();
    return spin;
  }

  // Waits for a UCX request started on the progress thread (only while on it).
  ucs_status_t WaitRequest(void* req) {
    if (req == nullptr) return UCS_OK;
    if (UCS_PTR_IS_ERR(req)) return UCS_PTR_STATUS(req);
    ucs_status_t s;
    do {
      ucp_worker_progress(worker_);
      s = ucp_request_check_status(req);
    } while (s == UCS_INPROGRESS);
    ucp_request_free(req);
    return s;
  }

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;

 private:
  void Loop() {
    while (!stop_) {
      std::deque<std::function<void()>> ops;
      {
        std::unique_lock<std::mutex> l(ops_mu_);
        ops_cv_.wait_for(l, std::chrono::milliseconds(100),
                         [&] { return spinners_ == 0 || !ops_.empty() || stop_; });
        ops.swap(ops_);
      }
      for (auto& op : ops) op();
      while (ucp_worker_progress(worker_) != 0) {
      }
      {
        std::lock_guard<std::mutex> l(ops_mu_);
        if (!ops_.empty() || stop_) continue;
      }
      const ucs_status_t s = ucp_worker_arm(worker_);
      if (s == UCS_ERR_BUSY) continue;
      epoll_event ev;
      epoll_wait(epoll_, &ev, 1, 100);
    }
    // Run what was queued before the stop so that waiters are released.
    std::deque<std::function<void()>> ops;
    {
      std::lock_guard<std::mutex> l(ops_mu_);
      ops.swap(ops_);
    }
    for (auto& op : ops) op();
  }

  int efd_ = -1;
  int epoll_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<int> spinners_{0};
  std::condition_variable ops_cv_;
  std::mutex ops_mu_;
  std::deque<std::function<void()>> ops_;
};

absl::StatusOr<sockaddr_in> ParseHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("address \"", address, "\" is not HOST:PORT"));
  }
  std::string host = address.substr(0, colon);
  if (host == "localhost") host = "127.0.0.1";
  sockaddr_in sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &sa.sin_addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("address \"", address, "\": bad IPv4 host"));
  }
  return sa;
}

std::string ToHex(const void* data, size_t n) {
  static const char* kHex = "0123456789abcdef";
  std::string s;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) {
    s.push_back(kHex[p[i] >> 4]);
    s.push_back(kHex[p[i] & 15]);
  }
  return s;
}

bool FromHex(const std::string& s, std::vector<uint8_t>* out) {
  if (s.size() % 2) return false;
  auto nib = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < s.size(); i += 2) {
    const int a = nib(s[i]), b = nib(s[i + 1]);
    if (a < 0 || b < 0) return false;
    out->push_back(static_cast<uint8_t>(a * 16 + b));
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Client.

class UcxClient : public ClientTransport, public UcxWorker {
 public:
  ~UcxClient() override {
    RunSync([this] {
      for (Peer& p : peers_) {
        if (p.ep != nullptr) {
          ucp_request_param_t prm;
          std::memset(&prm, 0, sizeof(prm));
          prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
          prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
          WaitRequest(ucp_ep_close_nbx(p.ep, &prm));
          p.ep = nullptr;
        }
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
    StartThread();
    return absl::OkStatus();
  }

  absl::StatusOr<int> Connect(const std::string& address) override {
    ucp_ep_params_t ep;
    std::memset(&ep, 0, sizeof(ep));
    sockaddr_in sa;
    std::vector<uint8_t> worker_addr;
    if (absl::StartsWith(address, "ucx-addr:")) {
      if (!FromHex(address.substr(9), &worker_addr) || worker_addr.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("bad worker address \"", address, "\""));
      }
      ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
      ep.address = reinterpret_cast<const ucp_address_t*>(worker_addr.data());
    } else {
      auto parsed = ParseHostPort(address);
      if (!parsed.ok()) return parsed.status();
      sa = *parsed;
      ep.field_mask = UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_FLAGS;
      ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
      ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
      ep.sockaddr.addrlen = sizeof(sa);
    }
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
      std::lock_guard<std::mutex> l(mu_);
      // Worker addresses are long; messages show a prefix.
      peers_.push_back(Peer{
          handle, absl::StartsWith(address, "ucx-addr:") ? address.substr(0, 25) + "..." : address,
          false});
      result = static_cast<int>(peers_.size() - 1);
    });
    return result;
  }

  absl::StatusOr<uint64_t> Post(int peer, std::vector<uint8_t> request) override {
    uint64_t id;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (peer < 0 || peer >= static_cast<int>(peers_.size())) {
        return absl::InvalidArgumentError(absl::StrCat("no peer ", peer));
      }
      if (peers_[static_cast<size_t>(peer)].failed) {
        return absl::UnavailableError(
            absl::StrCat("peer ", peers_[static_cast<size_t>(peer)].address, " has failed"));
      }
      id = next_id_++;
      Inflight& f = inflight_[id];
      f.peer = peer;
    }
    auto* send = new SendState{this, id, std::move(request)};
    DoSend(peer, send);
    return id;
  }

  bool Poll(uint64_t id) override {
    std::lock_guard<std::mutex> l(mu_);
    auto it = inflight_.find(id);
    return it == inflight_.end() || it->second.done;
  }

  absl::Status Wait(uint64_t id, Clock::time_point deadline, std::vector<uint8_t>* reply) override {
    SpinProgress(SpinTime(), [&] {
      std::lock_guard<std::mutex> l(mu_);
      auto it = inflight_.find(id);
      return it == inflight_.end() || it->second.done || Clock::now() >= deadline;
    });
    std::unique_lock<std::mutex> l(mu_);
    auto it = inflight_.find(id);
    if (it == inflight_.end()) return absl::InvalidArgumentError(absl::StrCat("unknown id ", id));
    const bool done = cv_.wait_until(l, deadline, [&] { return it->second.done; });
    absl::Status st;
    if (!done) {
      st = absl::DeadlineExceededError(
          absl::StrCat("no reply from ", peers_[static_cast<size_t>(it->second.peer)].address,
                       " before the deadline"));
    } else {
      st = it->second.status;
      if (st.ok()) *reply = std::move(it->second.reply);
    }
    if (it->second.receiving) {
      it->second.abandoned = true;  // the rendezvous receive still writes into its buffer
    } else {
      inflight_.erase(it);
    }
    return st;
  }

  std::vector<uint8_t> AcquireBuffer() override { return pool_.Acquire(); }
  void ReleaseBuffer(std::vector<uint8_t> b) override { pool_.Release(std::move(b)); }

 private:
  struct Peer {
    ucp_ep_h ep;
    std::string address;
    bool failed;
  };
  struct Inflight {
    int peer = -1;
    bool done = false;
    bool receiving = false;  // a rendezvous receive is writing into `reply`
    bool abandoned = false;
    absl::Status status;
    std::vector<uint8_t> reply;
  };
  struct SendState {
    UcxClient* self;
    uint64_t id;
    std::vector<uint8_t> bytes;
  };
  struct RecvState {
    UcxClient* self;
    uint64_t id;
  };

  void DoSend(int peer, SendState* send) {
    ucp_ep_h ep;
    {
      std::lock_guard<std::mutex> l(mu_);
      ep =
          peers_[static_cast<size_t>(peer)].failed ? nullptr : peers_[static_cast<size_t>(peer)].ep;
    }
    if (ep == nullptr) {
      Complete(send->id, absl::UnavailableError("peer has failed"), nullptr);
      pool_.Release(std::move(send->bytes));
      delete send;
      return;
    }
    ucp_request_param_t prm;
    std::memset(&prm, 0, sizeof(prm));
    prm.op_attr_mask =
        UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_AM_SEND_FLAG_REPLY;
    prm.cb.send = &UcxClient::OnSent;
    prm.user_data = send;
    void* req = ucp_am_send_nbx(ep, kAmRequest, &send->id, sizeof(send->id), send->bytes.data(),
                                send->bytes.size(), &prm);
    if (req == nullptr) {
      OnSent(nullptr, UCS_OK, send);
    } else if (UCS_PTR_IS_ERR(req)) {
      OnSent(nullptr, UCS_PTR_STATUS(req), send);
    }
  }

  static void OnSent(void* req, ucs_status_t status, void* user) {
    auto* send = static_cast<SendState*>(user);
    if (status != UCS_OK) {
      send->self->Complete(send->id, UcsError("send", status), nullptr);
    }
    send->self->pool_.Release(std::move(send->bytes));
    delete send;
    if (req != nullptr) ucp_request_free(req);
  }

  // Marks `id` done. `reply` (may be null) is moved in when OK.
  void Complete(uint64_t id, absl::Status st, std::vector<uint8_t>* reply) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = inflight_.find(id);
    if (it == inflight_.end() || it->second.done) return;
    it->second.done = true;
    it->second.status = std::move(st);
    if (reply != nullptr) it->second.reply = std::move(*reply);
    cv_.notify_all();
  }

  static ucs_status_t OnReply(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxClient*>(arg);
    if (header_length != sizeof(uint64_t)) return UCS_OK;
    uint64_t id;
    std::memcpy(&id, header, sizeof(id));
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
      std::vector<uint8_t>* target;
      {
        std::lock_guard<std::mutex> l(self->mu_);
        auto it = self->inflight_.find(id);
        if (it == self->inflight_.end() || it->second.done) {
          ucp_am_data_release(self->worker_, data);
          return UCS_OK;
        }
        it->second.receiving = true;
        target = &it->second.reply;
        // A pooled buffer: a fresh multi-MiB vector would page-fault on every reply.
        if (target->capacity() < length) *target = self->pool_.Acquire();
      }
      target->resize(length);
      auto* rs = new RecvState{self, id};
      ucp_request_param_t prm;
      std::memset(&prm, 0, sizeof(prm));
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      prm.cb.recv_am = &UcxClient::OnRndvDone;
      prm.user_data = rs;
      void* req = ucp_am_recv_data_nbx(self->worker_, data, target->data(), length, &prm);
      if (req == nullptr) {
        OnRndvDone(nullptr, UCS_OK, length, rs);
      } else if (UCS_PTR_IS_ERR(req)) {
        OnRndvDone(nullptr, UCS_PTR_STATUS(req), 0, rs);
      }
      return UCS_OK;
    }
    std::vector<uint8_t> bytes = self->pool_.Acquire();
    bytes.assign(static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + length);
    self->Complete(id, absl::OkStatus(), &bytes);
    return UCS_OK;
  }

  static void OnRndvDone(void* req, ucs_status_t status, size_t, void* user) {
    auto* rs = static_cast<RecvState*>(user);
    UcxClient* self = rs->self;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      auto it = self->inflight_.find(rs->id);
      if (it != self->inflight_.end()) {
        it->second.receiving = false;
        if (it->second.abandoned) {
          self->inflight_.erase(it);
        } else if (!it->second.done) {
          it->second.done = true;
          it->second.status = status == UCS_OK ? absl::OkStatus() : UcsError("receive", status);
          self->cv_.notify_all();
        }
      }
    }
    delete rs;
    if (req != nullptr) ucp_request_free(req);
  }

  static void OnPeerError(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<UcxClient*>(arg);
    std::lock_guard<std::mutex> l(self->mu_);
    for (size_t i = 0; i < self->peers_.size(); ++i) {
      Peer& p = self->peers_[i];
      if (p.ep != ep) continue;
      p.failed = true;
      for (auto& [id, f] : self->inflight_) {
        if (f.peer == static_cast<int>(i) && !f.done) {
          f.done = true;
          f.status = absl::UnavailableError(
              absl::StrCat("peer ", p.address, " failed: ", ucs_status_string(status)));
        }
      }
      // Close the endpoint from the progress thread, outside this callback.
      p.ep = nullptr;
      self->RunAsync([self, ep] {
        ucp_request_param_t prm;
        std::memset(&prm, 0, sizeof(prm));
        prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
        prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
        void* req = ucp_ep_close_nbx(ep, &prm);
        if (req != nullptr && !UCS_PTR_IS_ERR(req)) ucp_request_free(req);
      });
    }
    self->cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Peer> peers_;
  uint64_t next_id_ = 1;
  std::map<uint64_t, Inflight> inflight_;
  BufferPool pool_;
};

// ---------------------------------------------------------------------------------------------
// Server.

class UcxServerImpl : public UcxServer, public UcxWorker {
 public:
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
    const ucs_status_t s = ucp_worker_set_am_recv_handler(worker_, &hp);
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

  absl::StatusOr<std::string> Listen(const std::string& address) override {
    auto sa = ParseHostPort(address);
    if (!sa.ok()) return sa.status();
    absl::StatusOr<std::string> result = absl::InternalError("not run");
    RunSync([&] {
      ucp_listener_params_t lp;
      std::memset(&lp, 0, sizeof(lp));
      lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
      lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&*sa);
      lp.sockaddr.addrlen = sizeof(*sa);
      lp.conn_handler.cb = &UcxServerImpl::OnConnect;
      lp.conn_handler.arg = this;
      ucs_status_t s = ucp_listener_create(worker_, &lp, &listener_);
      if (s != UCS_OK) {
        result = UcsError(("listen on " + address).c_str(), s);
        return;
      }
      ucp_listener_attr_t attr;
      std::memset(&attr, 0, sizeof(attr));
      attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
      s = ucp_listener_query(listener_, &attr);
      if (s != UCS_OK) {
        result = UcsError("ucp_listener_query", s);
        return;
      }
      const auto* bound = reinterpret_cast<const sockaddr_in*>(&attr.sockaddr);
      char host[INET_ADDRSTRLEN];
      inet_ntop(AF_INET, &bound->sin_addr, host, sizeof(host));
      result = absl::StrCat(host, ":", ntohs(bound->sin_port));
    });
    return result;
  }

  void Receive(std::chrono::milliseconds timeout, std::vector<ServerRequest>* out) override {
    // The serving thread keeps the worker while requests keep coming, and hands it back to the
    // progress thread once a spin finds nothing.
    if (!held_) {
      HoldWorker();
      held_ = true;
    }
    const bool got = SpinHeld(SpinTime(), [&] {
      std::lock_guard<std::mutex> l(mu_);
      return !queue_.empty() || closed_;
    });
    if (!got) {
      held_ = false;
      ReleaseWorker();
    }
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, timeout, [&] { return !queue_.empty() || closed_; });
    while (!queue_.empty()) {
      out->push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
  }

  void Reply(uint64_t token, std::vector<uint8_t> reply) override {
    auto* send = new ReplyState{this, 0, std::move(reply)};
    DoReply(token, send);
  }

  std::vector<uint8_t> AcquireBuffer() override { return pool_.Acquire(); }
  void ReleaseBuffer(std::vector<uint8_t> b) override { pool_.Release(std::move(b)); }

  ServerStats stats() const override {
    std::lock_guard<std::mutex> l(mu_);
    return stats_;
  }

  void Shutdown() override {
    if (shut_down_.exchange(true)) return;
    if (held_) {
      held_ = false;
      ReleaseWorker();
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      closed_ = true;
      cv_.notify_all();
    }
    RunSync([this] {
      if (listener_ != nullptr) ucp_listener_destroy(listener_);
      listener_ = nullptr;
      std::set<ucp_ep_h> eps;
      {
        std::lock_guard<std::mutex> l(mu_);
        eps.swap(live_eps_);
      }
      for (ucp_ep_h ep : eps) {
        ucp_request_param_t prm;
        std::memset(&prm, 0, sizeof(prm));
        prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
        prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
        WaitRequest(ucp_ep_close_nbx(ep, &prm));
      }
    });
    StopThread();
    Destroy();
  }

 private:
  struct Pending {
    ucp_ep_h ep;
    uint64_t id;
  };
  struct ReplyState {
    UcxServerImpl* self;
    uint64_t id;
    std::vector<uint8_t> bytes;
  };
  struct RecvState {
    UcxServerImpl* self;
    uint64_t token;
    std::vector<uint8_t> bytes;
  };

  static void OnConnect(ucp_conn_request_h conn, void* arg) {
    auto* self = static_cast<UcxServerImpl*>(arg);
    ucp_ep_params_t ep;
    std::memset(&ep, 0, sizeof(ep));
    ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.conn_request = conn;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &UcxServerImpl::OnPeerError;
    ep.err_handler.arg = self;
    ucp_ep_h handle = nullptr;
    if (ucp_ep_create(self->worker_, &ep, &handle) == UCS_OK) {
      std::lock_guard<std::mutex> l(self->mu_);
      self->live_eps_.insert(handle);
    }
  }

  static void OnPeerError(void* arg, ucp_ep_h ep, ucs_status_t) {
    auto* self = static_cast<UcxServerImpl*>(arg);
    {
      std::lock_guard<std::mutex> l(self->mu_);
      ++self->stats_.peer_errors;
      self->live_eps_.erase(ep);
      // Requests of the dead client can no longer be answered; forget them now, because a later
      // endpoint may reuse this handle's address.
      for (auto it = self->pending_.begin(); it != self->pending_.end();) {
        it = it->second.ep == ep ? self->pending_.erase(it) : std::next(it);
      }
    }
    self->RunAsync([self, ep] {
      ucp_request_param_t prm;
      std::memset(&prm, 0, sizeof(prm));
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
      void* req = ucp_ep_close_nbx(ep, &prm);
      if (req != nullptr && !UCS_PTR_IS_ERR(req)) ucp_request_free(req);
    });
  }

  uint64_t Register(ucp_ep_h ep, uint64_t id) {
    std::lock_guard<std::mutex> l(mu_);
    const uint64_t token = next_token_++;
    pending_[token] = Pending{ep, id};
    return token;
  }

  void Enqueue(uint64_t token, std::vector<uint8_t> bytes) {
    std::lock_guard<std::mutex> l(mu_);
    ++stats_.requests;
    stats_.bytes_in += bytes.size();
    queue_.push_back(ServerRequest{token, std::move(bytes)});
    cv_.notify_all();
  }

  static ucs_status_t OnRequest(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxServerImpl*>(arg);
    if (header_length != sizeof(uint64_t) ||
        !(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) {
      std::lock_guard<std::mutex> l(self->mu_);
      ++self->stats_.peer_errors;
      return UCS_OK;
    }
    uint64_t id;
    std::memcpy(&id, header, sizeof(id));
    const uint64_t token = self->Register(param->reply_ep, id);
    std::vector<uint8_t> bytes = self->pool_.Acquire();
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
      bytes.resize(length);
      auto* rs = new RecvState{self, token, std::move(bytes)};
      ucp_request_param_t prm;
      std::memset(&prm, 0, sizeof(prm));
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      prm.cb.recv_am = &UcxServerImpl::OnRndvDone;
      prm.user_data = rs;
      void* req = ucp_am_recv_data_nbx(self->worker_, data, rs->bytes.data(), length, &prm);
      if (req == nullptr) {
        OnRndvDone(nullptr, UCS_OK, length, rs);
      } else if (UCS_PTR_IS_ERR(req)) {
        OnRndvDone(nullptr, UCS_PTR_STATUS(req), 0, rs);
      }
      return UCS_OK;
    }
    bytes.assign(static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + length);
    self->Enqueue(token, std::move(bytes));
    return UCS_OK;
  }

  static void OnRndvDone(void* req, ucs_status_t status, size_t, void* user) {
    auto* rs = static_cast<RecvState*>(user);
    if (status == UCS_OK) {
      rs->self->Enqueue(rs->token, std::move(rs->bytes));
    } else {
      std::lock_guard<std::mutex> l(rs->self->mu_);
      rs->self->pending_.erase(rs->token);
      ++rs->self->stats_.peer_errors;
    }
    delete rs;
    if (req != nullptr) ucp_request_free(req);
  }

  void DoReply(uint64_t token, ReplyState* send) {
    ucp_ep_h ep;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = pending_.find(token);
      if (it == pending_.end() || closed_) {
        if (it != pending_.end()) pending_.erase(it);
        ++stats_.dropped_replies;
        pool_.Release(std::move(send->bytes));
        delete send;
        return;
      }
      ep = it->second.ep;
      send->id = it->second.id;
      pending_.erase(it);
      ++stats_.replies;
      stats_.bytes_out += send->bytes.size();
    }
    ucp_request_param_t prm;
    std::memset(&prm, 0, sizeof(prm));
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    prm.cb.send = &UcxServerImpl::OnReplySent;
    prm.user_data = send;
    void* req = ucp_am_send_nbx(ep, kAmReply, &send->id, sizeof(send->id), send->bytes.data(),
                                send->bytes.size(), &prm);
    if (req == nullptr) {
      OnReplySent(nullptr, UCS_OK, send);
    } else if (UCS_PTR_IS_ERR(req)) {
      OnReplySent(nullptr, UCS_PTR_STATUS(req), send);
    }
  }

  static void OnReplySent(void* req, ucs_status_t status, void* user) {
    auto* send = static_cast<ReplyState*>(user);
    if (status != UCS_OK) {
      std::lock_guard<std::mutex> l(send->self->mu_);
      ++send->self->stats_.dropped_replies;
    }
    send->self->pool_.Release(std::move(send->bytes));
    delete send;
    if (req != nullptr) ucp_request_free(req);
  }

  ucp_listener_h listener_ = nullptr;
  std::string worker_address_;
  bool held_ = false;  // Receive's thread holds the worker
  std::atomic<bool> shut_down_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false;
  uint64_t next_token_ = 1;
  std::deque<ServerRequest> queue_;
  std::map<uint64_t, Pending> pending_;
  std::set<ucp_ep_h> live_eps_;
  ServerStats stats_;
  BufferPool pool_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ClientTransport>> NewUcxClient() {
  auto c = std::make_unique<UcxClient>();
  if (auto s = c->Start(); !s.ok()) return s;
  return std::unique_ptr<ClientTransport>(std::move(c));
}

absl::StatusOr<std::unique_ptr<UcxServer>> NewUcxServer() {
  auto s = std::make_unique<UcxServerImpl>();
  if (auto st = s->Start(); !st.ok()) return st;
  return std::unique_ptr<UcxServer>(std::move(s));
}

}  // namespace dmoe::transport
