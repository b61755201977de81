#include "transport/ucx.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "transport/buffer_pool.h"
#include "transport/slot_table.h"

namespace dmoe::transport {
namespace {

constexpr unsigned kAmRequest = 17;
constexpr unsigned kAmReply = 18;
// Client -> server, first on every endpoint: the client's worker address (see FetchWorkerAddress).
constexpr unsigned kAmHello = 19;
constexpr size_t kMaxHello = 64 * 1024;
// Eager messages up to this size are copied out of UCX's buffer under the same lock that queues
// (server) or completes (client) them; larger ones are copied outside the lock.
constexpr size_t kCopyUnderLock = 64 * 1024;

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
    // The worker lock: a caller's thread and the progress thread may share a CPU (a pinned
    // process, a 2-core box); with UCX's default spinlock a preempted holder makes the other
    // spin out its whole time slice (measured: 2/3 of a pinned client's time in
    // pthread_spin_lock, 2.5 MB/s instead of ~70 for 600-byte round trips 8 in flight).
    if (std::getenv("UCX_USE_MT_MUTEX") == nullptr) ucp_config_modify(config, "USE_MT_MUTEX", "y");
    // A peer process that vanishes without closing (SIGKILL, a dead host) is seen only by UCX's
    // keepalive on transports without a socket (sm, and rc without rdmacm); its default of 20 s
    // left requests to wait out their deadlines. 1 s costs a few small messages per peer.
    if (std::getenv("UCX_KEEPALIVE_INTERVAL") == nullptr) {
      ucp_config_modify(config, "KEEPALIVE_INTERVAL", "1s");
    }
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
  bool SpinProgress(std::chrono::microseconds spin, Ready ready,
                    Clock::time_point deadline = Clock::time_point::max()) {
    HoldWorker();
    const bool done = SpinHeld(spin, ready, deadline);
    // Done: the caller is likely back soon (the next round trip), so the progress thread is not
    // woken now; it takes over after one to two kLazyHandoff periods without caller activity.
    // Not done: the caller is about to sleep, so progress must go on without it at once.
    ReleaseWorker(/*handoff_now=*/!done);
    return done;
  }

  // Progresses on the calling thread, which already holds the worker (HoldWorker).
  // `spin` bounds the time without any event, not the whole wait: while a large message is
  // streaming in (every progress call moves bytes) the caller keeps the worker instead of
  // handing a half-done transfer to the progress thread and sleeping (which cost a wake-up per
  // socket read and doubled the time of multi-MiB round trips).
  template <typename Ready>
  bool SpinHeld(std::chrono::microseconds spin, Ready ready,
                Clock::time_point deadline = Clock::time_point::max()) {
    // Reading the clock costs about as much as an empty poll (a quarter of a small round trip's
    // time over sm went to clock_gettime when it was read on every poll): every 8th poll, and
    // not before the first 8, where small round trips complete. The quiet time starts there.
    Clock::time_point last_event;
    bool event = false;
    for (unsigned i = 1;; ++i) {
      if (ready()) return true;
      if (ucp_worker_progress(worker_) != 0) event = true;
      if (i % 8 != 0) continue;
      const auto now = Clock::now();
      if (now >= deadline) break;
      if (event || i == 8) {
        last_event = now;
        event = false;
        continue;
      }
      const auto quiet = now - last_event;
      if (quiet >= spin + ExpectedSilence()) break;
      if (quiet >= kYieldAfter) {
        // Nothing for a while: let another runnable thread have the core (with more spinning
        // threads than cores, e.g. several shards on one small machine, this is what keeps the
        // latency at microseconds instead of scheduler slices). Not at once: a sched_yield is a
        // system call, and a reply that lands during one is seen a syscall later (the first
        // microseconds of a wait are where small round trips complete).
        sched_yield();
      }
    }
    return ready();
  }

