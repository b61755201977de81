#include "kernels/cpu/thread_pool.h"

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace dmoe::cpu {
namespace {

// A small pool that runs fn(chunk) for chunks [0, n) on all cores (the caller takes chunk 0).
// A call made while another runs (another thread) runs inline.
class Pool final : public KernelPool {
 public:
  Pool() {
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned i = 1; i < hw; ++i) threads_.emplace_back([this, i] { Work(i); });
  }
  ~Pool() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    for (auto& t : threads_) t.join();
  }
  int size() const override { return static_cast<int>(threads_.size()) + 1; }
  void Run(int n, const std::function<void(int)>& fn) override {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || n <= 1 || threads_.empty()) {
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      fn_ = &fn;
      chunks_ = n;
      next_ = 1;
      pending_ = n - 1;
      ++generation_;
      cv_.notify_all();
    }
    fn(0);
    for (;;) {  // help with what is left, then wait for the workers
      int c;
      {
        std::lock_guard<std::mutex> l(mu_);
        if (next_ >= chunks_) break;
        c = next_++;
      }
      fn(c);
      std::lock_guard<std::mutex> l(mu_);
      if (--pending_ == 0) done_.notify_all();
    }
    std::unique_lock<std::mutex> l(mu_);
    done_.wait(l, [&] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void Work(unsigned) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      cv_.wait(l, [&] { return stop_ || (generation_ != seen && next_ < chunks_); });
      if (stop_) return;
      while (next_ < chunks_) {
        const int c = next_++;
        const std::function<void(int)>* fn = fn_;
        l.unlock();
        (*fn)(c);
        l.lock();
        if (--pending_ == 0) done_.notify_all();
      }
      seen = generation_;
    }
  }
  std::mutex busy_, mu_;
  std::condition_variable cv_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* fn_ = nullptr;
  int chunks_ = 0, next_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace

KernelPool& ThePool() {
  static Pool* pool = new Pool();  // never destroyed: used until exit
  return *pool;
}

}  // namespace dmoe::cpu
