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