  // Bytes of sends that have not completed. While a peer takes in a large message no event
  // reaches this side (over sm it copies the message straight out of our memory), so about 1 us
  // per 4 KiB of them is the transfer, not idleness: without this a 2.5 MiB round trip over sm
  // spun out, slept, and took 3x ucx_perftest's time.
  void SendPending(size_t bytes) {
    sending_bytes_.fetch_add(static_cast<int64_t>(bytes), std::memory_order_relaxed);
  }
  void SendDone(size_t bytes) {
    sending_bytes_.fetch_sub(static_cast<int64_t>(bytes), std::memory_order_relaxed);
  }
  // Extra spin for an exchange of about `bytes` each way (see Wait and Receive).
  static std::chrono::microseconds ExchangeSpin(size_t bytes) {
    return std::min(std::chrono::microseconds(bytes / 1024), kMaxExchangeSpin);
  }
  static constexpr std::chrono::microseconds kMaxExchangeSpin{5000};
  // Capped: sends to a hung peer never complete, and must not keep a waiter spinning.
  std::chrono::microseconds ExpectedSilence() const {
    const int64_t b = sending_bytes_.load(std::memory_order_relaxed);
    return std::chrono::microseconds(std::clamp<int64_t>(b / 4096, 0, 2000));
  }

