#include "transport/ucx_worker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "transport/ucx.h"

namespace dmoe::transport {

absl::StatusOr<bool> UcxSupportsCudaMemory() {
  ucp_params_t params;
  std::memset(&params, 0, sizeof(params));
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM;
  ucp_config_t* config = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
  if (s != UCS_OK) return ucx_internal::UcsError("ucp_config_read", s);
  ucp_context_h context = nullptr;
  s = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (s != UCS_OK) return ucx_internal::UcsError("ucp_init", s);
  ucp_context_attr_t attr;
  std::memset(&attr, 0, sizeof(attr));
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  s = ucp_context_query(context, &attr);
  ucp_cleanup(context);
  if (s != UCS_OK) return ucx_internal::UcsError("ucp_context_query", s);
  return (attr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
}

}  // namespace dmoe::transport

namespace dmoe::transport::ucx_internal {

absl::Status UcsError(const char* what, ucs_status_t s) {
  return absl::UnavailableError(absl::StrCat(what, ": ", ucs_status_string(s)));
}

absl::Status UcxWorker::Init() {
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
  if (epoll_ < 0) {  // the progress thread's epoll_wait would fail at once, spinning
    return absl::UnavailableError(absl::StrCat("UCX: epoll_create1: ", std::strerror(errno)));
  }
  epoll_event ev;
  std::memset(&ev, 0, sizeof(ev));
  ev.events = EPOLLIN;
  if (epoll_ctl(epoll_, EPOLL_CTL_ADD, efd_, &ev) != 0) {
    return absl::UnavailableError(absl::StrCat("UCX: epoll_ctl: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

void UcxWorker::RunSync(std::function<void()> fn) {
  // No progress thread (a start that failed, whose teardown runs this): nothing else uses the
  // worker, and nobody would run `fn` for us.
  if (!thread_.joinable() || std::this_thread::get_id() == thread_.get_id()) {
    fn();
    return;
  }
  Mutex m;
  CondVar cv;
  bool done = false;
  RunAsync([&] {
    fn();
    MutexLock l(&m);
    done = true;
    cv.SignalAll();
  });
  MutexLock l(&m);
  while (!done) cv.Wait(&m);
}

void UcxWorker::RunAsync(std::function<void()> fn) {
  {
    MutexLock l(&ops_mu_);
    ops_.push_back(std::move(fn));
    ops_cv_.SignalAll();
  }
  ucp_worker_signal(worker_);
}

void UcxWorker::StopThread() {
  if (!thread_.joinable()) return;
  stop_ = true;
  {
    MutexLock l(&ops_mu_);
    ops_cv_.SignalAll();
  }
  ucp_worker_signal(worker_);
  thread_.join();
}

void UcxWorker::Destroy() {
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
  if (epoll_ >= 0) close(epoll_);
  worker_ = nullptr;
  context_ = nullptr;
  epoll_ = -1;
}

ucs_status_t UcxWorker::WaitRequest(void* req) {
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

void UcxWorker::Loop() {
  std::vector<std::function<void()>> ops;  // swapped with ops_: both keep their capacity
  bool owner = true;  // this thread progresses the worker (no caller has used it since)
  uint64_t seen = activity_.load(std::memory_order_relaxed);
  while (!stop_) {
    {
      MutexLock l(&ops_mu_);
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
        if (!ops_cv_.WaitFor(&ops_mu_, kLazyHandoff)) {
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
    Housekeeping();
    {
      MutexLock l(&ops_mu_);
      if (!ops_.empty() || stop_) continue;
    }
    const ucs_status_t s = ucp_worker_arm(worker_);
    if (s == UCS_ERR_BUSY) continue;
    epoll_event ev;
    epoll_wait(epoll_, &ev, 1, 100);
  }
  // Run what was queued before the stop so that waiters are released.
  {
    MutexLock l(&ops_mu_);
    ops.swap(ops_);
  }
  for (auto& op : ops) op();
}

void UcxWorker::ReceiveRendezvous(void* data, void* dst, size_t length,
                                  ucp_am_recv_data_nbx_callback_t done, void* user) {
  ucp_request_param_t prm;
  std::memset(&prm, 0, sizeof(prm));
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  prm.cb.recv_am = done;
  prm.user_data = user;
  void* req = ucp_am_recv_data_nbx(worker_, data, dst, length, &prm);
  if (req == nullptr) {
    done(nullptr, UCS_OK, length, user);
  } else if (UCS_PTR_IS_ERR(req)) {
    done(nullptr, UCS_PTR_STATUS(req), 0, user);
  }
}

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

std::vector<uint8_t> PeerWorkerAddress(const uint8_t* data, size_t size) {
  // The header's low 4 bits: UCP_OBJECT_VERSION_V1 (0) or V2 (1); a V2 header is 2 bytes.
  if (size < 2 || (data[0] & 0x0f) > 1) return {};
  std::vector<uint8_t> out(size + kWorkerAddressPadding, 0);
  std::memcpy(out.data(), data, size);
  return out;
}

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

}  // namespace dmoe::transport::ucx_internal
