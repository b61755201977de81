// The UCX transport's shared parts (transport/ucx_client.cc, transport/ucx_server.cc): a worker
// with its progress thread, the rendezvous receive, and the "HOST:PORT" address exchange.
// Internal to //transport:ucx.
#ifndef DMOE_TRANSPORT_UCX_WORKER_H_
#define DMOE_TRANSPORT_UCX_WORKER_H_

#include <netinet/in.h>
#include <sched.h>
#include <ucp/api/ucp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/mutex.h"
#include "transport/transport.h"

namespace dmoe::transport::ucx_internal {

constexpr unsigned kAmRequest = 17;
constexpr unsigned kAmReply = 18;
// Client -> server, first on every endpoint: the client's worker address (see FetchWorkerAddress).
constexpr unsigned kAmHello = 19;  // header: the cluster token (may be empty)
constexpr size_t kMaxHello = 64 * 1024;
// Eager messages up to this size are copied out of UCX's buffer under the same lock that queues
// (server) or completes (client) them; larger ones are copied outside the lock.
constexpr size_t kCopyUnderLock = 64 * 1024;

absl::Status UcsError(const char* what, ucs_status_t s);

// Context + worker + a progress thread that owns them. Subclasses add handlers.
class UcxWorker {
 public:
  virtual ~UcxWorker() = default;

  absl::Status Init();

  void StartThread() {
    thread_ = std::thread([this] { Loop(); });
  }

  // Runs `fn` on the progress thread and waits for it.
  void RunSync(std::function<void()> fn);

  // Queues `fn` for the progress thread.
  void RunAsync(std::function<void()> fn);

  void StopThread();

  void Destroy();

 protected:
  // Called by the progress thread, outside every lock, after each round of progress while it
  // holds the worker (at least every 100 ms then; not while callers keep it, spinning on their
  // replies): for checks no UCX callback makes (a client's wireup bound, which Post checks too).
  virtual void Housekeeping() {}

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
      MutexLock l(&ops_mu_);
      handoff_ = true;
      ops_cv_.SignalAll();
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

  // Starts a forced close of `ep` (no flush); returns the request, for WaitRequest.
  static void* ForceClose(ucp_ep_h ep) {
    ucp_request_param_t prm;
    std::memset(&prm, 0, sizeof(prm));
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
    return ucp_ep_close_nbx(ep, &prm);
  }
  // A forced close nobody waits for (on the progress thread).
  static void ForceCloseNoWait(ucp_ep_h ep) {
    void* req = ForceClose(ep);
    if (req != nullptr && !UCS_PTR_IS_ERR(req)) ucp_request_free(req);
  }

  // Waits for a UCX request started on the progress thread (only while on it).
  ucs_status_t WaitRequest(void* req);

  // Receives a rendezvous active message (`data` from the AM handler) into dst[length]; `done`
  // runs with `user` once it has landed or failed (at once when UCX completes it inline), on the
  // thread that progresses the worker.
  void ReceiveRendezvous(void* data, void* dst, size_t length, ucp_am_recv_data_nbx_callback_t done,
                         void* user);

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;

 private:
  void Loop();

  int efd_ = -1;
  int epoll_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<int> spinners_{0};
  std::atomic<uint64_t> activity_{0};
  std::atomic<int64_t> sending_bytes_{0};
  Mutex ops_mu_;
  CondVar ops_cv_;
  bool handoff_ ABSL_GUARDED_BY(ops_mu_) = false;
  std::vector<std::function<void()>> ops_ ABSL_GUARDED_BY(ops_mu_);
};

// "HOST:PORT" -> IPv4 socket address ("localhost" allowed).
absl::StatusOr<sockaddr_in> ParseHostPort(const std::string& address);
std::string ToHex(const void* data, size_t n);
bool FromHex(const std::string& s, std::vector<uint8_t>* out);

// A peer's worker address (a client's hello, a router's map, a listener's answer) made safe to
// give ucp_ep_create, or empty where Debian's UCX 1.13 would abort the process on it: a header
// whose version is not one it unpacks (address.c:1051 "Assertion `*addr_version ==
// UCP_OBJECT_VERSION_V2' failed": one wrong byte of a forged or corrupted address killed the
// node). ucp_ep_create takes no length: the copy has kWorkerAddressPadding zero bytes after the
// address, so a truncated one is read on as zeros (a list UCX refuses past UCP_MAX_RESOURCES
// entries) rather than past the buffer.
inline constexpr size_t kWorkerAddressPadding = 16384;
std::vector<uint8_t> PeerWorkerAddress(const uint8_t* data, size_t size);

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
inline constexpr int kAddressTimeoutMs = 1000;  // for the TCP connect, and again for the answer
inline constexpr size_t kMaxAddressAnswer = 64 * 1024;

// Asks the server at `sa` for its "ucx-addr:HEX". Blocks at most 2 * kAddressTimeoutMs.
absl::StatusOr<std::string> FetchWorkerAddress(const sockaddr_in& sa, const std::string& address);

}  // namespace dmoe::transport::ucx_internal

#endif  // DMOE_TRANSPORT_UCX_WORKER_H_