  // While a caller holds the worker, the progress thread stays off it (it would only contend for
  // the worker lock and a core).
  void HoldWorker() { ++spinners_; }
  // Waking the progress thread after every round trip costs two context switches per message
  // and, on a shared CPU, contention for the worker lock with the caller's next Post; worse, an
  // armed progress thread makes every peer signal its event fd for each message (a system call
  // on the sender, a wake-up here). When the caller will be back within microseconds it keeps
  // the worker in all but name: the progress thread takes over only after a whole kLazyHandoff
  // period without caller activity, or at once when a caller is about to sleep (`handoff_now`).
  void ReleaseWorker(bool handoff_now) {
    MarkActive();
    if (--spinners_ == 0 && handoff_now) {
      std::lock_guard<std::mutex> l(ops_mu_);
      handoff_ = true;
      ops_cv_.notify_all();
    }
  }
  // A caller used the worker (sent, or stopped spinning) just now.
  // Any change tells the progress thread a caller was here, so two callers racing may lose an
  // increment: a plain load and store, not a locked read-modify-write, on every message.
  void MarkActive() {
    activity_.store(activity_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }
  static int64_t NowNs() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
        .count();
  }
  // How long SpinHeld polls without events before it starts yielding the core between polls.
  static constexpr std::chrono::microseconds kYieldAfter{20};
  // After how long without caller activity (between one and two of these) the progress thread
  // takes over the worker.
  static constexpr std::chrono::microseconds kLazyHandoff{1000};

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
    std::vector<std::function<void()>> ops;  // swapped with ops_: both keep their capacity
    bool owner = true;  // this thread progresses the worker (no caller has used it since)
    uint64_t seen = activity_.load(std::memory_order_relaxed);
    while (!stop_) {
      {
        std::unique_lock<std::mutex> l(ops_mu_);
        // This thread keeps the worker while no caller uses it. Once a caller does, it waits
        // until one hands off (about to sleep) or no caller has been active for a whole
        // kLazyHandoff period (a lazy release does not notify; activity is a counter, not a
        // clock, so that callers pay one relaxed increment).
        for (;;) {
          if (stop_ || !ops_.empty()) break;
          uint64_t now = activity_.load(std::memory_order_relaxed);
          if (spinners_ == 0 && (handoff_ || (owner && now == seen))) break;
          owner = false;
          seen = now;
          if (ops_cv_.wait_for(l, kLazyHandoff) == std::cv_status::timeout) {
            now = activity_.load(std::memory_order_relaxed);
            if (spinners_ == 0 && now == seen) break;
          }
        }
        handoff_ = false;
        owner = true;
        seen = activity_.load(std::memory_order_relaxed);
        ops.swap(ops_);
      }
      for (auto& op : ops) op();
      ops.clear();
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
  std::atomic<uint64_t> activity_{0};
  std::atomic<int64_t> sending_bytes_{0};
  bool handoff_ = false;  // guarded by ops_mu_
  std::condition_variable ops_cv_;
  std::mutex ops_mu_;
  std::vector<std::function<void()>> ops_;
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
// "HOST:PORT" addresses. A server's Listen opens no UCX listener: UCX's sockaddr connection
// manager trusts whoever connects, and Debian's UCX 1.13 aborts the whole process on a connection
// whose first 8 bytes (a length) disagree with what follows (tcp_sockcm_ep.c:825 "Assertion
// `cep->comm_ctx.offset <= cep->comm_ctx.length' failed: 2080 > 16" for a run of zero bytes), and
// on a well-framed message with one garbage byte of private data (address.c:1051 "Assertion
// `*addr_version == UCP_OBJECT_VERSION_V2' failed"): any stray TCP client could kill a shard.
// Instead the port answers every connection with the worker's address, "ucx-addr:HEX\n", and closes
// it, reading nothing; the client then connects to that worker address. No byte from that port's
// clients reaches UCX.
//
// Every client endpoint (either kind of address) first sends kAmHello with the client's own worker
// address; the server creates its endpoint to it, which UCX pairs with the one it made for the
// client's connection (the reply_ep of its requests). That makes the reply endpoint the
// server's own, with an error callback: without it UCX destroys a failed client's endpoint by
// itself, and a reply still queued for it would be sent through freed memory.
constexpr int kAddressTimeoutMs = 1000;  // for the TCP connect, and again for the answer
constexpr size_t kMaxAddressAnswer = 64 * 1024;

// Asks the server at `sa` for its "ucx-addr:HEX". Blocks at most 2 * kAddressTimeoutMs.
absl::StatusOr<std::string> FetchWorkerAddress(const sockaddr_in& sa, const std::string& address) {
  const auto fail = [&](const std::string& what) {
    return absl::UnavailableError(absl::StrCat("connect to ", address, ": ", what));
  };
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return fail(absl::StrCat("socket: ", std::strerror(errno)));
  struct Closer {
    int fd;
    ~Closer() { close(fd); }
  } closer{fd};
  pollfd pfd{fd, POLLOUT, 0};
  if (connect(fd, reinterpret_cast<const sockaddr*>(&sa), sizeof(sa)) != 0) {
    if (errno != EINPROGRESS) return fail(std::strerror(errno));
    if (poll(&pfd, 1, kAddressTimeoutMs) != 1) return fail("timed out");
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) return fail(std::strerror(err));
  }
  std::string answer;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(kAddressTimeoutMs);
  char buf[4096];
  for (;;) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n == 0) break;
    if (n > 0) {
      answer.append(buf, static_cast<size_t>(n));
      if (answer.size() > kMaxAddressAnswer) return fail("answer too long: not a dmoe UCX port");
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return fail(std::strerror(errno));
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    pfd.events = POLLIN;
    if (left.count() <= 0 || poll(&pfd, 1, static_cast<int>(left.count())) != 1) {
      return fail("no worker address in time");
    }
  }
  if (!absl::StartsWith(answer, "ucx-addr:") || !absl::EndsWith(answer, "\n")) {
    return fail("not a dmoe UCX port (no \"ucx-addr:\" answer)");
  }
  answer.pop_back();
  return answer;
}

// ---------------------------------------------------------------------------------------------
// Client.

class UcxClient : public ClientTransport, public UcxWorker {
 public:
  ~UcxClient() override {
    RunSync([this] {
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
    if (!FromHex(by_worker.substr(9), &worker_addr) || worker_addr.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("bad worker address \"", by_worker, "\""));
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
      void* req = ucp_am_send_nbx(handle, kAmHello, nullptr, 0, hello_.data(), hello_.size(), &prm);
      if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);  // released once sent; hello_ outlives it
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
    Slot* slot;
    ucp_ep_h ep;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (peer < 0 || peer >= static_cast<int>(peers_.size())) {
        return absl::InvalidArgumentError(absl::StrCat("no peer ", peer));
      }
      const Peer& p = peers_[static_cast<size_t>(peer)];
      if (p.failed || p.ep == nullptr) {
        return absl::UnavailableError(absl::StrCat("peer ", p.address, " has failed"));
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
    std::lock_guard<std::mutex> l(mu_);
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
    std::unique_lock<std::mutex> l(mu_);
    Slot* s = slots_.Find(id);
    if (s == nullptr || s->waited) {
      return absl::InvalidArgumentError(absl::StrCat("unknown request id ", id));
    }
    const bool done = cv_.wait_until(l, deadline, [&] { return s->done; });
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

  std::vector<uint8_t> AcquireBuffer() override {
    std::lock_guard<std::mutex> l(mu_);
    return pool_.Acquire();
  }
  void ReleaseBuffer(std::vector<uint8_t> b) override {
    if (b.capacity() == 0) return;
    std::lock_guard<std::mutex> l(mu_);
    pool_.Release(std::move(b));
  }

 private:
  struct Peer {
    ucp_ep_h ep;
    std::string address;
    bool failed;
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

  // REQUIRES: mu_ held.
  void MaybeFree(Slot* s) {
    if (!s->waited || s->sending || s->receiving) return;
    if (s->send.capacity() > 0) pool_.Release(std::move(s->send));
    s->send = std::vector<uint8_t>();
    if (s->reply.capacity() > 0) pool_.Release(std::move(s->reply));
    s->reply = std::vector<uint8_t>();
    s->status = absl::OkStatus();
    slots_.Free(s);
  }

  static void OnSent(void* req, ucs_status_t status, void* user) {
    auto* s = static_cast<Slot*>(user);
    UcxClient* self = s->owner;
    if (req != nullptr) self->SendDone(s->request_bytes.load(std::memory_order_relaxed));
    {
      std::lock_guard<std::mutex> l(self->mu_);
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
    std::lock_guard<std::mutex> l(mu_);
    Slot* s = slots_.Find(id);
    if (s == nullptr || s->done) {
      if (reply != nullptr) pool_.Release(std::move(*reply));  // a late reply
      return;
    }
    if (reply != nullptr) s->reply = std::move(*reply);
    FinishLocked(s, std::move(st));
  }

  // Marks `s` done with `st` and wakes its waiter (spinning on `finished`, or on cv_).
  // REQUIRES: mu_ held, !s->done.
  void FinishLocked(Slot* s, absl::Status st) {
    s->done = true;
    s->status = std::move(st);
    s->finished.store(true, std::memory_order_release);
    cv_.notify_all();
  }

  static ucs_status_t OnReply(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxClient*>(arg);
    if (header_length != sizeof(uint64_t)) return UCS_OK;
    uint64_t id;
    std::memcpy(&id, header, sizeof(id));
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
      Slot* s;
      {
        std::lock_guard<std::mutex> l(self->mu_);
        s = self->slots_.Find(id);
        if (s == nullptr || s->done) {
          ucp_am_data_release(self->worker_, data);
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
      ucp_request_param_t prm;
      std::memset(&prm, 0, sizeof(prm));
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      prm.cb.recv_am = &UcxClient::OnRndvDone;
      prm.user_data = s;
      void* req = ucp_am_recv_data_nbx(self->worker_, data, s->reply.data(), length, &prm);
      if (req == nullptr) {
        OnRndvDone(nullptr, UCS_OK, length, s);
      } else if (UCS_PTR_IS_ERR(req)) {
        OnRndvDone(nullptr, UCS_PTR_STATUS(req), 0, s);
      }
      return UCS_OK;
    }
    if (length <= kCopyUnderLock) {  // one lock: find, copy out, complete
      std::lock_guard<std::mutex> l(self->mu_);
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
      std::lock_guard<std::mutex> l(self->mu_);
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
      std::lock_guard<std::mutex> l(self->mu_);
      s->receiving = false;
      if (!s->done) {
        self->FinishLocked(s, status == UCS_OK ? absl::OkStatus() : UcsError("receive", status));
      }
      self->MaybeFree(s);
    }
    if (req != nullptr) ucp_request_free(req);
  }

  static void OnPeerError(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<UcxClient*>(arg);
    std::lock_guard<std::mutex> l(self->mu_);
    for (size_t i = 0; i < self->peers_.size(); ++i) {
      Peer& p = self->peers_[i];
      if (p.ep != ep) continue;
      p.failed = true;
      for (Slot& f : self->slots_.slots()) {
        if (f.id != 0 && f.peer == static_cast<int>(i) && !f.done) {
          self->FinishLocked(&f, absl::UnavailableError(absl::StrCat(
                                     "peer ", p.address, " failed: ", ucs_status_string(status))));
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

  std::vector<uint8_t> hello_;  // this worker's address, sent as kAmHello
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Peer> peers_;
  SlotTable<Slot> slots_{kMaxInflight};
  UnlockedBufferPool pool_;  // guarded by mu_
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
    std::unique_lock<std::mutex> l(mu_);
    // wait_for reads the clock even when there is work already: not on every request.
    if (queue_.empty() && !closed_) {
      cv_.wait_for(l, timeout, [&] { return !queue_.empty() || closed_; });
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
      std::lock_guard<std::mutex> l(mu_);
      p = pending_.Find(token);
      if (p == nullptr || p->dead || closed_) {
        if (p != nullptr) pending_.Free(p);
        ++stats_.dropped_replies;
        pool_.Release(std::move(reply));
        return;
      }
      ep = p->ep;
      p->sending = true;
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
  }

  std::vector<uint8_t> AcquireBuffer() override {
    std::lock_guard<std::mutex> l(mu_);
    return pool_.Acquire();
  }
  void ReleaseBuffer(std::vector<uint8_t> b) override {
    if (b.capacity() == 0) return;
    std::lock_guard<std::mutex> l(mu_);
    pool_.Release(std::move(b));
  }

  ServerStats stats() const override {
    std::lock_guard<std::mutex> l(mu_);
    return stats_;
  }

  void Shutdown() override {
    if (shut_down_.exchange(true)) return;
    {
      std::lock_guard<std::mutex> l(mu_);
      closed_ = true;
      has_work_.store(true, std::memory_order_release);  // nothing more to wait for
      cv_.notify_all();
    }
    if (address_fd_ >= 0) {
      ::shutdown(address_fd_, SHUT_RDWR);  // wakes accept() with EINVAL
      address_thread_.join();
      close(address_fd_);
      address_fd_ = -1;
    }
    RunSync([this] {
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
        if (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN) continue;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          std::this_thread::sleep_for(std::chrono::milliseconds(10));  // out of fds: back off
          continue;
        }
        return;  // EINVAL: Shutdown
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
  static ucs_status_t OnHello(void* arg, const void*, size_t, void* data, size_t length,
                              const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxServerImpl*>(arg);
    const ucp_ep_h reply_ep = param->reply_ep;
    if (reply_ep == nullptr || length == 0 || length > kMaxHello ||
        (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
      std::lock_guard<std::mutex> l(self->mu_);
      ++self->stats_.peer_errors;
      return UCS_OK;
    }
    const auto* bytes = static_cast<const uint8_t*>(data);
    self->RunAsync([self, reply_ep, address = std::vector<uint8_t>(bytes, bytes + length)] {
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
        std::lock_guard<std::mutex> l(self->mu_);
        self->live_eps_.insert(handle);
        return;
      }
      ucp_request_param_t prm;
      std::memset(&prm, 0, sizeof(prm));
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
      void* req = ucp_ep_close_nbx(handle, &prm);
      if (req != nullptr && !UCS_PTR_IS_ERR(req)) ucp_request_free(req);
    });
    return UCS_OK;
  }

  static void OnPeerError(void* arg, ucp_ep_h ep, ucs_status_t) {
    auto* self = static_cast<UcxServerImpl*>(arg);
    {
      std::lock_guard<std::mutex> l(self->mu_);
      ++self->stats_.peer_errors;
      self->live_eps_.erase(ep);
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

  // REQUIRES: mu_ held.
  bool SendingOnLocked(ucp_ep_h ep) {
    for (const Pending& p : pending_.slots()) {
      if (p.id != 0 && p.ep == ep && p.sending) return true;
    }
    return false;
  }

  // Closes a failed endpoint, on the progress thread.
  void CloseFailed(ucp_ep_h ep) {
    RunAsync([this, ep] {
      ucp_request_param_t prm;
      std::memset(&prm, 0, sizeof(prm));
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
      void* req = ucp_ep_close_nbx(ep, &prm);
      if (req != nullptr && !UCS_PTR_IS_ERR(req)) ucp_request_free(req);
    });
  }

  // REQUIRES: mu_ held.
  void EnqueueLocked(Pending* p) {
    NoteRequest(p->buffer.size());
    ++stats_.requests;
    stats_.bytes_in += p->buffer.size();
    queue_.push_back(ServerRequest{p->id, std::move(p->buffer)});
    has_work_.store(true, std::memory_order_release);
    p->buffer = std::vector<uint8_t>();
    cv_.notify_all();
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
                       (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) != 0;
    // A small eager message is copied out and queued under the one lock that allocates its slot
    // and buffer; a large one is copied between two (the lock is not held for a long copy).
    std::vector<uint8_t> bytes;
    if (valid && !rndv && length > kCopyUnderLock) {
      {
        std::lock_guard<std::mutex> l(self->mu_);
        bytes = self->pool_.AcquireSized(length);
      }
      std::memcpy(bytes.data(), data, length);
    }
    Pending* p = nullptr;
    {
      std::lock_guard<std::mutex> l(self->mu_);
      if (valid) p = self->pending_.Allocate();
      if (p == nullptr) {  // malformed, or more requests in flight than slots: drop it
        ++self->stats_.peer_errors;
        if (rndv) ucp_am_data_release(self->worker_, data);
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
    ucp_request_param_t prm;
    std::memset(&prm, 0, sizeof(prm));
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    prm.cb.recv_am = &UcxServerImpl::OnRndvDone;
    prm.user_data = p;
    void* req = ucp_am_recv_data_nbx(self->worker_, data, p->buffer.data(), length, &prm);
    if (req == nullptr) {
      OnRndvDone(nullptr, UCS_OK, length, p);
    } else if (UCS_PTR_IS_ERR(req)) {
      OnRndvDone(nullptr, UCS_PTR_STATUS(req), 0, p);
    }
    return UCS_OK;
  }

  static void OnRndvDone(void* req, ucs_status_t status, size_t, void* user) {
    auto* p = static_cast<Pending*>(user);
    UcxServerImpl* self = p->owner;
    if (status == UCS_OK) {
      std::lock_guard<std::mutex> l(self->mu_);
      p->receiving = false;
      self->EnqueueLocked(p);
    } else {
      std::lock_guard<std::mutex> l(self->mu_);
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
      std::lock_guard<std::mutex> l(self->mu_);
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
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false;
  std::vector<ServerRequest> queue_;
  SlotTable<Pending> pending_{kMaxPending};
  std::set<ucp_ep_h> live_eps_;
  std::set<ucp_ep_h> closing_;  // failed, closed once their last reply send is done
  ServerStats stats_;
  UnlockedBufferPool pool_;  // guarded by mu_
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
