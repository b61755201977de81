// Recycled byte buffers, so that the steady state of the data plane allocates nothing per message.
#ifndef DMOE_TRANSPORT_BUFFER_POOL_H_
#define DMOE_TRANSPORT_BUFFER_POOL_H_

#include <cstdint>
#include <mutex>
#include <vector>

namespace dmoe::transport {

// Thread-safe.
class BufferPool {
 public:
  explicit BufferPool(size_t max_buffers = 256) : max_(max_buffers) {}
  std::vector<uint8_t> Acquire() {
    std::lock_guard<std::mutex> l(mu_);
    if (free_.empty()) return {};
    std::vector<uint8_t> b = std::move(free_.back());
    free_.pop_back();
    b.clear();
    return b;
  }
  // A buffer of exactly n bytes to be overwritten whole (a receive): a recycled buffer keeps its
  // old size, so shrinking to n costs nothing and only growth is zero-filled — a multi-MiB
  // receive does not first write the whole buffer with zeros.
  std::vector<uint8_t> AcquireSized(size_t n) {
    std::vector<uint8_t> b;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!free_.empty()) {
        // The most recently released buffer that is large enough, else the last one.
        size_t pick = free_.size() - 1;
        for (size_t i = free_.size(); i-- > 0;) {
          if (free_[i].size() >= n) {
            pick = i;
            break;
          }
        }
        b = std::move(free_[pick]);
        free_[pick] = std::move(free_.back());
        free_.pop_back();
      }
    }
    b.resize(n);
    return b;
  }
  void Release(std::vector<uint8_t> b) {
    if (b.capacity() == 0) return;
    std::lock_guard<std::mutex> l(mu_);
    if (free_.size() < max_) free_.push_back(std::move(b));
  }

 private:
  const size_t max_;
  std::mutex mu_;
  std::vector<std::vector<uint8_t>> free_;
};

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_BUFFER_POOL_H_
