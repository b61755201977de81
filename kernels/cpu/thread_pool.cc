#include "kernels/cpu/thread_pool.h"

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace dmoe::cpu {
namespace {

thread_local bool t_in_chunk = false;

// Workers spin for a short while after their last chunk before they sleep: a decode step makes
// hundreds of small calls, and waking a sleeping thread (a futex round trip) costs as much as one
// of them. A chunk is claimed with a compare-and-swap on a ticket that carries the call's
// generation, so a worker late from one call can never claim (or miscount) a chunk of the next.
class Pool final : public KernelPool {
 public:
  explicit Pool(int n) {
    for (int i = 1; i < n; ++i) threads_.emplace_back([this] { Work(); });
  }
  ~Pool() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_.store(true);
      cv_.notify_all();
    }
    for (auto& t : threads_) t.join();
  }
  int size() const override { return static_cast<int>(threads_.size()) + 1; }

  void CountStats(bool on) override {
    std::lock_guard<std::mutex> l(busy_);
    stats_ = PoolStats();
    last_end_ = {};
    counting_.store(on, std::memory_order_relaxed);
  }
  PoolStats stats() const override {
    std::lock_guard<std::mutex> l(busy_);
    return stats_;
  }

  void Run(int n, const std::function<void(int)>& fn) override {
    // A chunk that calls Run again (an expert's products inside the expert loop) runs that call
    // inline: its thread already holds busy_ or is a worker of this call.
    if (t_in_chunk || n <= 1 || threads_.empty() || n > 0xffff) {
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) {
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    const bool counting = counting_.load(std::memory_order_relaxed);
    Clock::time_point start;
    if (counting) {
      start = Clock::now();
      if (last_end_ != Clock::time_point()) stats_.caller_alone_ns += Nanos(last_end_, start);
    }
    const uint64_t gen = ++generation_;  // only Run writes it, under busy_
    fn_ = &fn;
    pending_.store(n);
    ticket_.store(Ticket(gen, static_cast<uint64_t>(n), 0));
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> l(mu_);
      cv_.notify_all();
    }
    Drain(gen);
    const Clock::time_point drained = counting ? Clock::now() : Clock::time_point();
    for (uint64_t spins = 0; pending_.load() != 0; ++spins) {
      if (spins < 4096) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
    if (counting) {
      last_end_ = Clock::now();
      ++stats_.passes;
      stats_.chunks += static_cast<uint64_t>(n);
      stats_.caller_wait_ns += Nanos(drained, last_end_);
    }
  }

 private:
  using Clock = std::chrono::steady_clock;
  static uint64_t Nanos(Clock::time_point a, Clock::time_point b) {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count());
  }
  static uint64_t Ticket(uint64_t gen, uint64_t n, uint64_t idx) {
    return (gen << 32) | (n << 16) | idx;
  }
  // Claims and runs chunks of call `gen` until none is left.
  void Drain(uint64_t gen) {
    uint64_t t = ticket_.load();
    for (;;) {
      const uint64_t idx = t & 0xffff, n = (t >> 16) & 0xffff;
      if ((t >> 32) != (gen & 0xffffffff) || idx >= n) return;
      if (!ticket_.compare_exchange_weak(t, t + 1)) continue;  // t reloaded
      t_in_chunk = true;
      (*fn_)(static_cast<int>(idx));
      t_in_chunk = false;
      pending_.fetch_sub(1);
      t = ticket_.load();
    }
  }
  void Work() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t gen = ticket_.load() >> 32;
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      for (uint32_t i = 0; gen == seen; ++i) {
        if (stop_.load()) return;
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> l(mu_);
          ++sleepers_;
          cv_.wait(l, [&] { return stop_.load() || (ticket_.load() >> 32) != seen; });
          --sleepers_;
        }
        _mm_pause();
        gen = ticket_.load() >> 32;
      }
      seen = gen;
      Drain(gen);
    }
  }

  mutable std::mutex busy_;
  std::mutex mu_;
  std::atomic<bool> counting_{false};
  PoolStats stats_;             // under busy_ (Run holds it)
  Clock::time_point last_end_;  // the end of the last counted pass (under busy_)
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* fn_ = nullptr;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
};

std::atomic<int> g_threads{0};
std::atomic<Pool*> g_pool{nullptr};

int UsableCpuCount() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) {
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  return std::max(1, CPU_COUNT(&set));
}

}  // namespace

KernelPool& ThePool() {
  static Pool* pool = [] {  // never destroyed: used until exit
    const int n = g_threads.load();
    auto* p = new Pool(n > 0 ? n : UsableCpuCount());
    g_pool.store(p);
    return p;
  }();
  return *pool;
}

bool SetKernelThreads(int n) {
  if (n < 1) return false;
  Pool* p = g_pool.load();
  if (p != nullptr) return p->size() == n;
  g_threads.store(n);
  return true;
}

}  // namespace dmoe::cpu
